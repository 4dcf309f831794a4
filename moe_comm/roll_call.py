"""Who never arrived: a rank whose host collective is still running after a second signs a
roll in the default process group's key-value store (transport.SIGN_AFTER_S), and so does a
rank whose collective fails; after a short grace, the members that did not sign are the ones
that never reached it (dead, hung, or elsewhere in their program). A peer that arrived late
but is stuck too has signed long before anyone's timeout ends, so it is never named. Nothing
is written on the happy path; each rank numbers the collectives of each stage in the same
order, so the roll of one collective never mixes with another's (keys carry the Buffer's
uid, which names its group's ranks).

Every store operation here runs on a helper thread and is given up after STORE_ANSWER_S: a
store client's timeout does not bound its replies (a `check` on a dead link waited for the
process group's 30 minutes), and a rank cut off from the store's host must still raise within
its own timeout and a few seconds, its error saying the store did not answer. Signing from
C++ (gloo_transport.cpp) is a store `set`, which sends and never waits for a reply."""

import threading
import time
from typing import Callable, List, Optional

from .groups import default_store, forget_roll_call_store, roll_call_store

GRACE_S = 1.5  # how long the first rank to fail waits for its stuck peers to sign
STORE_ANSWER_S = 3.0  # how long one roll-call store operation may take


class StoreUnreachable(RuntimeError):
    """The roll call's store did not answer: this rank may be cut off from the store's host."""


def _bounded(op: Callable, seconds: Optional[float] = None):
    """op(store) on a helper thread, given up after `seconds` (default STORE_ANSWER_S) with
    StoreUnreachable, the client it is stuck in dropped. -> op's result, or None without a
    default store."""
    if default_store() is None:
        return None
    seconds = STORE_ANSWER_S if seconds is None else seconds
    done = {}

    def run():
        try:
            done["value"] = op(roll_call_store())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done["error"] = exc

    helper = threading.Thread(target=run, name="moe_comm-roll-call", daemon=True)
    helper.start()
    helper.join(seconds)
    if helper.is_alive():
        forget_roll_call_store()
        raise StoreUnreachable(f"the store did not answer within {seconds:g}s")
    if "error" in done:
        raise StoreUnreachable(str(done["error"]).splitlines()[0] or type(done["error"]).__name__)
    return done.get("value")


def _roll_prefix(buffer, name: str, seq: int) -> str:
    return f"moe_comm/roll/{buffer.uid}/{name}/{seq}/"


def sign_roll(buffer, name: str, seq: int) -> None:
    """This rank reached collective `seq` of `name` (best effort)."""
    try:
        _bounded(lambda store: store.set(_roll_prefix(buffer, name, seq) + str(buffer.rank), "arrived"))
    except StoreUnreachable:  # the store may be gone with failed peers
        pass


def missing_ranks(buffer, members: List[int], name: str, seq: int) -> Optional[List[int]]:
    """-> the Buffer-group ranks among `members` that did not sign the roll of collective `seq`
    of `name`, or None without a store. Raises StoreUnreachable when the store did not answer."""
    prefix = _roll_prefix(buffer, name, seq)

    def roll(store):
        store.set(prefix + str(buffer.rank), "stuck")
        deadline = time.monotonic() + GRACE_S
        while True:
            signed = {r for r in members if store.check([prefix + str(r)])}
            if len(signed) == len(members) or time.monotonic() > deadline:
                return [r for r in members if r not in signed]
            time.sleep(0.05)

    return _bounded(roll, GRACE_S + STORE_ANSWER_S)


def _reason_key(buffer, rank: int, call: str) -> str:
    return f"moe_comm/reason/{buffer.uid}/{rank}/{call}"


def post_reason(buffer, reason: str) -> None:
    """Leaves why this rank gave up on its current call (a combine input it rejected on its
    own), for its peers' errors to quote. Keyed by the call (`buffer.call`: every rank numbers
    its calls alike), so a later call never quotes it and nothing needs clearing; written only
    on that error path."""
    try:
        _bounded(lambda store: store.set(_reason_key(buffer, buffer.rank, buffer.call), reason))
    except StoreUnreachable:  # best effort: the peers' error then names the rank only
        pass


def posted_reason(buffer, rank: int, call: Optional[str] = None) -> Optional[str]:
    """What `rank` posted in `call` (default: the call this rank is in), if anything."""
    key = _reason_key(buffer, rank, call or buffer.call)
    try:
        return _bounded(lambda store: store.get(key).decode() if store.check([key]) else None)
    except StoreUnreachable:
        return None
