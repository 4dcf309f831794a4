"""Combine's ok/error agreement. Combine has no header (the handle fixes every count), so a rank
whose combine input is bad would otherwise leave its peers waiting in the row exchange. With
`Buffer(combine_status=True)` every rank first puts one code into a [W] vector summed over a
gloo group on the host: 0 = ok, else which argument it rejected. It is started before the
first partial sums are packed and waited for just before the first row exchange, so its
latency hides behind that work, and it never synchronises with the GPU. When any code is
non-zero every rank raises (the bad rank its own error, the others name it and quote its reason
from the store) and nobody enters the row exchange: the group stays in step for the next call.
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

    def __init__(self, buffer, codes: torch.Tensor, work):
        self.buffer, self.codes, self.work = buffer, codes, work

    def wait(self) -> torch.Tensor:
        with stage_errors(self.buffer, list(range(self.buffer.world_size)), STAGE_NAME):
            self.work.wait()
        return self.codes

    def check(self) -> None:
        codes = self.wait()
        bad = [(r, int(c)) for r, c in enumerate(codes.tolist()) if c]
        if not bad:
            return
        rank, code = bad[0]
        also = "".join(f"; rank {r} rejected its input too" for r, _ in bad[1:])
        reason = posted_reason(self.buffer, rank)
        quoted = f" (rank {rank} reported: {reason})" if reason else " (see that rank's error)"
        raise RuntimeError(f"combine: rank {rank} rejected its argument '{COMBINE_ARGUMENTS.get(code, code)}'"
                           f"{also}; no rows were exchanged{quoted}")


def start_status(buffer, rejected_argument: Optional[str] = None) -> Optional[PendingStatus]:
    """Joins this combine's status exchange with this rank's code. None when the Buffer does
    not exchange statuses (combine_status=False, or a group of one)."""
    group = buffer.status_group
    if group is None:
        return None
    codes = torch.zeros(buffer.world_size, dtype=torch.int64)
    if rejected_argument is not None:
        codes[buffer.rank] = CODE_OF_ARGUMENT[rejected_argument]
    work = dist.all_reduce(codes, group=group, async_op=True)
    return PendingStatus(buffer, codes, work)
