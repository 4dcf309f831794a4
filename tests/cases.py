"""Deterministic inputs for dispatch/combine tests: every rank can rebuild every other rank's
inputs from (case, rank), so the oracle runs locally without gathering.

Payload columns 0..2 encode (source rank, token // 64, token % 64): exact in every dtype, so a
misplaced row names where it came from.
"""

from dataclasses import dataclass
from typing import List

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PATTERNS = ("random", "masked", "one_expert", "skewed")


@dataclass(frozen=True)
class Case:
    world_size: int
    num_experts: int
    topk: int
    hidden: int
    dtype: str = "float32"
    pattern: str = "random"
    tokens: tuple = (7,)  # tokens of rank r = tokens[r % len(tokens)]
    seed: int = 0

    def tokens_of(self, rank: int) -> int:
        return self.tokens[rank % len(self.tokens)]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def routing(case: Case, rank: int, gen: torch.Generator) -> torch.Tensor:
    """[T, K] int64 expert ids, no repeats in a row, -1 for masked slots."""
    T, K, E = case.tokens_of(rank), case.topk, case.num_experts
    if case.pattern == "one_expert":
        # Every token picks expert 0 (K = 1) or expert 0 plus others.
        rest = torch.rand(T, E - 1, generator=gen).argsort(dim=1)[:, :K - 1] + 1
        return torch.cat([torch.zeros(T, 1, dtype=torch.int64), rest], dim=1)
    scores = torch.rand(T, E, generator=gen)
    if case.pattern == "skewed":
        scores = scores * torch.linspace(3.0, 0.1, E)  # low experts (rank 0) are hot
    idx = scores.argsort(dim=1, descending=True)[:, :K].contiguous()
    if case.pattern == "masked":
        drop = torch.rand(T, K, generator=gen) < 0.4
        if T:
            drop[0] = True  # one token with no valid expert at all
        idx = idx.masked_fill(drop, -1)
    return idx


def make_inputs(case: Case, rank: int):
    """-> x [T, H] (dtype), topk_idx [T, K] int64, topk_weights [T, K] float32."""
    gen = torch.Generator().manual_seed(case.seed * 1009 + rank)
    T, H = case.tokens_of(rank), case.hidden
    x = torch.randn(T, H, generator=gen)
    t = torch.arange(T, dtype=torch.float32)
    cols = torch.stack([torch.full((T,), float(rank)), t // 64, t % 64], dim=1)
    x[:, :min(3, H)] = cols[:, :min(3, H)]
    idx = routing(case, rank, gen)
    weights = torch.rand(T, case.topk, generator=gen) + 0.1
    return x.to(case.torch_dtype), idx, weights


def all_inputs(case: Case):
    per_rank = [make_inputs(case, r) for r in range(case.world_size)]
    return [p[0] for p in per_rank], [p[1] for p in per_rank], [p[2] for p in per_rank]


def expert_scale(case: Case, rank: int, rows: int, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """A deterministic expert: row * (1 + global expert id / 8). -> [rows, 1] float32."""
    per_rank = case.num_experts // case.world_size
    experts = torch.repeat_interleave(torch.arange(per_rank) + rank * per_rank, tokens_per_expert)
    assert experts.numel() == rows
    return (1.0 + experts.float() / 8.0).unsqueeze(1)


def grid(world_size: int) -> List[Case]:
    """The dispatch/combine grid for one world size: dtypes x top-k x patterns x sizes."""
    per_rank = 2 if world_size < 8 else 1
    E = world_size * per_rank * (2 if world_size <= 2 else 1)
    ks = sorted({1, 2, min(8, E), E})
    token_sets = [(0, 1, 7, 300), (7, 0, 300, 1), (1,), (300, 7)]
    hiddens = [7, 16, 33, 256]
    cases = []
    i = 0
    for dtype in DTYPES:
        for K in ks:
            for pattern in PATTERNS:
                cases.append(Case(world_size=world_size, num_experts=E, topk=K,
                                  hidden=hiddens[i % len(hiddens)], dtype=dtype, pattern=pattern,
                                  tokens=token_sets[i % len(token_sets)], seed=i))
                i += 1
    return cases
