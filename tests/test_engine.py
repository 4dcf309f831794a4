"""The engine's per-call budgets (issue "One C++ dispatch engine"), counted by the engine as it
drives its backend: the CPU backend counts the same events the CUDA backend's kernels,
NCCL groups and host waits are held to (README: Engine). Also: the emulated lanes of the CPU
token bodies run through whole dispatches and combines unchanged."""

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import Case, all_inputs
from tests.checks import assert_dispatch_equal
from tests.distributed import requires_shared_memory, run_distributed

# kind -> (launches, exchanges, host waits) at most, per number of stages with a wire
FLAT = {"dispatch": (5, 2, 1), "combine": (3, 1, 0), "dispatch_backward": (5, 1, 0),
        "combine_backward": (5, 2, 0)}
HIERARCHICAL = {"dispatch": (9, 4, 1), "combine": (3, 2, 0), "dispatch_backward": (9, 2, 0),
                "combine_backward": (9, 4, 0)}


def _counted_worker(rank, world_size, ranks_per_node):
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=ranks_per_node)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    idx = torch.rand(6, 8, generator=gen).argsort(dim=1)[:, :3]
    w = torch.rand(6, 3, generator=gen, requires_grad=True)
    recv_x, recv_w, _, handle = moe_comm.dispatch(x, idx, w, buf)
    y = moe_comm.combine(recv_x * 2 + recv_w.unsqueeze(1), handle, w)
    y.sum().backward()
    counters = buf.counters
    assert handle.layout.counters == counters["dispatch"]
    return buf.hierarchical, counters


@pytest.mark.parametrize("world_size,ranks_per_node", [(1, 1), (2, 2), (4, 2)])
def test_calls_stay_within_their_budgets(world_size, ranks_per_node):
    for hierarchical, counters in run_distributed(world_size, _counted_worker, ranks_per_node):
        budget = HIERARCHICAL if hierarchical else FLAT
        for kind, (launches, exchanges, waits) in budget.items():
            got = counters[kind]
            assert got["launches"] <= launches, (kind, got)
            assert got["exchanges"] <= exchanges, (kind, got)
            assert got["host_waits"] == (waits if kind == "dispatch" else 0), (kind, got)
            assert got["host_collectives"] == 0, (kind, got)  # combine's status travels in-band
        if world_size > 1:  # every stage has a wire: the exchanges are exactly as budgeted
            assert counters["dispatch"]["exchanges"] == budget["dispatch"][1]
            assert counters["combine"]["exchanges"] == budget["combine"][1]
        else:
            assert all(c["exchanges"] == 0 for c in counters.values())


def _lanes_worker(rank, world_size, lanes):
    moe_comm.C.set_cpu_lanes(lanes)
    case = Case(world_size, 8, 3, 44, "bfloat16", "random", (0, 9, 33))
    xs, idxs, ws = all_inputs(case)
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=2)
    got = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], buf)
    assert_dispatch_equal(got[:3], reference.dispatch_all(xs, idxs, ws, 8)[rank], what=f"{lanes} lanes")
    return moe_comm.combine(got[0], got[3], ws[rank])


def test_emulated_lanes_give_the_same_bytes_through_a_whole_dispatch_and_combine():
    one, many = run_distributed(4, _lanes_worker, 1), run_distributed(4, _lanes_worker, 5)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


def _transport_worker(rank, world_size, ranks_per_node, transport):
    E = 4 * world_size
    case = Case(world_size, E, 3, 40, "bfloat16", "random", (5, 0, 17))
    xs, idxs, ws = all_inputs(case)
    buf = moe_comm.Buffer(num_experts=E, ranks_per_node=ranks_per_node, cpu_transport=transport)
    assert buf.cpu_transport == transport
    x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idxs[rank], w, buf)
    assert_dispatch_equal((recv_x.detach(), recv_w.detach(), counts), reference.dispatch_all(xs, idxs, ws, E)[rank])
    y = moe_comm.combine(recv_x * 3 + recv_w.unsqueeze(1).to(recv_x.dtype), handle, w * 0.5)
    y.float().sum().backward()
    return y.detach(), x.grad, w.grad


@requires_shared_memory
@pytest.mark.parametrize("world_size,ranks_per_node", [(3, 3), (4, 2)])
def test_shared_memory_and_gloo_give_the_same_bits(world_size, ranks_per_node):
    """The two CPU wires carry the same bytes: dispatch (exact against the reference), combine
    with new weights (its status travels first), and both backwards, flat and hierarchical."""
    shm = run_distributed(world_size, _transport_worker, ranks_per_node, "shm")
    gloo = run_distributed(world_size, _transport_worker, ranks_per_node, "gloo")
    for a, b in zip(shm, gloo):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
