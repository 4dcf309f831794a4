"""Two-stage forwarding on simulated topologies (nodes x ranks per node): dispatch identical to
flat mode, combine and gradients against the reference, each token crossing nodes once per
destination node, and errors reaching every rank."""

import pytest
import torch

import moe_comm
from tests.cases import Case, all_inputs, grid
from tests.distributed import run_distributed
from tests.test_dispatch_combine import check_case
from tests.test_errors import BAD_COMBINE_INPUTS, _good, combine_one_bad_rank, combine_one_bad_rank_deferred
from tests.test_gradients import _cases as gradient_cases
from tests.test_gradients import _grad_worker

TOPOLOGIES = [(1, 4), (2, 2), (2, 4), (4, 2), (8, 1)]  # (nodes, ranks per node)


def _expected_inter_rows(case, rank, ranks_per_node):
    """The minimum: for every token, its distinct destination nodes other than its own."""
    _, idxs, _ = all_inputs(case)
    per_node = ranks_per_node * case.num_experts // case.world_size
    nodes = (idxs[rank] // per_node).masked_fill(idxs[rank] < 0, -1)
    own = rank // ranks_per_node
    return sum(len(set(row) - {-1, own}) for row in nodes.tolist())


def _topology_worker(rank, world_size, ranks_per_node):
    cases = grid(world_size)[::3]
    buffers = {}
    for case in cases:
        E = case.num_experts
        if E not in buffers:
            buffers[E] = (moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node),
                          moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node, hierarchical=False))
        hier, flat = buffers[E]
        assert hier.hierarchical == (world_size // ranks_per_node > 1)
        check_case(rank, case, hier)

        xs, idxs, ws = all_inputs(case)
        a = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], hier)
        b = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], flat)
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])), f"{case}: hierarchical != flat"
        if hier.hierarchical:
            assert a[3].stats["rows_sent_inter_node"] == _expected_inter_rows(case, rank, ranks_per_node), case
            # Flat mode sends a token once per destination rank, hierarchical once per node.
            assert a[3].stats["rows_sent_inter_node"] <= b[3].stats["rows_sent_inter_node"]
    return len(cases)


@pytest.mark.parametrize("nodes,ranks_per_node", TOPOLOGIES)
def test_topology_matches_flat_and_reference(nodes, ranks_per_node):
    world_size = nodes * ranks_per_node
    assert run_distributed(world_size, _topology_worker, ranks_per_node) == [len(grid(world_size)[::3])] * world_size


@pytest.mark.parametrize("nodes,ranks_per_node", [(2, 2), (4, 2), (2, 4)])
def test_hierarchical_gradients_match_dense_reference(nodes, ranks_per_node):
    world_size = nodes * ranks_per_node
    cases = gradient_cases(world_size)
    assert run_distributed(world_size, _grad_worker, cases, ranks_per_node, True) == [True] * world_size


def _inter_node_minimum_worker(rank, world_size, ranks_per_node):
    # Top-8 of 32 experts on 8 ranks: most tokens hit several ranks of the same node.
    case = Case(world_size, 32, topk=8, hidden=6, tokens=(50, 31), pattern="skewed", seed=11)
    buf = moe_comm.Buffer(num_experts=32, ranks_per_node=ranks_per_node)
    xs, idxs, ws = all_inputs(case)
    _, _, _, handle = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], buf)
    return handle.stats, _expected_inter_rows(case, rank, ranks_per_node)


def test_rows_crossing_nodes_are_the_minimum():
    results = run_distributed(8, _inter_node_minimum_worker, 4)
    sent = sum(stats["rows_sent_inter_node"] for stats, _ in results)
    assert sent == sum(expected for _, expected in results) > 0
    assert all(s["bytes_sent_inter_node"] == s["rows_sent_inter_node"] * 6 * 4 for s, _ in results)


def _hier_error_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=2)
    bad_rank = 3  # node 1, local index 1: ranks on rail 0 learn of it only through their node
    for bad in ("topk_idx", "hidden"):
        x, idx, w = _good(rank, E=8)
        if bad == "hidden":
            x, idx, w = _good(rank, E=8, H=5 if rank == bad_rank else 4)
        elif rank == bad_rank:
            idx = idx.index_fill(0, torch.tensor([0]), 99)
        with pytest.raises((ValueError, RuntimeError)) as info:
            moe_comm.dispatch(x, idx, w, buf)
        message = str(info.value)
        if rank == bad_rank and bad == "topk_idx":
            assert message.startswith("topk_idx: topk_idx[0, 0] = 99 is out of range"), message
        else:
            assert f"rank {bad_rank}" in message or rank == bad_rank, message
        x, idx, w = _good(rank, E=8)
        recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf)  # the Buffer still works
        assert moe_comm.combine(recv_x, handle).shape == x.shape
    # Combine's status reaches every rank too, and the two stages stay in step.
    return combine_one_bad_rank(rank, buf, bad_rank, lambda r: _good(r, E=8))


def test_errors_reach_every_rank_through_both_stages():
    assert run_distributed(4, _hier_error_worker) == [len(BAD_COMBINE_INPUTS)] * 4


def _hier_deferred_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=2, combine_status="deferred")
    assert buf.hierarchical
    # Rank 3 (node 1, local 1): rank 0 exchanges with neither it nor its node in combine's
    # first stage; the next dispatch's headers (rail, then relayed) tell it.
    return combine_one_bad_rank_deferred(rank, buf, 3, lambda r: _good(r, E=8))


def test_a_deferred_combine_status_reaches_every_rank_through_both_stages():
    assert run_distributed(4, _hier_deferred_worker) == [len(BAD_COMBINE_INPUTS)] * 4
