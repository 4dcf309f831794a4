"""The plans as one cooperative launch each (csrc/kernels/plan.cu) against the CPU backend running
the same bodies, on a GPU."""

import pytest
import torch

import moe_comm
from tests.gpu import marks

C = moe_comm.C
pytestmark = marks.KERNELS


def _routing(T, K, E, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    return idx.masked_fill(torch.rand(T, K, generator=gen) < 0.2, -1)


@pytest.mark.parametrize("T,K,E,W", [(0, 2, 8, 2), (1, 1, 1, 1), (7, 3, 12, 3), (4097, 8, 256, 8), (300, 8, 64, 64),
                                     (513, 4, 32, 1), (1000, 4, 16384, 8), (20000, 8, 256, 16)])
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
    assert torch.equal(C.count_tokens(idx.cuda(), E, W, stream).cpu(), expected[0])
    # Twice more on the same stream: nothing accumulates between launches.
    again = [t.cpu() for t in C.plan_send(idx.cuda(), E, W, stream)]
    assert all(torch.equal(a, g) for a, g in zip(again, got))


def test_plan_send_cuda_reports_a_bad_routing():
    idx = torch.tensor([[0, 9], [1, -1]], device="cuda")
    _, pairs, offsets, _, pair_slot, _ = C.plan_send(idx, 4, 2, torch.cuda.current_stream().cuda_stream)
    assert pair_slot.cpu().tolist() == [[0, -1], [1, -1]] and int(pairs.sum()) == 2


@pytest.mark.parametrize("by_weight", [True, False])
@pytest.mark.parametrize("T,K,E,capacity", [(0, 2, 8, 1), (1, 1, 1, 0), (300, 8, 64, 10), (8192, 8, 256, 64),
                                            (4097, 4, 16, 2000)])
def test_capacity_cuda_matches_cpu(T, K, E, capacity, by_weight):
    idx = _routing(T, K, E, seed=T + 2)
    gen = torch.Generator().manual_seed(T)
    w = (torch.rand(T, K, generator=gen) * 8).floor() / 8  # ties: the lower token first
    kept, dropped = C.drop_by_capacity(idx, w, E, capacity, by_weight)
    stream = torch.cuda.current_stream().cuda_stream
    got_kept, got_dropped = C.drop_by_capacity(idx.cuda(), w.cuda(), E, capacity, by_weight, stream)
    assert torch.equal(got_kept.cpu(), kept) and int(got_dropped) == int(dropped)
