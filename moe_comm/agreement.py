"""Dispatch's header exchanges: counts, plus a status that makes every rank raise when any rank
rejected its input or the ranks disagree on the call. One host synchronisation per dispatch,
however many stages: every header is built on the device from what the previous one brought.

Flat: one header, row d = [status fields | rows for d | (token, expert) pairs per expert of d].
Hierarchical: the rail header row n also carries, per local index l, the rows node n's
forwarder will pass on to rank (n, l), and the pairs of all node n's experts; the forwarder
turns what its rail peers told it into its node header (rows from each source node, pairs per
expert) without the host. Statuses travel the same way: a rank's own routing status (a device
tensor, validation.routing_status), a status received from a rail peer, or a disagreement with
a rail peer, in that order, are relayed in the node header, so after both every rank knows (a
rank reaches every other rank through either its rail or its node). No token row moves once
a problem is known.
"""

from dataclasses import dataclass
from typing import List, Optional

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


@dataclass(frozen=True)
class HeaderLayout:
    """Columns after FIELDS: rows per block of the sender's input, rows to forward per local
    index (hierarchical rail stage only), then (token, expert) pairs per expert of the row's
    destination."""
    blocks: int
    forward: int
    experts: int

    @property
    def width(self) -> int:
        return len(FIELDS) + self.blocks + self.forward + self.experts

    def rows(self, header: torch.Tensor) -> torch.Tensor:
        return header[:, len(FIELDS):len(FIELDS) + self.blocks]

    def forwarded(self, header: torch.Tensor) -> torch.Tensor:
        start = len(FIELDS) + self.blocks
        return header[:, start:start + self.forward]

    def expert_pairs(self, header: torch.Tensor) -> torch.Tensor:
        return header[:, len(FIELDS) + self.blocks + self.forward:]


def _fixed_fields(stage: Stage, call: dict, rank: int, layout: HeaderLayout, problem: Optional[Problem]):
    host = torch.zeros(stage.size, layout.width, dtype=torch.int64)
    for name in AGREED:
        host[:, F[name]] = call[name]
    if problem is not None:
        host[:, F["status"]] = problem.code
        host[:, F["bad_rank"]] = problem.rank
        host[:, F["seen_by"]] = problem.seen_by
    else:
        host[:, F["bad_rank"]] = rank  # read only when a status is set
        host[:, F["seen_by"]] = rank
    return host


def build_header(stage: Stage, call: dict, rank: int, layout: HeaderLayout, device: torch.device,
                 problem: Optional[Problem] = None, status: Optional[torch.Tensor] = None,
                 rows: Optional[torch.Tensor] = None, forward: Optional[torch.Tensor] = None,
                 expert_pairs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first stage's header, [stage.size, layout.width] int64 on `device`; row d is what
    this rank tells destination d. Fixed fields come from the host; status (0-dim: this rank's
    routing_status), rows [size, 1], forward [size, P] and expert_pairs [size, experts] stay
    on the device. A known problem replaces them all."""
    header = to_device(_fixed_fields(stage, call, rank, layout, problem), device)
    if problem is not None:
        return header
    if status is not None:
        header[:, F["status"]] = status
    for part, values in ((layout.rows, rows), (layout.forwarded, forward), (layout.expert_pairs, expert_pairs)):
        if values is not None:
            part(header).copy_(values)
    return header


def relay_header(stage: Stage, call: dict, rank: int, layout: HeaderLayout, device: torch.device,
                 received: torch.Tensor, received_layout: HeaderLayout, senders: List[int],
                 problem: Optional[Problem] = None, status: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The node header of a forwarder, from the rail header it received ([N, .] on the device,
    row b from rail peer `senders[b]`): row l = rows from each source node for local index l,
    and the pairs of l's experts summed over the sources. Status: this rank's own (host problem,
    then device status), else the first rail peer's, else a disagreement with a rail peer."""
    header = to_device(_fixed_fields(stage, call, rank, layout, problem), device)
    if problem is not None:
        return header
    layout.rows(header).copy_(received_layout.forwarded(received).t())
    pairs = received_layout.expert_pairs(received).sum(dim=0)
    layout.expert_pairs(header).copy_(pairs.view(stage.size, layout.experts))

    zero = torch.zeros((), dtype=torch.int64, device=device)
    own = status if status is not None else zero
    relayed = received[:, F["status"]]
    first = (relayed != 0).to(torch.int64).argmax()  # the first sender with a status (0 if none)
    agreed = torch.tensor([call[name] for name in AGREED], dtype=torch.int64)
    differs = (received[:, [F[name] for name in AGREED]] != to_device(agreed, device)).any(dim=1)
    other = differs.to(torch.int64).argmax()
    sender_ranks = to_device(torch.tensor(senders, dtype=torch.int64), device)
    me = torch.full((), rank, dtype=torch.int64, device=device)
    disagreement = torch.where(differs.any(), torch.full_like(zero, DISAGREEMENT), zero)
    use_own, use_relayed = own != 0, relayed[first] != 0
    code = torch.where(use_own, own, torch.where(use_relayed, relayed[first], disagreement))
    bad = torch.where(use_own, me, torch.where(use_relayed, received[first, F["bad_rank"]], sender_ranks[other]))
    seen = torch.where(use_own, me, torch.where(use_relayed, received[first, F["seen_by"]], me))
    header[:, F["status"]] = code
    header[:, F["bad_rank"]] = bad
    header[:, F["seen_by"]] = seen
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
