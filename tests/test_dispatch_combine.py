"""Dispatch exactly, combine within rounding, against moe_comm.reference over the grid of
tests/cases.py: 1/2/3/4/8 ranks, three dtypes, top-k 1/2/8/all, masked slots, every token to
one expert, skewed routing, 0/1/7/300 tokens per rank, odd hidden sizes, three weight modes."""

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import all_inputs, expert_scale, grid
from tests.checks import assert_combine_close, assert_dispatch_equal
from tests.distributed import run_distributed


def _other_weights(case, rank):
    gen = torch.Generator().manual_seed(777 + case.seed * 31 + rank)
    return torch.rand(case.tokens_of(rank), case.topk, generator=gen)


def check_case(rank, case, buf):
    """Dispatch exact and combine (three weight modes) within rounding, on one Buffer (inputs
    on its device; the reference runs on the CPU)."""
    E, dev = case.num_experts, buf.device
    xs, idxs, ws = all_inputs(case)
    recv_x, recv_w, counts, handle = moe_comm.dispatch(xs[rank].to(dev), idxs[rank].to(dev), ws[rank].to(dev), buf)
    ref = reference.dispatch_all(xs, idxs, ws, E)
    assert recv_x.device == dev and recv_w.device == dev and counts.device.type == "cpu"
    assert_dispatch_equal((recv_x.cpu(), recv_w.cpu(), counts), ref[rank], what=str(case))

    dtype = case.torch_dtype
    expert_ys = [(r[0].float() * expert_scale(case, d, r[0].shape[0], r[2])).to(dtype) for d, r in enumerate(ref)]
    expert_y = (recv_x.cpu().float() * expert_scale(case, rank, recv_x.shape[0], counts)).to(dtype)
    assert torch.equal(expert_y, expert_ys[rank])
    tokens = [case.tokens_of(r) for r in range(case.world_size)]
    others = [_other_weights(case, r) for r in range(case.world_size)]
    for mode, weights in (("unweighted", [None] * case.world_size), ("dispatch weights", ws),
                          ("other weights", others)):
        mine = weights[rank]
        if mine is not None and mode != "dispatch weights":
            mine = mine.to(dev)
        elif mine is not None:
            mine = handle.dispatch_weights  # the very tensor dispatch got: no weight exchange
        y = moe_comm.combine(expert_y.to(dev), handle, mine)
        assert y.device == dev
        ref_y = reference.combine_all(expert_ys, idxs, weights, E, tokens, dtype)[rank]
        abs_w = [w.abs() if w is not None else None for w in weights]
        bound = reference.combine_all([e.float().abs() for e in expert_ys], idxs, abs_w, E, tokens,
                                      torch.float32)[rank]
        assert_combine_close(y.cpu(), ref_y, bound, dtype, stages=len(buf.stages), what=f"{case} {mode}")


def _grid_worker(rank, world_size):
    buffers = {}
    cases = grid(world_size)
    for case in cases:
        if case.num_experts not in buffers:
            buffers[case.num_experts] = moe_comm.Buffer(num_experts=case.num_experts, ranks_per_node=world_size)
        check_case(rank, case, buffers[case.num_experts])
    return len(cases)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_dispatch_combine_grid(world_size):
    counts = run_distributed(world_size, _grid_worker)
    assert counts == [len(grid(world_size))] * world_size and counts[0] >= 24


def _stats_worker(rank, world_size):
    from tests.cases import Case
    case = Case(world_size=world_size, num_experts=2 * world_size, topk=3, hidden=5, tokens=(9, 4))
    xs, idxs, ws = all_inputs(case)
    buf = moe_comm.Buffer(num_experts=case.num_experts, ranks_per_node=2, hierarchical=False)
    _, _, _, handle = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], buf)
    per_rank = case.num_experts // world_size
    dest = (idxs[rank] // per_rank).masked_fill(idxs[rank] < 0, -1)
    expect_intra = expect_inter = 0
    for row in dest.tolist():
        for d in set(row) - {-1, rank}:
            if d // 2 == rank // 2:
                expect_intra += 1
            else:
                expect_inter += 1
    s = handle.stats
    assert (s["rows_sent_intra_node"], s["rows_sent_inter_node"]) == (expect_intra, expect_inter), s
    assert s["bytes_sent_inter_node"] == expect_inter * 5 * 4
    return s


def test_flat_handle_stats_count_rows_per_link_class():
    stats = run_distributed(4, _stats_worker)
    assert sum(s["rows_sent_inter_node"] for s in stats) > 0


def _large_worker(rank, world_size):
    from tests.cases import Case
    case = Case(world_size, 16, topk=8, hidden=7168, dtype="bfloat16", pattern="masked", tokens=(4097, 1), seed=3)
    check_case(rank, case, moe_comm.Buffer(num_experts=16, ranks_per_node=1))  # 2 nodes: both stages
    return True


def test_deepseek_width_and_4097_tokens():
    assert run_distributed(2, _large_worker) == [True, True]
