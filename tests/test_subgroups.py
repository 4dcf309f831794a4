"""Buffers on disjoint expert-parallel subgroups (the DP x EP layout): each rank builds Buffers
on its own EP group only, with timeouts, hierarchical forwarding and several Buffers per group,
in orders that differ between groups; results match the reference, and the ranks of one group
never wait on another group."""

import time

import pytest
import torch
import torch.distributed as dist

import moe_comm
from tests.checks import assert_combine_close
from tests.distributed import run_distributed


def _inputs(rank, T=6, H=5, K=2, E=4):
    gen = torch.Generator().manual_seed(100 + rank)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    idx[0, 1] = -1  # a masked slot
    return torch.randn(T, H, generator=gen), idx, torch.rand(T, K, generator=gen)


def _check_against_reference(buf, rank):
    x, idx, w = _inputs(rank, E=buf.num_experts)
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idx, w, buf)
    ref_x, ref_w, ref_counts, ref_handle = moe_comm.reference.dispatch(x, idx, w, buf)
    assert torch.equal(recv_x, ref_x) and torch.equal(recv_w, ref_w) and torch.equal(counts, ref_counts)
    expert_y = recv_x * 3 - 1
    y = moe_comm.combine(expert_y, handle, w)
    ref_y = moe_comm.reference.combine(expert_y, ref_handle, w)
    bound = moe_comm.reference.combine(expert_y.abs(), ref_handle, w.abs())
    assert_combine_close(y, ref_y, bound, torch.float32, stages=len(buf.stages))


def _ep_groups_worker(rank, world_size, group_size):
    groups = [list(range(g, g + group_size)) for g in range(0, world_size, group_size)]
    # The standard layout: every rank creates every EP group with new_group, in order.
    handles = [dist.new_group(ranks) for ranks in groups]
    mine = next(i for i, ranks in enumerate(groups) if rank in ranks)
    # An extra group only some ranks belong to: ranks now hold different numbers of groups
    # (what torch's hashed group names depend on).
    dist.new_group([0, group_size]) if world_size > group_size else None
    group = handles[mine]
    if mine % 2:  # groups may take their time: the others must not wait for them
        time.sleep(1.0)
    buffers = [moe_comm.Buffer(group=group, num_experts=4 * group_size, timeout=30)]
    if mine % 2 == 0:  # groups build different numbers of Buffers, in different orders
        buffers.append(moe_comm.Buffer(group=group, num_experts=2 * group_size, timeout=10, combine_status=False))
    buffers.append(moe_comm.Buffer(group=group, num_experts=4 * group_size, ranks_per_node=1, hierarchical=True,
                                   timeout=30))
    for buf in buffers:
        assert buf.world_size == group_size and buf.rank == rank - groups[mine][0]
        for _ in range(2):
            _check_against_reference(buf, buf.rank)
    hierarchical = sum(buf.hierarchical for buf in buffers)
    for buf in buffers:
        buf.close()
    return hierarchical


def test_two_disjoint_ep_groups_of_two():
    assert run_distributed(4, _ep_groups_worker, 2, timeout=240) == [1, 1, 1, 1]


def test_four_disjoint_ep_groups_of_two():
    assert run_distributed(8, _ep_groups_worker, 2, timeout=300) == [1] * 8


def _roll_call_worker(rank, world_size):
    """Rank 1 is inside a slow exchange (it arrived and, being slow, signed the roll as the
    wires do after SIGN_AFTER_S); rank 0's exchange fails and takes the roll: rank 1 must not
    be named, rank 2 (who never came) must."""
    from moe_comm.roll_call import missing_ranks, sign_roll

    buf = moe_comm.Buffer(num_experts=3, timeout=30)
    name = "dispatch/flat/header"
    seq = buf.next_collective(name)
    if rank == 1:
        sign_roll(buf, name, seq)
        time.sleep(4.0)
        return None
    if rank == 2:
        return None
    time.sleep(2.0)
    return missing_ranks(buf, [0, 1, 2], name, seq)


def test_roll_call_names_only_the_rank_that_never_arrived():
    assert run_distributed(3, _roll_call_worker)[0] == [2]


def _default_timeout_worker(rank, world_size):
    from moe_comm.groups import broadcast_bytes

    buf = moe_comm.Buffer(num_experts=4)
    backend = buf.all_ranks_group._get_backend(torch.device("cpu"))
    # How a CUDA Buffer shares its ncclUniqueId: over its own gloo group.
    shared = broadcast_bytes(buf.all_ranks_group, bytes(range(128)) if rank == 0 else b"", 128)
    assert shared == bytes(range(128))
    with buf:
        pass
    assert buf.closed
    with pytest.raises(RuntimeError, match="buffer: this moe_comm.Buffer was closed"):
        moe_comm.dispatch(*_inputs(rank), buf)
    return buf.timeout, backend.options._timeout.total_seconds()


def test_default_timeout_bounds_our_groups_at_ten_minutes_not_gloos_thirty():
    assert run_distributed(2, _default_timeout_worker) == [(600.0, 600.0)] * 2
