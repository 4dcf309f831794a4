"""Memory: wire buffers are reused across calls, and a call allocates nothing of size
tokens x top-k x hidden beyond its outputs (measured with torch's profiler, which sees every
CPU tensor allocation, ours included)."""

import torch
from torch.profiler import ProfilerActivity, profile

import moe_comm
from tests.distributed import run_distributed

T, H, K, E = 256, 512, 6, 8


def _profiled(fn):
    """-> (fn's result, the profiler's events of fn: every CPU tensor allocation and free)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, prof.events()


def _allocated_bytes(fn):
    """-> (fn's result, bytes allocated inside fn: an upper bound of its peak extra memory)."""
    out, events = _profiled(fn)
    return out, sum(e.self_cpu_memory_usage for e in events if e.self_cpu_memory_usage > 0)


def _inputs(rank):
    """-> x [T, H], topk_idx [T, K] (distinct experts), topk_weights [T, K]: this rank's."""
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=gen, requires_grad=True)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    return x, idx, torch.rand(T, K, generator=gen, requires_grad=True)


def _memory_worker(rank, world_size, ranks_per_node):
    buf = moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node)
    x, idx, w = _inputs(rank)

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


def _peak_bytes(fn):
    """-> (fn's result, the peak of the bytes fn holds allocated, frees counted in time order)."""
    out, events = _profiled(fn)
    changes = []
    for e in events:
        if e.name == "[memory]":  # a free (or an allocation) outside any op
            changes.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage:
            changes.append((e.time_range.start, e.self_cpu_memory_usage))
    live = peak = 0
    for _, change in sorted(changes, key=lambda c: c[0]):
        live += change
        peak = max(peak, live)
    return out, peak


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _static_memory_worker(rank, world_size):
    """The static mode's calls hold, at their peak, their outputs and at most 10% more (plans,
    maps): its fixed-size exchanges live in the Buffer's reused workspaces."""
    buf = moe_comm.Buffer(num_experts=E, max_tokens_per_rank=T)
    x, idx, w = _inputs(rank)

    def dispatch():
        return moe_comm.dispatch(x, idx, w, buf, capacity_factor=1.0, pad_to_capacity=True)

    for _ in range(2):  # the first call reads its headers and sizes the workspaces
        recv_x, recv_w, _, handle = dispatch()
        moe_comm.combine(recv_x * 1.0, handle, w).sum().backward()
    held = buf.workspace_bytes
    (recv_x, recv_w, counts, handle), dispatch_peak = _peak_bytes(dispatch)
    expert_y = recv_x.detach().clone().requires_grad_()
    y, combine_peak = _peak_bytes(lambda: moe_comm.combine(expert_y, handle, w))
    _, backward_peak = _peak_bytes(lambda: y.backward(torch.ones_like(y)))
    _, dispatch_backward_peak = _peak_bytes(lambda: recv_x.backward(torch.ones_like(recv_x)))
    small = 64 << 10  # a few tiny tensors (counts, headers) round up to allocator blocks
    peaks = {"dispatch": (dispatch_peak, _nbytes(recv_x, recv_w, counts)),
             "combine": (combine_peak, _nbytes(y)),
             "combine backward": (backward_peak, _nbytes(expert_y, w, y)),  # the gradients, ones
             "dispatch backward": (dispatch_backward_peak, _nbytes(x, recv_x))}
    for call, (peak, outputs) in peaks.items():
        assert peak <= 1.10 * outputs + small, (call, peak, outputs)
    assert buf.workspace_bytes == held
    return {call: peak / outputs for call, (peak, outputs) in peaks.items()}, held


def test_static_mode_calls_hold_little_beyond_their_outputs():
    for ratios, held in run_distributed(2, _static_memory_worker):
        assert held > 0 and all(r <= 1.10 for r in ratios.values()), ratios
