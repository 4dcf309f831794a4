"""What a failed exchange becomes: a CommError naming this rank, the stage it was in and, from
a roll call in the process group's store, the ranks that never arrived. The exchanges
themselves are the engine's (csrc/engine; its CPU wire is csrc/bindings/gloo_transport, which
signs the roll call in the store as roll_call.py reads it, and so does the shared-memory wire).
"""

from typing import List

from .roll_call import StoreUnreachable, missing_ranks, posted_reason, waiting_in


class CommError(RuntimeError):
    """A collective of moe_comm failed or timed out; the message names rank and stage."""


# An exchange still running after this long makes its rank sign the roll call as arrived, so a
# peer that arrived late but is stuck like everyone else is never named as missing. Quick
# exchanges (the happy path) write nothing to the store.
SIGN_AFTER_S = 1.0


def comm_error(buffer, members: List[int], name: str, seq: int, exc: Exception) -> "CommError":
    """The error of collective `seq` of stage `name` that failed with `exc`: names this rank, the
    stage and, from the roll call, the members (Buffer-group ranks) that never arrived."""
    timeout = f"{buffer.timeout:g}s"
    unreachable = False
    try:
        missing = missing_ranks(buffer, members, name, seq) if seq >= 0 else None  # -1: nobody signs (CUDA)
    except StoreUnreachable:
        missing, unreachable = None, True
    if unreachable:
        who = ("the collective failed, and the process group's store did not answer either: this rank may be cut "
               "off from the network, or the store's host is down")
    elif missing:
        ranks = ", ".join(map(str, missing))
        who = f"rank{'s' if len(missing) > 1 else ''} {ranks} did not arrive within {timeout}"
        reasons = {r: posted_reason(buffer, r) for r in missing}
        who += "".join(f"; rank {r} reported: {why}" for r, why in reasons.items() if why)
        elsewhere = [(r, waiting_in(buffer, r)) for r in missing if not reasons[r]]
        who += "".join(f"; rank {r} was itself stuck in stage '{stage}'" for r, stage in elsewhere
                       if stage and stage != name)
    elif missing == []:
        who = "every peer arrived; the collective itself failed"
    else:
        who = f"a peer may have died or not arrived within {timeout}"
    return CommError(f"moe_comm: rank {buffer.rank} of {buffer.world_size} failed in stage '{name}' "
                     f"({who}): {exc}")
