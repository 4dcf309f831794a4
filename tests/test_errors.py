"""Bad input gets an error naming the argument on the rank that passed it, and the peers learn
which rank rejected what instead of hanging; the Buffer keeps working afterwards."""

import time

import pytest
import torch

import moe_comm
from tests.distributed import SHM, requires_shared_memory, run_distributed


def _good(rank, H=4, T=5, K=2, E=4):
    gen = torch.Generator().manual_seed(rank)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    return torch.randn(T, H, generator=gen), idx, torch.rand(T, K, generator=gen)


def _expect(fn, exc_type, match):
    with pytest.raises(exc_type, match=match):
        fn()


BAD_INPUTS = {
    # name: (transform of (x, idx, w) on the bad rank, error type there, message there, argument)
    "x dtype": (lambda x, i, w: (x.double(), i, w), TypeError, r"^x: dtype must be", "x"),
    "x dims": (lambda x, i, w: (x[0], i, w), ValueError, r"^x: must be 2-D", "x"),
    "x device": (lambda x, i, w: (x.to("meta"), i, w), ValueError, r"^x: must be on the Buffer's device cpu", "x"),
    "idx dtype": (lambda x, i, w: (x, i.float(), w), TypeError, r"^topk_idx: dtype", "topk_idx"),
    "idx rows": (lambda x, i, w: (x, i[1:], w), ValueError, r"^topk_idx: must be \[tokens, k\]", "topk_idx"),
    "idx no slots": (lambda x, i, w: (x, i[:, :0], None), ValueError, r"^topk_idx: must have at least one slot", "topk_idx"),
    "idx range": (lambda x, i, w: (x, i.index_fill(0, torch.tensor([2]), 4), w), ValueError,
                  r"topk_idx\[2, 0\] = 4 is out of range \[-1, 4\)", "topk_idx"),
    "idx below -1": (lambda x, i, w: (x, i.index_fill(0, torch.tensor([1]), -2), w), ValueError,
                     r"topk_idx\[1, 0\] = -2 is out of range", "topk_idx"),
    "idx duplicate": (lambda x, i, w: (x, torch.cat([i[:, :1], i[:, :1]], 1), w), ValueError,
                      r"expert \d+ appears twice in row 0", "topk_idx"),
    "weights dtype": (lambda x, i, w: (x, i, w.half()), TypeError, r"^topk_weights: dtype must be float32", "topk_weights"),
    "weights shape": (lambda x, i, w: (x, i, w[:, :1]), ValueError, r"^topk_weights: must be \[5, 2\], the shape of topk_idx", "topk_weights"),
}


def _bad_input_worker(rank, world_size, transport="auto"):
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size, cpu_transport=transport)
    bad_rank = 1
    for name, (transform, exc_type, match, argument) in BAD_INPUTS.items():
        x, idx, w = _good(rank)
        if rank == bad_rank:
            x, idx, w = transform(x, idx, w)
            _expect(lambda: moe_comm.dispatch(x, idx, w, buf), exc_type, match)
        else:
            _expect(lambda: moe_comm.dispatch(x, idx, w, buf), RuntimeError,
                    rf"rank {bad_rank} rejected its argument '{argument}'")
        # The Buffer still works for the next call.
        x, idx, w = _good(rank)
        recv_x, _, counts, handle = moe_comm.dispatch(x, idx, w, buf)
        assert moe_comm.combine(recv_x, handle).shape == x.shape, name

    # Ranks that disagree on the call: every rank names the mismatch.
    x, idx, w = _good(rank, H=4 + rank)
    _expect(lambda: moe_comm.dispatch(x, idx, w, buf), ValueError, r"x: hidden size is \d on rank \d but \d on rank \d")
    x, idx, w = _good(rank, K=1 + rank)
    _expect(lambda: moe_comm.dispatch(x, idx, w, buf), ValueError, r"topk_idx: k is \d on rank")
    x, idx, w = _good(rank)
    _expect(lambda: moe_comm.dispatch(x.to([torch.float32, torch.bfloat16][rank]), idx, w, buf), ValueError, "dtype")

    # int32 indices are accepted and give the same result as int64.
    x, idx, w = _good(rank)
    a = moe_comm.dispatch(x, idx.int(), w, buf)
    b = moe_comm.dispatch(x, idx, w, buf)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    # combine checks its inputs locally (every rank passes the same bad thing here).
    recv_x, recv_w, counts, handle = b
    _expect(lambda: moe_comm.combine(recv_x[1:], handle), ValueError, r"^expert_y: must be \[R, H\]")
    _expect(lambda: moe_comm.combine(recv_x.double(), handle), TypeError, r"^expert_y: dtype must match")
    _expect(lambda: moe_comm.combine(recv_x, handle, w[:, :1]), ValueError, r"^topk_weights: must be \[5, 2\], \[T, K\] as at dispatch")
    _expect(lambda: moe_comm.combine(recv_x, "handle"), TypeError, r"^handle: must be the handle")
    assert moe_comm.combine(recv_x, handle, w).shape == x.shape
    return True


