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
# After the store failed to answer, the roll call's next operations within this long give up at
# once: one error path then waits for the store once, not once per key it would read.
STORE_DEAD_FOR_S = 10.0
_STORE_DEAD_UNTIL = [0.0]


class StoreUnreachable(RuntimeError):
    """The roll call's store did not answer: this rank may be cut off from the store's host."""


def _bounded(op: Callable, seconds: Optional[float] = None):
    """op(store) on a helper thread, given up after `seconds` (default STORE_ANSWER_S) with
    StoreUnreachable; so does an operation that failed (its client is then dropped: the next
    one connects anew). -> op's result, or None without a roll-call store."""
    if default_store() is None:
        return None
    if time.monotonic() < _STORE_DEAD_UNTIL[0]:
        raise StoreUnreachable("the store did not answer a moment ago")
    seconds = STORE_ANSWER_S if seconds is None else seconds
    done = {}

    def run():
        try:
            store = roll_call_store()
            done["value"] = None if store is None else op(store)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done["error"] = exc

    helper = threading.Thread(target=run, name="moe_comm-roll-call", daemon=True)
    helper.start()
    helper.join(seconds)
    if helper.is_alive() or "error" in done:
        forget_roll_call_store()
        _STORE_DEAD_UNTIL[0] = time.monotonic() + STORE_DEAD_FOR_S
        if helper.is_alive():
            raise StoreUnreachable(f"the store did not answer within {seconds:g}s")
        error = done["error"]
        raise StoreUnreachable((str(error).splitlines() or [""])[0] or type(error).__name__) from error
    return done.get("value")


def _roll_prefix(buffer, name: str, seq: int) -> str:
    return f"moe_comm/roll/{buffer.uid}/{name}/{seq}/"


def sign_roll(buffer, name: str, seq: int) -> None:
    """This rank reached collective `seq` of `name` and is stuck there (best effort; as the
    C++ transports sign)."""
    def sign(store):
        store.set(_roll_prefix(buffer, name, seq) + str(buffer.rank), "arrived")
        _stuck_in(store, buffer, name)

    try:
        _bounded(sign)
    except StoreUnreachable:  # the store may be gone with failed peers
        pass


def missing_ranks(buffer, members: List[int], name: str, seq: int) -> Optional[List[int]]:
    """-> the Buffer-group ranks among `members` that did not sign the roll of collective `seq`
    of `name`, or None without a store. Raises StoreUnreachable when the store did not answer."""
    prefix = _roll_prefix(buffer, name, seq)
    signed, checked = set(), set()  # filled by the helper thread as the store answers

    def roll(store):
        store.set(prefix + str(buffer.rank), "stuck")
        _stuck_in(store, buffer, name)
        deadline = time.monotonic() + GRACE_S
        while True:
            for r in members:  # only the ones not yet signed: a large group's roll stays short
                if r not in signed and store.check([prefix + str(r)]):
                    signed.add(r)
                checked.add(r)
            if len(signed) == len(members) or time.monotonic() > deadline:
                return [r for r in members if r not in signed]
            time.sleep(0.05)

    try:
        return _bounded(roll, GRACE_S + STORE_ANSWER_S)
    except StoreUnreachable:
        if not checked:
            raise
        # A slow store, not a dead one: the ranks it said had not signed (never one unchecked).
        return [r for r in members if r in checked and r not in signed]


def _waiting_key(buffer, rank: int) -> str:
    return f"moe_comm/waiting/{buffer.uid}/{rank}"  # as gloo_transport.cpp sign_roll writes it


def _stuck_in(store, buffer, name: str) -> None:
    """Where this rank is stuck (or failed), and since when, in Unix ms; the C++ transports
    write the same key when they sign."""
    store.set(_waiting_key(buffer, buffer.rank), f"{name}@{int(time.time() * 1000)}")


def _read(key: str) -> Optional[str]:
    """The store's value of `key`, or None when it has none or did not answer."""
    try:
        return _bounded(lambda store: store.get(key).decode() if store.check([key]) else None)
    except StoreUnreachable:
        return None


def waiting_in(buffer, rank: int) -> Optional[str]:
    """The stage `rank` last said it was stuck in or failed in (sign_roll, missing_ranks), if it
    said so within this Buffer's timeout and a few seconds: a rank missing from one stage
    because it was waiting for someone in another. (Its age compares two hosts' clocks: a skew
    of seconds can add or hide this hint, never change what the error names.)"""
    stage, _, since_ms = (_read(_waiting_key(buffer, rank)) or "").rpartition("@")
    try:
        age_s = time.time() - int(since_ms) / 1000
    except ValueError:
        return None
    return stage if stage and age_s < buffer.timeout + 2 * STORE_ANSWER_S + GRACE_S else None


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
    return _read(_reason_key(buffer, rank, call or buffer.call))
