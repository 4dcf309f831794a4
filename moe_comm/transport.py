"""What a failed exchange becomes: a CommError naming this rank, the stage it was in and, from
a roll call in the process group's store, the ranks that never arrived. The exchanges
themselves are the engine's (csrc/engine; its CPU wire is csrc/bindings/gloo_transport, which
signs the roll call as _Collective does here); the host collectives left in Python (combine's
status on CUDA, peer_status.py) wait through `stage_errors`.
"""

import contextlib
import datetime
from typing import List

import torch.distributed as dist

from .roll_call import missing_ranks, posted_reason, sign_roll


class CommError(RuntimeError):
    """A collective of moe_comm failed or timed out; the message names rank and stage."""


# A host collective still running after this long makes its rank sign the roll call as
# arrived, so a peer that arrived late but is stuck like everyone else is never named as
# missing. Quick collectives (the happy path) write nothing to the store.
SIGN_AFTER_S = 1.0


class _Collective:
    """One numbered collective of a stage: waits on its gloo work, signing the roll when slow."""

    def __init__(self, buffer, name: str):
        self.buffer, self.name = buffer, name
        self.seq = buffer.next_collective(name)

    def wait(self, work) -> None:
        first = datetime.timedelta(seconds=min(SIGN_AFTER_S, self.buffer.timeout / 4))
        try:
            work.wait(first)
            return
        except RuntimeError:
            if work.is_completed():  # it failed on its own: the second wait raises that error
                work.wait()
                return
        sign_roll(self.buffer, self.name, self.seq)
        work.wait()  # bounded by the group's timeout, the Buffer's


def comm_error(buffer, members: List[int], name: str, seq: int, exc: Exception) -> "CommError":
    """The error of collective `seq` of stage `name` that failed with `exc`: names this rank, the
    stage and, from the roll call, the members (Buffer-group ranks) that never arrived."""
    timeout = f"{buffer.timeout:g}s"
    missing = missing_ranks(buffer, members, name, seq) if seq >= 0 else None  # -1: nobody signs (CUDA)
    if missing:
        ranks = ", ".join(map(str, missing))
        who = f"rank{'s' if len(missing) > 1 else ''} {ranks} did not arrive within {timeout}"
        reasons = [(r, posted_reason(buffer, r)) for r in missing]
        who += "".join(f"; rank {r} reported: {why}" for r, why in reasons if why)
    elif missing == []:
        who = "every peer arrived; the collective itself failed"
    else:
        who = f"a peer may have died or not arrived within {timeout}"
    return CommError(f"moe_comm: rank {buffer.rank} of {buffer.world_size} failed in stage '{name}' "
                     f"({who}): {exc}")


@contextlib.contextmanager
def stage_errors(buffer, members: List[int], name: str):
    """members: the Buffer-group ranks taking part (for the roll call of a failure). Yields the
    collective, whose `wait(work)` waits for an async gloo work."""
    collective = _Collective(buffer, name)
    try:
        yield collective
    except (RuntimeError, dist.DistBackendError) as exc:
        if isinstance(exc, CommError):
            raise
        raise comm_error(buffer, members, name, collective.seq, exc) from exc
