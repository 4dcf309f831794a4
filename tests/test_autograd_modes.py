"""Autograd modes a user meets: torch.inference_mode (serving), torch.no_grad, and double
backward (create_graph=True), which raises instead of silently dropping second-order terms."""

import pytest
import torch

import moe_comm
from moe_comm.nn import MoELayer
from tests.distributed import run_distributed


def _inputs(rank, T=7, H=6, K=2, E=4):
    gen = torch.Generator().manual_seed(7 + rank)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    return torch.randn(T, H, generator=gen), idx, torch.rand(T, K, generator=gen)


def _inference_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4)
    x, idx, w = _inputs(rank)
    recv_x, _, counts, handle = moe_comm.dispatch(x, idx, w, buf)
    expected = moe_comm.combine(recv_x * 2, handle, w)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            xi, wi = x.clone(), w.clone()  # inference tensors under inference_mode
            recv_i, _, counts_i, handle_i = moe_comm.dispatch(xi, idx, wi, buf)
            assert torch.equal(recv_i, recv_x) and torch.equal(counts_i, counts)
            assert torch.equal(moe_comm.combine(recv_i * 2, handle_i, wi), expected)
            # An inference tensor has no version counter: an in-place change is still honoured.
            wi.mul_(3)
            assert torch.allclose(moe_comm.combine(recv_i * 2, handle_i, wi), expected * 3, rtol=1e-6)
    torch.manual_seed(0)
    layer = MoELayer(6, 8, 4, 2, buf).eval()
    with torch.inference_mode():
        y = layer(x)
    with torch.no_grad():
        y_ref = layer(x)
    assert torch.equal(y, y_ref) and y.is_inference()
    return True


def test_inference_mode_dispatch_combine_and_moe_layer():
    assert run_distributed(2, _inference_worker) == [True, True]


def _double_backward_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4)
    x, idx, w = _inputs(rank)
    x.requires_grad_()
    expert = torch.nn.Linear(6, 6)
    recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf)
    y = moe_comm.combine(torch.tanh(expert(recv_x)), handle, w)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.square().sum().backward()
    return True


def test_double_backward_raises_instead_of_dropping_terms():
    assert run_distributed(2, _double_backward_worker) == [True, True]
