"""The oracle: a pure-torch, obviously correct implementation of the API.md contract.

It sees every rank's inputs at once (lists indexed by rank) and computes densely, in plain
loops over experts and ranks. It is differentiable, so one process can compute the gradients
of a whole expert-parallel step. Never used by the fast paths.

`dispatch`/`combine` wrap it with the same signatures as moe_comm's, gathering all ranks'
tensors with torch.distributed object collectives (slow; for tests and debugging).
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


def _owner_layout(topk_idxs: Sequence[torch.Tensor], num_experts: int, world_size: int):
    """For every rank d and local expert, in API order: (source rank, token ids, slot ids).
    -> layout[d] = list over local experts of list of (src, tokens[n], slots[n])."""
    per_rank = num_experts // world_size
    layout = []
    for d in range(world_size):
        experts = []
        for local in range(per_rank):
            e = d * per_rank + local
            blocks = []
            for src, idx in enumerate(topk_idxs):
                hit = idx.to(torch.int64) == e           # [T, K], at most one True per row
                tokens = hit.any(dim=1).nonzero().flatten()
                slots = hit[tokens].to(torch.int64).argmax(dim=1)
                blocks.append((src, tokens, slots))
            experts.append(blocks)
        layout.append(experts)
    return layout


def drop_by_capacity(topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], num_experts: int,
                     capacity_factor: float, drop_policy: str = "probs", tokens: Optional[int] = None) -> torch.Tensor:
    """One rank's routing after expert capacity (API.md: Capacity): each expert keeps at most
    C = ceil(capacity_factor * T * K / E) of its pairs (T: `tokens`, the Buffer's
    max_tokens_per_rank, else the rank's own), the largest weights ("probs", ties to the lower
    token) or the first tokens ("position"); the others become -1."""
    T, K = topk_idx.shape
    capacity = math.ceil(capacity_factor * (T if tokens is None else tokens) * K / num_experts)
    kept = topk_idx.to(torch.int64).clone()
    for e in range(num_experts):
        tokens, slots = (kept == e).nonzero(as_tuple=True)  # ascending token
        if drop_policy == "probs":
            weight = [float(topk_weights[t, s]) for t, s in zip(tokens, slots)]
            weight = [w if w == w else -math.inf for w in weight]  # NaN ranks below every number
            order = sorted(range(len(tokens)), key=lambda i: (-weight[i], int(tokens[i])))
        else:
            order = list(range(len(tokens)))
        for i in order[capacity:]:
            kept[tokens[i], slots[i]] = -1
    return kept


def pad_experts(recv_x: torch.Tensor, recv_weights: torch.Tensor, tokens_per_expert: torch.Tensor,
                alignment: int):
    """One rank's dispatch outputs with zero rows ending each expert's segment up to a multiple
    of `alignment` (API.md: expert_alignment). -> (recv_x, recv_weights, tokens_per_expert)."""
    xs, ws, counts = [], [], []
    for rows, weights in zip(recv_x.split(tokens_per_expert.tolist()), recv_weights.split(tokens_per_expert.tolist())):
        pad = -len(rows) % alignment
        xs += [rows, rows.new_zeros((pad, rows.shape[1]))]
        ws += [weights, weights.new_zeros(pad)]
        counts.append(len(rows) + pad)
    return torch.cat(xs), torch.cat(ws), torch.tensor(counts, dtype=torch.int64)


def dispatch_all(xs: Sequence[torch.Tensor], topk_idxs: Sequence[torch.Tensor],
                 topk_weights: Sequence[Optional[torch.Tensor]], num_experts: int):
    """-> list over ranks of (recv_x [R, H], recv_weights [R] float32, tokens_per_expert [E_local])."""
    world_size = len(xs)
    out = []
    for experts in _owner_layout(topk_idxs, num_experts, world_size):
        rows, weights, counts = [], [], []
        for blocks in experts:
            n = 0
            for src, tokens, slots in blocks:
                rows.append(xs[src][tokens])
                w = topk_weights[src]
                weights.append(w[tokens, slots] if w is not None else torch.ones(len(tokens)))
                n += len(tokens)
            counts.append(n)
        hidden = xs[0].shape[1]
        recv_x = torch.cat(rows) if rows else xs[0].new_zeros((0, hidden))
        recv_w = torch.cat(weights).float() if weights else torch.zeros(0)
        out.append((recv_x, recv_w, torch.tensor(counts, dtype=torch.int64)))
    return out


def over_fp8_wire(xs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Each rank's x as the receivers of an FP8 dispatch see it (API.md: FP8 on the wire): every
    row quantized by the block rule and dequantized back to x's dtype. dispatch_all of these is
    what dispatch(..., wire_dtype=torch.float8_e4m3fn) gives, exactly."""
    from .fp8 import dequantize_fp8, quantize_fp8
    return [dequantize_fp8(*quantize_fp8(x), dtype=x.dtype) for x in xs]