@pytest.mark.parametrize("transport", [SHM, "gloo"])
def test_bad_input_raises_on_every_rank_and_buffer_survives(transport):
    assert run_distributed(2, _bad_input_worker, transport) == [True, True]


def _buffer_args_worker(rank, world_size):
    _expect(lambda: moe_comm.Buffer(num_experts=3), ValueError, r"num_experts=3 must be divisible by the group size 2")
    _expect(lambda: moe_comm.Buffer(num_experts=0), ValueError, r"num_experts must be a positive int")
    _expect(lambda: moe_comm.Buffer(num_experts=4, ranks_per_node=3), ValueError, r"ranks_per_node=3 must be positive and divide")
    _expect(lambda: moe_comm.Buffer(num_experts=4, hierarchical="yes"), ValueError, r"hierarchical must be")
    _expect(lambda: moe_comm.Buffer(num_experts=4, timeout=-1), ValueError, r"timeout must be")
    _expect(lambda: moe_comm.Buffer(num_experts=4, timeout=True), ValueError, r"timeout must be")
    _expect(lambda: moe_comm.Buffer(group="world", num_experts=4), TypeError, r"^group: must be a torch.distributed")
    _expect(lambda: moe_comm.Buffer(num_experts=4, combine_status="yes"), ValueError, r"combine_status must be")
    _expect(lambda: moe_comm.Buffer(num_experts=4, cpu_transport="tcp"), ValueError, r"cpu_transport must be one of")
    _expect(lambda: moe_comm.Buffer(num_experts=4, device="meta"), ValueError, r"^device: must be a CPU or CUDA device")
    if not torch.cuda.is_available():
        _expect(lambda: moe_comm.Buffer(num_experts=4, device="cuda"), ValueError, r"^device: cuda requested")
        _expect(lambda: moe_comm.Buffer(num_experts=4, device=3), ValueError, r"^device: ")
    buf = moe_comm.Buffer(num_experts=4)
    assert buf.device == torch.device("cpu")
    assert buf.topology.ranks_per_node == 2  # same host name for both ranks
    return True


def test_buffer_rejects_bad_arguments():
    assert run_distributed(2, _buffer_args_worker) == [True, True]


def _timeout_worker(rank, world_size, transport="auto"):
    buf = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size, timeout=2, cpu_transport=transport)
    if rank == 1:
        time.sleep(8)  # never joins the dispatch
        return "absent"
    x, idx, w = _good(rank, E=6)
    start = time.monotonic()
    with pytest.raises(moe_comm.CommError, match=rf"rank {rank} of 3 failed in stage 'dispatch/flat/header' "
                                                 r"\(rank 1 did not arrive within 2s\)"):
        moe_comm.dispatch(x, idx, w, buf)
    return time.monotonic() - start


@pytest.mark.parametrize("transport", [SHM, "gloo"])
def test_missing_peer_ends_in_timeout_naming_rank_stage_and_missing_rank(transport):
    first, _, third = run_distributed(3, _timeout_worker, transport)
    assert 1.5 < first < 7.5 and 1.5 < third < 7.5


