"""Who never arrived: a rank whose host collective is still running after a second signs a
roll in the default process group's key-value store (transport.SIGN_AFTER_S), and so does a
rank whose collective fails; after a short grace, the members that did not sign are the ones
that never reached it (dead, hung, or elsewhere in their program). A peer that arrived late
but is stuck too has signed long before anyone's timeout ends, so it is never named. Nothing
is written on the happy path; each rank numbers the collectives of each stage in the same
order, so the roll of one collective never mixes with another's (keys carry the Buffer's
uid, which names its group's ranks)."""

import time
from typing import List, Optional

from .groups import default_store as _store  # None: the errors then name no ranks

GRACE_S = 1.5  # how long the first rank to fail waits for its stuck peers to sign


def _roll_prefix(buffer, name: str, seq: int) -> str:
    return f"moe_comm/roll/{buffer.uid}/{name}/{seq}/"


def sign_roll(buffer, name: str, seq: int) -> None:
    """This rank reached collective `seq` of `name` (best effort)."""
    store = _store()
    if store is None:
        return
    try:
        store.set(_roll_prefix(buffer, name, seq) + str(buffer.rank), "arrived")
    except Exception:  # noqa: BLE001 - the store may be gone with failed peers
        pass


def missing_ranks(buffer, members: List[int], name: str, seq: int) -> Optional[List[int]]:
    """-> the Buffer-group ranks among `members` that did not sign the roll of collective `seq`
    of `name`, or None when the store cannot tell."""
    store = _store()
    if store is None:
        return None
    prefix = _roll_prefix(buffer, name, seq)
    try:
        store.set(prefix + str(buffer.rank), "stuck")
        deadline = time.monotonic() + GRACE_S
        while True:
            signed = {r for r in members if store.check([prefix + str(r)])}
            if len(signed) == len(members) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store itself may be gone with the failed peers
        return None
    return [r for r in members if r not in signed]


def _reason_key(buffer, rank: int, call: str) -> str:
    return f"moe_comm/reason/{buffer.uid}/{rank}/{call}"


def post_reason(buffer, reason: str) -> None:
    """Leaves why this rank gave up on its current call (a combine input it rejected on its
    own), for its peers' errors to quote. Keyed by the call (`buffer.call`: every rank numbers
    its calls alike), so a later call never quotes it and nothing needs clearing; written only
    on that error path."""
    store = _store()
    if store is None:
        return
    try:
        store.set(_reason_key(buffer, buffer.rank, buffer.call), reason)
    except Exception:  # noqa: BLE001 - best effort: the peers' error then names the rank only
        pass


def posted_reason(buffer, rank: int, call: Optional[str] = None) -> Optional[str]:
    """What `rank` posted in `call` (default: the call this rank is in), if anything."""
    store = _store()
    if store is None:
        return None
    try:
        key = _reason_key(buffer, rank, call or buffer.call)
        return store.get(key).decode() if store.check([key]) else None
    except Exception:  # noqa: BLE001
        return None
