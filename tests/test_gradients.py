"""Gradients of an expert-parallel step against one process computing the same model densely
with moe_comm.reference: to x, to topk_weights (through recv_weights and through combine's
weights), to a second weight tensor given only to combine, and to the experts' parameters."""

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import Case, all_inputs
from tests.checks import assert_grad_close
from tests.distributed import run_distributed

MODES = ("combine_weights", "recv_weights", "other_combine_weights")


def _expert_params(case):
    gen = torch.Generator().manual_seed(4242 + case.seed)
    H = case.hidden
    return [(torch.randn(H, H, generator=gen) / H ** 0.5).to(case.torch_dtype) for _ in range(case.num_experts)]


def _run_experts(recv_x, counts, params, first_expert):
    chunks = recv_x.split(counts.tolist())
    outs = [chunk @ params[first_expert + i] for i, chunk in enumerate(chunks)]
    return torch.cat(outs) if outs else recv_x[:0]


def _loss_weights(case, rank):
    gen = torch.Generator().manual_seed(99 + rank + 7 * case.seed)
    return torch.randn(case.tokens_of(rank), case.hidden, generator=gen)


def _second_weights(case, rank):
    gen = torch.Generator().manual_seed(555 + rank + 7 * case.seed)
    return torch.rand(case.tokens_of(rank), case.topk, generator=gen)


def _step(mode, x, idx, w, w2, recv, params, first_expert, combine_fn, handle):
    recv_x, recv_w, counts = recv
    expert_y = _run_experts(recv_x, counts, params, first_expert)
    if mode == "combine_weights":
        return combine_fn(expert_y, handle, w)
    if mode == "recv_weights":
        return combine_fn((expert_y.float() * recv_w.unsqueeze(1)).to(expert_y.dtype), handle, None)
    return combine_fn(expert_y, handle, w2)


def dense_gradients(case, mode):
    """One process, every rank's tensors: -> per rank (grad x, grad w, grad w2), grads of params."""
    W, E = case.world_size, case.num_experts
    xs, idxs, ws = all_inputs(case)
    xs = [x.clone().requires_grad_() for x in xs]
    ws = [w.clone().requires_grad_() for w in ws]
    w2s = [_second_weights(case, r).requires_grad_() for r in range(W)]
    params = [p.clone().requires_grad_() for p in _expert_params(case)]
    recv = reference.dispatch_all(xs, idxs, ws, E)
    per_rank = E // W
    expert_ys = []
    for d, (recv_x, recv_w, counts) in enumerate(recv):
        y = _run_experts(recv_x, counts, params, d * per_rank)
        expert_ys.append((y.float() * recv_w.unsqueeze(1)).to(y.dtype) if mode == "recv_weights" else y)
    comb_w = {"combine_weights": ws, "recv_weights": [None] * W, "other_combine_weights": w2s}[mode]
    ys = reference.combine_all(expert_ys, idxs, comb_w, E, [x.shape[0] for x in xs], case.torch_dtype)
    loss = sum((y.float() * _loss_weights(case, r)).sum() for r, y in enumerate(ys))
    loss.backward()
    zero = lambda t: t.grad if t.grad is not None else torch.zeros_like(t)  # noqa: E731
    return [(zero(xs[r]), zero(ws[r]), zero(w2s[r])) for r in range(W)], [zero(p) for p in params]


def _grad_worker(rank, world_size, cases, ranks_per_node=None, hierarchical="auto"):
    for case in cases:
        buf = moe_comm.Buffer(num_experts=case.num_experts, ranks_per_node=ranks_per_node or world_size,
                              hierarchical=hierarchical)
        per_rank = case.num_experts // world_size
        for mode in MODES:
            xs, idxs, ws = all_inputs(case)
            x = xs[rank].clone().requires_grad_()
            w = ws[rank].clone().requires_grad_()
            w2 = _second_weights(case, rank).requires_grad_()
            params = [p.clone().requires_grad_() for p in _expert_params(case)]
            recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idxs[rank], w, buf)
            y = _step(mode, x, idxs[rank], w, w2, (recv_x, recv_w, counts), params, rank * per_rank,
                      moe_comm.combine, handle)
            (y.float() * _loss_weights(case, rank)).sum().backward()
            expected, expected_params = dense_gradients(case, mode)
            what = f"{case} {mode} rank {rank}"
            gx, gw, gw2 = expected[rank]
            dtype = case.torch_dtype
            assert_grad_close(x.grad, gx, dtype, f"{what}: grad x")
            if mode != "other_combine_weights":
                assert_grad_close(w.grad, gw, torch.float32 if dtype == torch.float32 else dtype, f"{what}: grad topk_weights")
            else:
                assert w.grad is None or not w.grad.any(), f"{what}: dispatch weights got a gradient"
                assert_grad_close(w2.grad, gw2, dtype, f"{what}: grad combine weights")
            for e in range(rank * per_rank, (rank + 1) * per_rank):
                assert_grad_close(params[e].grad if params[e].grad is not None else torch.zeros_like(params[e]),
                                  expected_params[e], dtype, f"{what}: grad expert {e}")
    return True


def _cases(world_size):
    E = 4 * world_size if world_size < 4 else 2 * world_size
    return [
        Case(world_size, E, topk=min(4, E), hidden=9, tokens=(6, 0, 11, 1), pattern="masked", seed=1),
        Case(world_size, E, topk=1, hidden=16, tokens=(5, 3), pattern="one_expert", seed=2),
        Case(world_size, E, topk=E, hidden=8, tokens=(3, 4), dtype="bfloat16", seed=3),
        Case(world_size, E, topk=2, hidden=12, tokens=(7,), dtype="float16", pattern="skewed", seed=4),
    ]


def _empty_rank_worker(rank, world_size):
    """A rank with no tokens, backward through .sum(): its gradients arrive as expanded
    zero-size tensors."""
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size)
    T = 0 if rank == 0 else 5
    x = torch.randn(T, 6, requires_grad=True)
    w = torch.rand(T, 2, requires_grad=True)
    idx = torch.rand(T, 4).argsort(dim=1)[:, :2]
    recv_x, recv_w, _, handle = moe_comm.dispatch(x, idx, w, buf)
    (moe_comm.combine(recv_x * 2, handle, w).sum() + recv_w.sum()).backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    if T:
        torch.testing.assert_close(x.grad, (2 * w.detach().sum(1, keepdim=True)).expand_as(x))
    return True


def test_rank_without_tokens_backward_through_sum():
    assert run_distributed(2, _empty_rank_worker) == [True, True]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_gradients_match_dense_reference(world_size):
    assert run_distributed(world_size, _grad_worker, _cases(world_size)) == [True] * world_size