BAD_COMBINE_INPUTS = {
    # name: (bad (expert_y, weights) from good ones, error type there, message there, argument)
    "expert_y rows": (lambda y, w: (y[:, :1], w), ValueError, r"^expert_y: must be \[R, H\]", "expert_y"),
    "expert_y dtype": (lambda y, w: (y.double(), w), TypeError, r"^expert_y: dtype must match", "expert_y"),
    "expert_y type": (lambda y, w: (y.tolist(), w), TypeError, r"^expert_y: must be a torch.Tensor", "expert_y"),
    "weights shape": (lambda y, w: (y, w[:, :1]), ValueError, r"^topk_weights: must be \[5, 2\]", "topk_weights"),
    # A reinterpretation of the same weights: the bad rank takes its peers' path (reuse or resend).
    "weights dtype": (lambda y, w: (y, w.view(torch.int32)), TypeError, r"^topk_weights: dtype must be float32",
                      "topk_weights"),
}


def _bad_combine_calls(rank, bad_rank, recv_x, w):
    """Every bad combine input, with the dispatch weights and with new ones (whose exchange comes
    first): -> (case name, expert_y, weights, error type, message, argument) for this rank."""
    for name, (transform, exc_type, match, argument) in BAD_COMBINE_INPUTS.items():
        for weights in (w, w * 2):
            y, ww = transform(recv_x, weights) if rank == bad_rank else (recv_x, weights)
            yield name, y, ww, exc_type, match, argument


def combine_one_bad_rank(rank, buf, bad_rank, good_inputs):
    """Every bad combine input on bad_rank alone: every rank raises in that combine, then the
    Buffer works. -> cases run."""
    x, idx, w = good_inputs(rank)
    recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf)
    expected = moe_comm.combine(recv_x, handle, w)
    for name, y, ww, exc_type, match, argument in _bad_combine_calls(rank, bad_rank, recv_x, w):
        if rank == bad_rank:
            _expect(lambda: moe_comm.combine(y, handle, ww), exc_type, match)
        else:
            _expect(lambda: moe_comm.combine(y, handle, ww), RuntimeError,
                    rf"^combine: rank {bad_rank} rejected its argument '{argument}'; nothing was combined "
                    rf"\(rank {bad_rank} reported: combine rejected its argument '{argument}': {match[1:]}")
        assert torch.equal(moe_comm.combine(recv_x, handle, w), expected), name  # still in step
    return len(BAD_COMBINE_INPUTS)


def combine_one_bad_rank_deferred(rank, buf, bad_rank, good_inputs):
    """The same cases with Buffer(combine_status="deferred"): the bad rank raises its own error
    in combine, the others return (no host wait), and the next dispatch raises on every rank,
    naming the rank and the argument, before any token moves; then the Buffer works. -> cases."""
    assert buf.combine_status == "deferred"
    x, idx, w = good_inputs(rank)
    recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf)
    expected = moe_comm.combine(recv_x, handle, w)
    for name, y, ww, exc_type, match, argument in _bad_combine_calls(rank, bad_rank, recv_x, w):
        if rank == bad_rank:
            _expect(lambda: moe_comm.combine(y, handle, ww), exc_type, match)
        else:
            moe_comm.combine(y, handle, ww)  # returns; its result is not valid
            assert buf.counters["combine"]["host_waits"] == 0
        _expect(lambda: moe_comm.dispatch(x, idx, w, buf), RuntimeError,
                rf"^dispatch: an earlier combine failed: rank {bad_rank} rejected its argument '{argument}' "
                rf"\(rank {bad_rank} reported: combine rejected its argument '{argument}': {match[1:]}")
        recv_x2, _, _, handle2 = moe_comm.dispatch(x, idx, w, buf)  # reported once: in step again
        assert torch.equal(moe_comm.combine(recv_x2, handle2, w), expected), name
    return len(BAD_COMBINE_INPUTS)


def _deferred_combine_worker(rank, world_size, transport):
    buf = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size, timeout=20, cpu_transport=transport,
                          combine_status="deferred")
    return combine_one_bad_rank_deferred(rank, buf, 1, lambda r: _good(r, E=6))


