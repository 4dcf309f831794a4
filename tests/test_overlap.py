"""async_op=True (README: Overlap): dispatch and combine return before their exchange ends and
.wait() gives what the synchronous call gives, gradients included; several calls may be in
flight on one Buffer (two micro-batches), and a synchronous call made meanwhile queues behind
them; errors come out of .wait() on every rank, and the Buffer keeps working."""

import time

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import Case, all_inputs
from tests.checks import assert_dispatch_equal
from tests.distributed import run_distributed


def _roundtrip(buf, x, idx, w, async_op, **kwargs):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    call = moe_comm.dispatch(x, idx, w, buf, async_op=async_op, **kwargs)
    recv_x, recv_w, counts, handle = call.wait() if async_op else call
    call = moe_comm.combine(recv_x * 2 + 1, handle, w, async_op=async_op)
    y = call.wait() if async_op else call
    (y.float().square().sum() + recv_w.sum()).backward()
    return recv_x.detach(), recv_w.detach(), counts, y.detach(), x.grad, w.grad


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def _overlap_worker(rank, world_size, ranks_per_node):
    E = 2 * world_size
    buf = moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node)
    cases = [Case(world_size, E, 2, 6, "bfloat16", "masked", (9, 0, 4), seed=s) for s in (1, 2)]
    inputs = [all_inputs(c) for c in cases]
    expected = [_roundtrip(buf, xs[rank], idxs[rank], ws[rank], False) for xs, idxs, ws in inputs]

    # One call in flight while this thread computes: the same results.
    assert _same(_roundtrip(buf, *(t[rank] for t in inputs[0]), True), expected[0])

    # Two micro-batches in flight, joined in the other order; a synchronous call queued behind.
    (xa, ia, wa), (xb, ib, wb) = ((xs[rank], idxs[rank], ws[rank]) for xs, idxs, ws in inputs)
    xa, wa = xa.clone().requires_grad_(True), wa.clone().requires_grad_(True)
    xb, wb = xb.clone().requires_grad_(True), wb.clone().requires_grad_(True)
    first = moe_comm.dispatch(xa, ia, wa, buf, async_op=True)
    second = moe_comm.dispatch(xb, ib, wb, buf, async_op=True)
    meanwhile = torch.randn(64, 64) @ torch.randn(64, 64)  # the caller's own work
    synced = moe_comm.dispatch(xa.detach(), ia, wa.detach(), buf)  # after both, on every rank
    recv_b, recv_wb, _, handle_b = second.wait()
    recv_a, recv_wa, _, handle_a = first.wait()
    assert second.done() and first.done() and meanwhile.shape == (64, 64)
    assert torch.equal(synced[0], recv_a)
    y_b = moe_comm.combine(recv_b * 2 + 1, handle_b, wb, async_op=True)
    y_a = moe_comm.combine(recv_a * 2 + 1, handle_a, wa, async_op=True)
    y_a, y_b = y_a.wait(), y_b.wait()
    (y_a.float().square().sum() + recv_wa.sum()).backward()
    (y_b.float().square().sum() + recv_wb.sum()).backward()
    assert _same((recv_a, recv_wa, y_a.detach(), xa.grad, wa.grad), [expected[0][i] for i in (0, 1, 3, 4, 5)])
    assert _same((recv_b, recv_wb, y_b.detach(), xb.grad, wb.grad), [expected[1][i] for i in (0, 1, 3, 4, 5)])
    xs, idxs, ws = inputs[0]
    assert_dispatch_equal((recv_a.detach(), recv_wa.detach(), expected[0][2]),
                          reference.dispatch_all(xs, idxs, ws, E)[rank])
    buf.close()
    return True


@pytest.mark.parametrize("world_size,ranks_per_node", [(1, 1), (2, 2), (4, 2)])
def test_async_calls_give_the_synchronous_results(world_size, ranks_per_node):
    assert run_distributed(world_size, _overlap_worker, ranks_per_node) == [True] * world_size


def _errors_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4, timeout=30)
    gen = torch.Generator().manual_seed(rank)
    x, w = torch.randn(6, 4, generator=gen), torch.rand(6, 2, generator=gen)
    idx = torch.rand(6, 4, generator=gen).argsort(dim=1)[:, :2]
    good = _roundtrip(buf, x, idx, w, False)
    # A bad input on rank 1: the call still goes out in order; every rank raises from wait().
    bad_x = x.double() if rank == 1 else x
    pending = moe_comm.dispatch(bad_x, idx, w, buf, async_op=True)
    if rank == 1:
        with pytest.raises(TypeError, match=r"^x: dtype must be"):
            pending.wait()
    else:
        with pytest.raises(RuntimeError, match=r"^dispatch: rank 1 rejected its argument 'x'"):
            pending.wait()
    with pytest.raises(ValueError, match=r"^previous_event: a CUDA event only orders a CUDA Buffer's calls"):
        moe_comm.dispatch(x, idx, w, buf, async_op=True, previous_event=object())
    assert _same(_roundtrip(buf, x, idx, w, True), good)  # still usable
    buf.close()
    return True


def test_async_errors_come_out_of_wait_on_every_rank():
    assert run_distributed(2, _errors_worker) == [True, True]


def _overlap_timing_worker(rank, world_size):
    """The exchange really runs while the caller works: a rank that is late to a dispatch keeps
    its peer's async call open, and the peer's thread is free meanwhile."""
    buf = moe_comm.Buffer(num_experts=4)
    x, w = torch.randn(8, 4), torch.rand(8, 2)
    idx = torch.arange(8).unsqueeze(1).repeat(1, 2) % 4
    idx[:, 1] = (idx[:, 0] + 1) % 4
    if rank == 1:
        time.sleep(2.0)
    start = time.monotonic()
    pending = moe_comm.dispatch(x, idx, w, buf, async_op=True)
    returned = time.monotonic() - start  # this thread is free from here on
    pending.wait()
    waited = time.monotonic() - start
    buf.close()
    return returned, waited


def test_async_dispatch_returns_before_its_peers_arrive():
    (returned, waited), _ = run_distributed(2, _overlap_timing_worker)
    assert returned < 0.5 and waited > 1.0  # rank 0 got its thread back at once, its rows later
