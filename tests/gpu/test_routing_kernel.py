"""The CUDA node-limited top-k (csrc/kernels/routing.cu) against the CPU selection, ties included,
and node_limited_topk on CUDA scores (weights and their gradients on the device)."""

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.gpu import marks

C = moe_comm.C
pytestmark = marks.KERNELS


@pytest.mark.parametrize("T,E,N,M,NK,K", [(0, 8, 2, 1, 1, 2), (1, 1, 1, 1, 1, 1), (4096, 256, 8, 4, 2, 8),
                                          (513, 64, 4, 2, 3, 6), (300, 160, 160, 3, 1, 3), (77, 32, 1, 1, 4, 32)])
@pytest.mark.parametrize("ties", [False, True])
def test_node_limited_select_cuda_matches_cpu(T, E, N, M, NK, K, ties):
    gen = torch.Generator().manual_seed(T + E)
    scores = torch.rand(T, E, generator=gen)
    if ties:
        scores = (scores * 4).floor() / 4  # many equal scores: the lower index must win
    expected = C.node_limited_select(scores, K, N, M, NK)
    got = C.node_limited_select(scores.cuda(), K, N, M, NK, torch.cuda.current_stream().cuda_stream)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), expected)


def test_node_limited_topk_on_cuda_scores():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(257, 64, generator=gen)
    bias = torch.rand(64, generator=gen) * 0.1
    dev_logits = logits.cuda().requires_grad_()
    idx, w = moe_comm.node_limited_topk(dev_logits, 8, 4, 2, score_func="sigmoid", bias=bias.cuda(), normalize=True)
    ref_idx, ref_w = reference.node_limited_topk(logits, 8, 4, 2, score_func="sigmoid", bias=bias, normalize=True)
    assert idx.device.type == "cuda" and torch.equal(idx.cpu(), ref_idx)
    torch.testing.assert_close(w.cpu(), ref_w)
    w.sum().backward()
    assert dev_logits.grad is not None and dev_logits.grad.device.type == "cuda"
