"""The roll call never hangs a failing rank: a store that does not answer (its host cut off) is
given up after a few seconds, and the CommError says so instead of naming peers. A missing
rank that was itself stuck in another stage is said to be (a cascade of waits), unless that
was long ago."""

import threading
import time
import types

import pytest

from moe_comm import roll_call, transport


class _DeadStore:
    """Sends go out; a reply never comes (a link that went down under an open connection)."""

    def __init__(self):
        self.forever = threading.Event()

    def set(self, key, value):
        pass

    def check(self, keys):
        self.forever.wait()

    def get(self, key):
        self.forever.wait()


def _use(monkeypatch, store):
    """The roll call talks to `store`, which has not failed yet."""
    monkeypatch.setattr(roll_call, "default_store", lambda: store)
    monkeypatch.setattr(roll_call, "roll_call_store", lambda: store)
    monkeypatch.setattr(roll_call, "_STORE_DEAD_UNTIL", [0.0])


@pytest.fixture
def dead_store(monkeypatch):
    store = _DeadStore()
    _use(monkeypatch, store)
    monkeypatch.setattr(roll_call, "STORE_ANSWER_S", 0.5)
    yield store
    store.forever.set()  # lets the helper threads end


def _buffer():
    return types.SimpleNamespace(uid="0-1#0", rank=1, world_size=2, timeout=20.0, call="dispatch#3")


def test_a_dead_store_is_given_up_and_the_error_says_so(dead_store):
    started = time.monotonic()
    err = transport.comm_error(_buffer(), [0, 1], "dispatch/inter_node", 4, RuntimeError("gloo timed out"))
    assert time.monotonic() - started < roll_call.GRACE_S + 3.0 + 1.0  # the default answer limit, not forever
    assert isinstance(err, transport.CommError)
    assert "rank 1 of 2 failed in stage 'dispatch/inter_node'" in str(err)
    assert "the process group's store did not answer either" in str(err) and "gloo timed out" in str(err)


def test_reasons_and_signatures_give_up_too(dead_store):
    started = time.monotonic()
    assert roll_call.posted_reason(_buffer(), 0) is None  # waits STORE_ANSWER_S (0.5 s here)
    for rank in range(16):  # then the store counts as dead for a while: no wait per key
        assert roll_call.posted_reason(_buffer(), rank) is None
    roll_call.sign_roll(_buffer(), "dispatch/inter_node", 4)
    roll_call.post_reason(_buffer(), "why")
    assert time.monotonic() - started < 1.5


class _BrokenStore(_DeadStore):
    def check(self, keys):
        raise RuntimeError()  # an error without a message


def test_a_store_error_without_a_message_is_still_a_comm_error(monkeypatch):
    store = _BrokenStore()
    _use(monkeypatch, store)
    err = transport.comm_error(_buffer(), [0, 1], "combine/intra_node", 1, RuntimeError("x"))
    assert isinstance(err, transport.CommError) and "did not answer either" in str(err)
    assert roll_call.posted_reason(_buffer(), 0) is None


def test_a_healthy_store_still_names_the_missing_rank(monkeypatch):
    import torch.distributed as dist
    store = dist.HashStore()
    _use(monkeypatch, store)
    monkeypatch.setattr(roll_call, "GRACE_S", 0.2)
    buf = _buffer()
    roll_call.sign_roll(types.SimpleNamespace(**{**vars(buf), "rank": 2}), "combine/intra_node", 7)
    assert roll_call.missing_ranks(buf, [0, 1, 2], "combine/intra_node", 7) == [0]


def test_a_missing_rank_stuck_elsewhere_is_said_to_be(monkeypatch):
    import torch.distributed as dist
    store = dist.HashStore()
    _use(monkeypatch, store)
    monkeypatch.setattr(roll_call, "GRACE_S", 0.2)
    me, peer, stale = _buffer(), types.SimpleNamespace(**{**vars(_buffer()), "rank": 0}), time.time() - 60
    roll_call.sign_roll(peer, "dispatch/inter_node", 2)  # rank 0 is stuck there, since now
    err = str(transport.comm_error(me, [0, 1], "dispatch/intra_node", 5, RuntimeError("waited")))
    assert "rank 0 did not arrive within 20s; rank 0 was itself stuck in stage 'dispatch/inter_node'" in err, err
    store.set(f"moe_comm/waiting/{me.uid}/0", f"dispatch/inter_node@{int(stale * 1000)}")  # a minute ago
    err = str(transport.comm_error(me, [0, 1], "dispatch/intra_node", 6, RuntimeError("waited")))
    assert "rank 0 did not arrive within 20s)" in err and "stuck" not in err, err
    assert roll_call.waiting_in(me, 1) == "dispatch/intra_node"  # where this rank failed, for its peers


class _SlowStore(_DeadStore):
    def check(self, keys):
        time.sleep(0.2)  # answers, slowly (a large group polling one store)
        return keys[0].endswith("/2")


def test_a_slow_store_is_not_called_dead(monkeypatch):
    store = _SlowStore()
    _use(monkeypatch, store)
    monkeypatch.setattr(roll_call, "GRACE_S", 0.1)
    monkeypatch.setattr(roll_call, "STORE_ANSWER_S", 0.3)
    # Past the roll's deadline with members left to check: the ones the store said had not
    # signed (the first one or two it had time for), no error, and no rank named unchecked.
    missing = roll_call.missing_ranks(_buffer(), list(range(8)), "dispatch/intra_node", 3)
    assert missing and missing == [0, 1, 3, 4, 5, 6, 7][:len(missing)] and len(missing) < 4, missing