def dispatch_all_blocks(xs: Sequence[torch.Tensor], topk_idxs: Sequence[torch.Tensor],
                        topk_weights: Sequence[Optional[torch.Tensor]], num_experts: int, block_rows: int,
                        alignment: int = 1):
    """dispatch_all with pad_to_capacity (API.md): each local expert's segment is one block of
    block_rows rows per source rank (its rows, then zero rows), then zero rows up to a multiple
    of `alignment`. -> list over ranks of (recv_x, recv_weights, tokens_per_expert)."""
    hidden = xs[0].shape[1]
    out = []
    for experts in _owner_layout(topk_idxs, num_experts, len(xs)):
        rows, weights, counts = [], [], []
        for blocks in experts:
            n = 0
            for src, tokens, slots in blocks:
                assert len(tokens) <= block_rows, "a block holds more than block_rows rows"
                pad = block_rows - len(tokens)
                w = topk_weights[src]
                rows += [xs[src][tokens], xs[src].new_zeros((pad, hidden))]
                weights += [w[tokens, slots] if w is not None else torch.ones(len(tokens)), torch.zeros(pad)]
                n += block_rows
            tail = -n % alignment
            rows.append(xs[0].new_zeros((tail, hidden)))
            weights.append(torch.zeros(tail))
            counts.append(n + tail)
        out.append((torch.cat(rows), torch.cat(weights).float(), torch.tensor(counts, dtype=torch.int64)))
    return out


def combine_all(expert_ys: Sequence[torch.Tensor], topk_idxs: Sequence[torch.Tensor],
                topk_weights: Sequence[Optional[torch.Tensor]], num_experts: int,
                num_tokens: Sequence[int], out_dtype: torch.dtype) -> List[torch.Tensor]:
    """y[s][t] = sum_k w[s][t, k] * expert_ys[owner][row(s, t, k)], float32 accumulation."""
    world_size = len(expert_ys)
    hidden = expert_ys[0].shape[1]
    acc = [torch.zeros((n, hidden), dtype=torch.float32) for n in num_tokens]
    for d, experts in enumerate(_owner_layout(topk_idxs, num_experts, world_size)):
        row = 0
        for blocks in experts:
            for src, tokens, slots in blocks:
                part = expert_ys[d][row:row + len(tokens)].float()
                w = topk_weights[src]
                if w is not None:
                    part = part * w[tokens, slots].unsqueeze(1)
                acc[src] = acc[src].index_add(0, tokens, part)
                row += len(tokens)
        assert row == expert_ys[d].shape[0], f"expert_ys[{d}] has {expert_ys[d].shape[0]} rows, layout {row}"
    return [a.to(out_dtype) for a in acc]


def node_limited_topk(scores, k, num_nodes, max_nodes, *, score_func="sigmoid", bias=None,
                      normalize=True, scaling_factor=1.0, node_score_topk=None):
    """The oracle of moe_comm.node_limited_topk: mask every expert outside the chosen nodes,
    then take the top-k by a stable sort (ties to the lower index)."""
    T, E = scores.shape
    per_node = E // num_nodes
    m = node_score_topk or max(1, min(per_node, k // max_nodes))
    probs = {"sigmoid": torch.sigmoid, "softmax": lambda s: torch.softmax(s, dim=-1),
             "none": lambda s: s}[score_func](scores.float())
    select = probs.detach() + (bias.float() if bias is not None else 0.0)
    best_in_node = select.view(T, num_nodes, per_node).sort(dim=-1, descending=True, stable=True).values
    node_score = best_in_node[:, :, :m].double().sum(dim=-1)
    chosen_nodes = node_score.sort(dim=-1, descending=True, stable=True).indices[:, :max_nodes]
    allowed = torch.zeros(T, num_nodes, dtype=torch.bool).scatter(1, chosen_nodes, True)
    masked = select.masked_fill(~allowed.repeat_interleave(per_node, dim=1), float("-inf"))
    topk_idx = masked.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, topk_idx)
    if normalize:
        weights = weights / (weights.sum(dim=1, keepdim=True) + 1e-20)
    return topk_idx, weights * scaling_factor


@dataclass
class ReferenceHandle:
    topk_idxs: list
    num_experts: int
    num_tokens: list
    dtype: torch.dtype
    group: object


def _gather(obj, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def dispatch(x, topk_idx, topk_weights, buffer):
    """Same contract as moe_comm.dispatch, computed by the oracle (no autograd across ranks)."""
    group = buffer.group
    xs = _gather(x.detach(), group)
    idxs = _gather(topk_idx, group)
    ws = _gather(topk_weights.detach() if topk_weights is not None else None, group)
    recv_x, recv_w, counts = dispatch_all(xs, idxs, ws, buffer.num_experts)[buffer.rank]
    handle = ReferenceHandle(idxs, buffer.num_experts, [t.shape[0] for t in xs], x.dtype, group)
    return recv_x, recv_w, counts, handle


def combine(expert_y, handle: ReferenceHandle, topk_weights=None):
    """Same contract as moe_comm.combine, computed by the oracle."""
    ys = _gather(expert_y.detach(), handle.group)
    ws = _gather(topk_weights.detach() if topk_weights is not None else None, handle.group)
    rank = dist.get_rank(handle.group)
    return combine_all(ys, handle.topk_idxs, ws, handle.num_experts, handle.num_tokens, handle.dtype)[rank]