@pytest.mark.parametrize("transport", [SHM, "gloo"])
def test_deferred_combine_status_is_reported_by_the_next_dispatch_on_every_rank(transport):
    assert run_distributed(3, _deferred_combine_worker, transport) == [len(BAD_COMBINE_INPUTS)] * 3


def _bad_combine_worker(rank, world_size, transport="auto"):
    buf = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size, timeout=20, cpu_transport=transport)
    start = time.monotonic()
    cases = combine_one_bad_rank(rank, buf, 1, lambda r: _good(r, E=6))
    # Two ranks bad at once: the peers name the lowest.
    x, idx, w = _good(rank, E=6)
    recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf)
    if rank in (0, 2):
        _expect(lambda: moe_comm.combine(recv_x[1:], handle), ValueError, r"^expert_y: must be")
    else:
        _expect(lambda: moe_comm.combine(recv_x, handle), RuntimeError,
                r"^combine: rank 0 rejected its argument 'expert_y'; nothing was combined")
    return cases, time.monotonic() - start


@pytest.mark.parametrize("transport", [SHM, "gloo"])
def test_bad_combine_on_one_rank_raises_on_every_rank_and_buffer_survives(transport):
    results = run_distributed(3, _bad_combine_worker, transport)
    assert all(cases == len(BAD_COMBINE_INPUTS) for cases, _ in results)
    assert all(elapsed < 15 for _, elapsed in results)  # statuses, not the 20 s timeout


def _bad_and_missing_in_combine_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size, timeout=2)
    x, idx, w = _good(rank, E=6)
    recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf)
    if rank == 2:
        time.sleep(6)  # never combines
        return None
    if rank == 1:  # its own error first, the missing peer as its cause
        with pytest.raises(ValueError, match=r"^expert_y: must be \[R, H\]") as info:
            moe_comm.combine(recv_x[:, :1], handle)
        assert isinstance(info.value.__cause__, moe_comm.CommError)
        return str(info.value.__cause__)
    with pytest.raises(moe_comm.CommError) as info:
        moe_comm.combine(recv_x, handle)
    return str(info.value)


def test_bad_input_and_missing_peer_in_combine():
    first, second, _ = run_distributed(3, _bad_and_missing_in_combine_worker)
    for message in (first, second):
        assert "failed in stage 'combine/flat' (rank 2 did not arrive within 2s)" in message, message


def _unchecked_combine_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size, timeout=2, combine_status=False)
    assert buf.combine_status is None
    x, idx, w = _good(rank, E=6)
    recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf)
    if rank == 1:
        with pytest.raises(ValueError, match=r"^expert_y: must be \[R, H\]"):
            moe_comm.combine(recv_x[:, :1], handle)  # raises here, before any exchange
        time.sleep(6)  # ... and stays away while the peers time out
        return None
    start = time.monotonic()
    with pytest.raises(moe_comm.CommError, match=r"failed in stage 'combine/flat' \(rank 1 did not arrive within 2s; "
                                                 r"rank 1 reported: combine rejected its argument 'expert_y'"):
        moe_comm.combine(recv_x, handle)
    return time.monotonic() - start


def test_without_combine_status_a_bad_combine_ends_peers_in_a_timeout_quoting_its_reason():
    first, _, third = run_distributed(3, _unchecked_combine_worker)
    assert first < 7.5 and third < 7.5


def _dead_peer_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size, timeout=60)
    assert buf.cpu_transport == "shm"
    if rank == 1:
        return None  # its process exits now, before the dispatch: its peer must not wait 60 s
    x, idx, w = _good(rank)
    start = time.monotonic()
    with pytest.raises(moe_comm.CommError, match=r"rank 0 of 2 failed in stage 'dispatch/flat/header'.*"
                                                 r"rank 1 \(pid \d+\) exited"):
        moe_comm.dispatch(x, idx, w, buf)
    return time.monotonic() - start


@requires_shared_memory
def test_shared_memory_notices_a_peer_that_died_at_once():
    elapsed = run_distributed(2, _dead_peer_worker)[0]
    assert elapsed < 10
