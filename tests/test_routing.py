"""node_limited_topk: the C++ selection against the pure-torch reference, the node limit,
DeepSeek-V3 options, gradients to the router, and bad arguments."""

import pytest
import torch

import moe_comm
from moe_comm import reference

CONFIGS = [  # (tokens, experts, nodes, max_nodes, k)
    (0, 16, 4, 2, 4), (1, 8, 1, 1, 1), (257, 256, 8, 4, 8), (100, 64, 8, 1, 8), (64, 32, 4, 4, 32),
    (50, 12, 3, 2, 5), (33, 16, 16, 3, 3),
]


def _scores(T, E, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(T, E, generator=gen)
    return (s * 4).round() / 4 if ties else s  # coarse values: many exact ties


@pytest.mark.parametrize("T,E,N,max_nodes,k", CONFIGS)
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("ties", [False, True])
def test_selection_equals_reference_and_respects_node_limit(T, E, N, max_nodes, k, score_func, ties):
    scores = _scores(T, E, seed=T + E, ties=ties)
    gen = torch.Generator().manual_seed(7)
    bias = torch.randn(E, generator=gen) * 0.1
    for b in (None, bias):
        idx, w = moe_comm.node_limited_topk(scores, k, N, max_nodes, score_func=score_func, bias=b)
        ref_idx, ref_w = reference.node_limited_topk(scores, k, N, max_nodes, score_func=score_func, bias=b)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)
        assert idx.shape == (T, k) and idx.dtype == torch.int64 and w.dtype == torch.float32
        nodes_used = torch.zeros(T, N, dtype=torch.bool).scatter(1, idx // (E // N), True).sum(1)
        assert bool((nodes_used <= max_nodes).all())
        assert all(len(set(row)) == k for row in idx.tolist())  # no repeats


def test_no_node_limit_is_plain_topk():
    scores = _scores(40, 32, seed=1)
    idx, w = moe_comm.node_limited_topk(scores, 6, 4, 4, score_func="softmax", normalize=False)
    probs = torch.softmax(scores, -1)
    assert torch.equal(idx, probs.topk(6, dim=1).indices)
    torch.testing.assert_close(w, probs.topk(6, dim=1).values)


def test_deepseek_options():
    scores = _scores(20, 16, seed=2)
    bias = torch.zeros(16)
    bias[15] = 100.0  # selection only: expert 15 always chosen, its weight is still its probability
    idx, w = moe_comm.node_limited_topk(scores, 4, 4, 2, bias=bias, normalize=True, scaling_factor=2.5)
    assert bool((idx == 15).any(dim=1).all())
    torch.testing.assert_close(w.sum(1), torch.full((20,), 2.5))
    probs = torch.sigmoid(scores).gather(1, idx)
    torch.testing.assert_close(w, probs / probs.sum(1, keepdim=True) * 2.5)


def test_gradients_reach_the_router():
    scores = _scores(10, 8, seed=3).requires_grad_()
    _, w = moe_comm.node_limited_topk(scores, 2, 2, 1, score_func="softmax")
    (w * torch.arange(2.0)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=0), ValueError, r"^k: must be a positive int"),
    (dict(num_nodes=3), ValueError, r"^num_nodes: 16 experts do not split evenly over 3 nodes"),
    (dict(max_nodes=5), ValueError, r"^max_nodes: 5 is more than num_nodes 4"),
    (dict(k=9), ValueError, r"^k: 9 experts cannot come from 2 node\(s\) of 4 experts"),
    (dict(score_func="relu"), ValueError, r"^score_func: must be one of"),
    (dict(bias=torch.zeros(3)), ValueError, r"^bias: must be a tensor of shape \[16\]"),
    (dict(node_score_topk=5), ValueError, r"^node_score_topk: must be in \[1, 4\]"),
    (dict(scores=torch.full((2, 16), float("nan"))), ValueError, r"^scores: contains NaN"),
    (dict(scores=torch.zeros(2, 16, dtype=torch.int64)), TypeError, r"^scores: must be a floating tensor"),
    (dict(scores=torch.zeros(16)), ValueError, r"^scores: must be a 2-D tensor"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = dict(scores=torch.zeros(2, 16), k=4, num_nodes=4, max_nodes=2)
    args.update(kwargs)
    scores, k, num_nodes, max_nodes = (args.pop(n) for n in ("scores", "k", "num_nodes", "max_nodes"))
    with pytest.raises(error, match=match):
        moe_comm.node_limited_topk(scores, k, num_nodes, max_nodes, **args)


def test_non_finite_bias_is_rejected_and_the_kernel_body_survives_nan_scores():
    scores = _scores(4, 16, seed=3)
    bias = torch.zeros(16)
    bias[5] = float("nan")
    with pytest.raises(ValueError, match=r"^bias: contains NaN or infinity"):
        moe_comm.node_limited_topk(scores, 4, 4, 2, score_func="none", bias=bias)
    # The single-source body itself (what a GPU thread runs) on scores that order nothing:
    # picks end early with -1 instead of reading out of bounds.
    nan_scores = torch.full((3, 16), float("nan"))
    nan_scores[1, :8] = torch.arange(8.0)
    idx = moe_comm.C.node_limited_select(nan_scores, 4, 4, 2, 2)
    assert idx.shape == (3, 4)
    assert bool(((idx >= -1) & (idx < 16)).all())
