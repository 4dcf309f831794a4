"""The CUDA layout kernel (csrc/kernels/layout.cu) against the CPU layout, on a GPU."""

import pytest
import torch

import moe_comm

C = moe_comm.C
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not moe_comm.build_info()["cuda"], reason="built without CUDA"),
]


def _routing(T, K, E, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    return idx.masked_fill(torch.rand(T, K, generator=gen) < 0.2, -1)


@pytest.mark.parametrize("T,K,E,W", [(0, 2, 8, 2), (1, 1, 1, 1), (4097, 8, 256, 8), (300, 8, 64, 64),
                                     (1000, 4, 16384, 8)])  # the last one overflows shared memory
def test_count_layout_cuda_matches_cpu(T, K, E, W):
    idx = _routing(T, K, E, seed=T)
    tokens_per_rank, pairs_per_expert, *_ = C.plan_send(idx, E, W)
    dev = idx.cuda()
    # Poison-free outputs come from the launcher's own memsets; run twice to catch accumulation.
    for _ in range(2):
        got_rank, got_expert, in_rank = C.count_layout_cuda(dev, E, W, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(got_rank.cpu(), tokens_per_rank)
    assert torch.equal(got_expert.cpu(), pairs_per_expert)
    per_rank = E // W
    dest = (idx // per_rank).masked_fill(idx < 0, -1)
    expected = torch.zeros(T, W, dtype=torch.bool)
    for d in range(W):
        expected[:, d] = (dest == d).any(dim=1)
    assert torch.equal(in_rank.cpu(), expected)


@pytest.mark.parametrize("T,K,E,W", [(0, 2, 8, 2), (1, 1, 1, 1), (7, 3, 12, 3), (4097, 8, 256, 8), (300, 8, 64, 64),
                                     (513, 4, 32, 1)])
def test_plan_send_cuda_matches_cpu(T, K, E, W):
    idx = _routing(T, K, E, seed=T + 1)
    expected = C.plan_send(idx, E, W)
    stream = torch.cuda.current_stream().cuda_stream
    got = [t.cpu() for t in C.plan_send(idx.cuda(), E, W, stream)]
    n_send = int(expected[2][-1])
    # tokens_per_rank, pairs_per_expert, send_offsets: equal; send_token: the first n_send slots
    for name, e, g in zip(("tokens_per_rank", "pairs_per_expert", "send_offsets"), expected[:3], got[:3]):
        assert torch.equal(g, e), name
    assert got[3].numel() == W * T
    assert torch.equal(got[3][:n_send], expected[3])
    assert torch.equal(got[4], expected[4]), "pair_slot"
    assert torch.equal(got[5], expected[5]), "first_slot"
    counts, pairs = C.count_layout(idx.cuda(), E, W, stream)
    assert torch.equal(counts.cpu(), expected[0]) and torch.equal(pairs.cpu(), expected[1])
