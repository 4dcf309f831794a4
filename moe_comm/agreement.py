"""Dispatch's first exchange of every stage: counts, plus a status that makes every rank raise
when any rank rejected its input or the ranks disagree on the call.

A problem seen in one stage travels in the next stage's header, so after the last header
every rank knows (in the hierarchical mode a rank reaches every other rank through either its
rail or its node). No token rows move once a problem is known.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from .stages import Stage
from .validation import ARGUMENT_CODES, CODE_OF, InputError

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FIELDS = ("status", "bad_rank", "seen_by", "hidden", "dtype", "topk", "num_experts")
F = {name: i for i, name in enumerate(FIELDS)}
AGREED = ("hidden", "dtype", "topk", "num_experts")
DISAGREEMENT = 4  # status code beside the argument codes of validation.ARGUMENT_CODES


@dataclass
class Problem:
    code: int
    rank: int                              # the rank (in the Buffer's group) whose call was bad
    seen_by: int                           # the rank that found it (a disagreement has two sides)
    error: Optional[Exception] = None      # raised as is: this rank's own input, or seen directly

    def exception(self) -> Exception:
        if self.error is not None:
            return self.error
        if self.code == DISAGREEMENT:
            a, b = sorted((self.rank, self.seen_by))
            return ValueError(f"dispatch: rank {a} and rank {b} disagree on the hidden size, dtype, "
                              f"top-k or num_experts; every rank of the group must agree")
        return RuntimeError(f"dispatch: rank {self.rank} rejected its argument "
                            f"'{ARGUMENT_CODES.get(self.code, self.code)}' (see that rank's error); "
                            f"no tokens were exchanged")


def local_problem(rank: int, rejected: Optional[InputError]) -> Optional[Problem]:
    if rejected is None:
        return None
    return Problem(CODE_OF[rejected.argument], rank, rank, rejected.error)


def build_header(stage: Stage, call: dict, counts: Optional[torch.Tensor], blocks: int,
                 problem: Optional[Problem]) -> torch.Tensor:
    """-> [stage.size, len(FIELDS) + blocks] int64. counts [stage.size, blocks]: rows for each
    destination from each block of this stage's input (zeros once a problem is known)."""
    header = torch.zeros(stage.size, len(FIELDS) + blocks, dtype=torch.int64)
    for name in AGREED:
        header[:, F[name]] = call[name]
    if problem is not None:
        header[:, F["status"]] = problem.code
        header[:, F["bad_rank"]] = problem.rank
        header[:, F["seen_by"]] = problem.seen_by
    elif counts is not None:
        header[:, len(FIELDS):] = counts
    return header


def find_problem(stage: Stage, call: dict, received: torch.Tensor, rank: int) -> Optional[Problem]:
    """The first problem a received header reveals: a sender's status, or a sender that
    disagrees with this rank on the call."""
    for s in range(stage.size):
        code = int(received[s, F["status"]])
        if code:
            return Problem(code, int(received[s, F["bad_rank"]]), int(received[s, F["seen_by"]]))
    labels = {"hidden": "x: hidden size", "dtype": "x: dtype code", "topk": "topk_idx: k",
              "num_experts": "num_experts"}
    for name in AGREED:
        theirs = received[:, F[name]]
        bad = (theirs != call[name]).nonzero().flatten().tolist()
        if bad:
            other = stage.global_ranks[bad[0]]
            return Problem(DISAGREEMENT, other, rank, ValueError(
                f"{labels[name]} is {call[name]} on rank {rank} but {int(theirs[bad[0]])} on rank {other}: "
                f"every rank of the group must agree"))
    return None


def received_counts(received: torch.Tensor) -> torch.Tensor:
    """[senders, blocks] rows each sender sends this rank, per block of its input."""
    return received[:, len(FIELDS):]
