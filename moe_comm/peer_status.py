"""Combine's ok/error agreement. Combine has no header (the handle fixes every count), so a rank
whose combine input is bad would otherwise leave its peers waiting in the row exchange. With
`Buffer(combine_status=True)` every rank first joins a one-element MAX all-reduce over a gloo
group on the host: 0 = ok, else (W - rank) << 8 | the argument it rejected, so the result names
the lowest bad rank (one element: gloo reduces a [W] vector several times slower). It starts
before the first partial sums are packed and is waited for just before the first row
exchange, and it never synchronises with the GPU. When the result is non-zero every rank
raises (the bad rank its own error, the others name it and quote its reason from the store)
and nobody enters the row exchange: the group stays in step for the next call.
"""

from typing import Optional

import torch
import torch.distributed as dist

from .roll_call import posted_reason
from .transport import stage_errors

COMBINE_ARGUMENTS = {1: "expert_y", 2: "topk_weights"}
CODE_OF_ARGUMENT = {name: code for code, name in COMBINE_ARGUMENTS.items()}
STAGE_NAME = "combine/status"


class PendingStatus:
    """A started status exchange; `check()` waits for it and raises if any rank was bad."""

    def __init__(self, buffer, status: torch.Tensor, work):
        self.buffer, self.status, self.work = buffer, status, work

    def wait(self) -> torch.Tensor:
        with stage_errors(self.buffer, list(range(self.buffer.world_size)), STAGE_NAME) as collective:
            collective.wait(self.work)
        return self.status

    def check(self) -> None:
        value = int(self.wait())
        if value == 0:
            return
        rank, code = self.buffer.world_size - (value >> 8), value & 0xFF
        reason = posted_reason(self.buffer, rank)
        quoted = f" (rank {rank} reported: {reason})" if reason else " (see that rank's error)"
        raise RuntimeError(f"combine: rank {rank} rejected its argument '{COMBINE_ARGUMENTS.get(code, code)}'; "
                           f"nothing was combined{quoted}")


def start_status(buffer, rejected_argument: Optional[str] = None) -> Optional[PendingStatus]:
    """Joins this combine's status exchange with this rank's code. None when the Buffer does
    not exchange statuses (combine_status=False, or a group of one)."""
    group = buffer.status_group
    if group is None:
        return None
    value = 0
    if rejected_argument is not None:
        value = (buffer.world_size - buffer.rank) << 8 | CODE_OF_ARGUMENT[rejected_argument]
    status = torch.tensor([value], dtype=torch.int64)
    work = dist.all_reduce(status, op=dist.ReduceOp.MAX, group=group, async_op=True)
    return PendingStatus(buffer, status, work)
