"""The roll call never hangs a failing rank: a store that does not answer (its host cut off) is
given up after a few seconds, and the CommError says so instead of naming peers."""

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


@pytest.fixture
def dead_store(monkeypatch):
    store = _DeadStore()
    monkeypatch.setattr(roll_call, "default_store", lambda: store)
    monkeypatch.setattr(roll_call, "roll_call_store", lambda: store)
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
    assert "nor did the store at MASTER_ADDR" in str(err) and "gloo timed out" in str(err)


def test_reasons_and_signatures_give_up_too(dead_store):
    started = time.monotonic()
    assert roll_call.posted_reason(_buffer(), 0) is None
    roll_call.sign_roll(_buffer(), "dispatch/inter_node", 4)  # a send: returns at once
    roll_call.post_reason(_buffer(), "why")
    assert time.monotonic() - started < 2.0


def test_a_healthy_store_still_names_the_missing_rank(monkeypatch):
    import torch.distributed as dist
    store = dist.HashStore()
    monkeypatch.setattr(roll_call, "default_store", lambda: store)
    monkeypatch.setattr(roll_call, "roll_call_store", lambda: store)
    monkeypatch.setattr(roll_call, "GRACE_S", 0.2)
    buf = _buffer()
    roll_call.sign_roll(types.SimpleNamespace(**{**vars(buf), "rank": 2}), "combine/intra_node", 7)
    assert roll_call.missing_ranks(buf, [0, 1, 2], "combine/intra_node", 7) == [0]
