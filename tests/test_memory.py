"""Memory: wire buffers are reused across calls, and a call allocates nothing of size
tokens x top-k x hidden beyond its outputs (measured with torch's profiler, which sees every
CPU tensor allocation, ours included)."""

import torch
from torch.profiler import ProfilerActivity, profile

import moe_comm
from tests.distributed import run_distributed

T, H, K, E = 256, 512, 6, 8


def _allocated_bytes(fn):
    """-> (fn's result, bytes allocated inside fn: an upper bound of its peak extra memory)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def _memory_worker(rank, world_size, ranks_per_node):
    buf = moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    w = torch.rand(T, K, generator=gen, requires_grad=True)

    def step():
        recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idx, w, buf)
        y = moe_comm.combine(recv_x * 1.0, handle, w)
        (y.sum() + recv_w.sum()).backward()
        return recv_x, handle

    step()  # first call sizes the workspaces
    held = buf.workspace_bytes
    for _ in range(3):
        step()
    assert buf.workspace_bytes == held, "workspaces grew for the same shapes"

    (recv_x, recv_w, counts, handle), dispatch_alloc = _allocated_bytes(lambda: moe_comm.dispatch(x, idx, w, buf))
    R, N = recv_x.shape[0], handle.row_map.shape[0]
    bookkeeping = 64 * (T + N + R) * K + (1 << 20)  # int64 plans, maps and weights
    big = T * K * H * 4  # one tokens x top-k x hidden temporary
    outputs = recv_x.numel() * 4 + recv_w.numel() * 4
    assert dispatch_alloc <= outputs + bookkeeping < outputs + big, (dispatch_alloc, outputs, bookkeeping)

    expert_y = recv_x.detach().clone().requires_grad_()
    y, combine_alloc = _allocated_bytes(lambda: moe_comm.combine(expert_y, handle, w))
    assert combine_alloc <= y.numel() * 4 + bookkeeping, (combine_alloc, y.numel() * 4)

    _, backward_alloc = _allocated_bytes(lambda: y.sum().backward())
    grads = expert_y.numel() * 4 + w.numel() * 4 + y.numel() * 4  # grad_expert_y, grad_w, ones_like(y)
    assert backward_alloc <= grads + bookkeeping, (backward_alloc, grads)
    return held


def test_calls_allocate_only_their_outputs_and_reuse_wire_buffers():
    flat = run_distributed(2, _memory_worker, 2)
    hier = run_distributed(4, _memory_worker, 2)
    assert all(b > 0 for b in flat + hier)
