"""Dispatch's first exchange of every stage: counts, plus a status that makes every rank raise
when any rank rejected its input or the ranks disagree on the call.

A rank's own routing status is computed on its device (validation.routing_status) and only
read after the exchange, which synchronises anyway. A problem seen in one stage travels in the
next stage's header, so after the last header every rank knows (in the hierarchical mode a
rank reaches every other rank through either its rail or its node). No token rows move once a
problem is known.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from .stages import Stage
from .streams import to_device
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


def build_header(stage: Stage, call: dict, rank: int, blocks: int, expert_columns: int, device: torch.device,
                 problem: Optional[Problem] = None, status: Optional[torch.Tensor] = None,
                 counts: Optional[torch.Tensor] = None, expert_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """-> [stage.size, len(FIELDS) + blocks + expert_columns] int64 on `device`; row d is what
    this rank tells destination d. The fixed fields come from the host; status (0-dim: this
    rank's routing_status), counts [size, blocks] (rows for d from each block of this stage's
    input) and expert_counts [size, expert_columns] (pairs for each of d's experts, in the last
    stage) stay on the device. A known problem replaces status and counts."""
    host = torch.zeros(stage.size, len(FIELDS) + blocks + expert_columns, dtype=torch.int64)
    for name in AGREED:
        host[:, F[name]] = call[name]
    if problem is not None:
        host[:, F["status"]] = problem.code
        host[:, F["bad_rank"]] = problem.rank
        host[:, F["seen_by"]] = problem.seen_by
        return to_device(host, device)
    host[:, F["bad_rank"]] = rank  # read only when a status is set
    host[:, F["seen_by"]] = rank
    header = to_device(host, device)
    if status is not None:
        header[:, F["status"]] = status
    if counts is not None:
        header[:, len(FIELDS):len(FIELDS) + blocks] = counts
    if expert_counts is not None:
        header[:, len(FIELDS) + blocks:] = expert_counts
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


def received_counts(received: torch.Tensor, blocks: int) -> torch.Tensor:
    """[senders, blocks] rows each sender sends this rank, per block of its input."""
    return received[:, len(FIELDS):len(FIELDS) + blocks]


def received_expert_counts(received: torch.Tensor, blocks: int) -> torch.Tensor:
    """[senders, experts] (token, expert) pairs each sender sends this rank, per local expert."""
    return received[:, len(FIELDS) + blocks:]
