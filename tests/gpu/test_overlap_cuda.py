"""async_op on CUDA (README: Overlap): a Buffer's calls on a side stream of their own, waiting
for an event of the caller's; .wait() orders the caller's stream after them. The results equal
the synchronous calls', two micro-batches in flight included. Two ranks on one GPU."""

import pytest
import torch

import moe_comm
from tests.distributed import run_distributed
from tests.gpu.one_gpu import become_own_host
from tests.gpu import marks

pytestmark = marks.EXCHANGES


def _inputs(rank, seed, E):
    gen = torch.Generator().manual_seed(seed * 7 + rank)
    x = torch.randn(48, 96, generator=gen).to(torch.bfloat16)
    idx = torch.rand(48, E, generator=gen).argsort(dim=1)[:, :3]
    return x.cuda(), idx.cuda(), torch.rand(48, 3, generator=gen).cuda()


def _roundtrip(buf, x, idx, w):
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idx, w, buf)
    return recv_x, recv_w, moe_comm.combine(recv_x * 2, handle, w)


def _overlap_worker(rank, world_size):
    become_own_host(rank)
    E = 4 * world_size
    buf = moe_comm.Buffer(num_experts=E, device="cuda", timeout=120)
    batches = [_inputs(rank, s, E) for s in (1, 2)]
    comm = torch.cuda.Stream()
    with torch.cuda.stream(comm):
        expected = [_roundtrip(buf, *b) for b in batches]
    torch.cuda.current_stream().wait_stream(comm)

    ready = torch.cuda.Event()
    ready.record()
    with torch.cuda.stream(comm):
        first = moe_comm.dispatch(*batches[0], buf, async_op=True, previous_event=ready)
        second = moe_comm.dispatch(*batches[1], buf, async_op=True)
    meanwhile = torch.randn(512, 512, device="cuda") @ torch.randn(512, 512, device="cuda")
    outs = []
    for pending, (x, idx, w) in ((second, batches[1]), (first, batches[0])):
        recv_x, recv_w, _, handle = pending.wait()  # the default stream now follows comm
        expert_y = recv_x * 2  # the experts, on the default stream
        comm.wait_stream(torch.cuda.current_stream())
        expert_y.record_stream(comm)  # made on the default stream, read on comm (torch's rule)
        with torch.cuda.stream(comm):
            y = moe_comm.combine(expert_y, handle, w, async_op=True)
        outs.append((recv_x, recv_w, y.wait()))
    torch.cuda.synchronize()
    for got, want in zip(reversed(outs), expected):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert meanwhile.shape == (512, 512)
    buf.close()
    return True


@pytest.mark.parametrize("world_size", [1, 2])
def test_async_calls_on_a_side_stream_give_the_synchronous_results(world_size):
    assert run_distributed(world_size, _overlap_worker, timeout=600) == [True] * world_size
