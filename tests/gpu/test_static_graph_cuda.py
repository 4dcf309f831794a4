"""The static mode on CUDA (README: Static mode): a layer's forward and backward through
dispatch and combine captured in one CUDA graph and replayed with new routings in place, equal
to eager; and no host wait in a static call (the engine's counters, torch's sync debug mode).
Two ranks on one GPU (tests/gpu/one_gpu.py)."""

import pytest
import torch

import moe_comm
from tests.distributed import run_distributed
from tests.gpu.one_gpu import become_own_host
from tests.gpu import marks

pytestmark = marks.EXCHANGES

T, H, K = 32, 64, 2


def _inputs(rank, world_size, seed):
    gen = torch.Generator().manual_seed(seed * 101 + rank)
    E = 4 * world_size
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    idx = (torch.rand(T, E, generator=gen) * torch.linspace(3.0, 1.0, E)).argsort(dim=1, descending=True)[:, :K]
    idx[torch.rand(T, K, generator=gen) < 0.1] = -1
    w = torch.rand(T, K, generator=gen)
    return x.cuda(), idx.cuda(), w.cuda()


def _layer_step(buf, expert_weight, x, idx, w):
    """Forward and backward of one MoE layer: -> y, grad x, grad w, grad of the expert weight."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idx, w, buf, capacity_factor=1.0, pad_to_capacity=True,
                                                       expert_alignment=8)
    expert_y = recv_x @ expert_weight
    y = moe_comm.combine(expert_y, handle, w)
    loss = y.float().square().sum() + recv_w.sum()
    gx, gw, ge = torch.autograd.grad(loss, (x, w, expert_weight))
    return y.detach(), gx, gw, ge


def _graph_worker(rank, world_size):
    become_own_host(rank)
    buf = moe_comm.Buffer(num_experts=4 * world_size, device="cuda", max_tokens_per_rank=T, timeout=120)
    assert buf.combine_status == "deferred" and buf.static_tokens(True) == T
    expert_weight = (torch.randn(H, H, generator=torch.Generator().manual_seed(3)) / H).to(torch.bfloat16).cuda()
    expert_weight.requires_grad_(True)
    static_x, static_idx, static_w = _inputs(rank, world_size, seed=0)

    # Warm up on a side stream (torch.cuda.graph's rule): the first static call reads its headers.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _layer_step(buf, expert_weight, static_x, static_idx, static_w)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _layer_step(buf, expert_weight, static_x, static_idx, static_w)

    for seed in (1, 2, 3):
        x, idx, w = _inputs(rank, world_size, seed)
        static_x.copy_(x)
        static_idx.copy_(idx)
        static_w.copy_(w)
        graph.replay()
        eager = _layer_step(buf, expert_weight, x, idx, w)
        for got, want in zip(captured, eager):
            assert torch.equal(got, want), f"replay {seed} differs from eager"

    # No host wait in a static call: the engine's counters, and torch's own sync check.
    torch.cuda.set_sync_debug_mode("error")
    try:
        _layer_step(buf, expert_weight, static_x, static_idx, static_w)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for kind, counters in buf.counters.items():
        assert counters["host_waits"] == 0, kind
    buf.check()  # nothing kept: every call was sound
    buf.close()
    return True


@pytest.mark.parametrize("world_size", [1, 2])
def test_static_mode_captures_and_replays_in_a_cuda_graph(world_size):
    assert run_distributed(world_size, _graph_worker, timeout=600) == [True] * world_size
