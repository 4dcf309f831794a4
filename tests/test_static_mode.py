"""The static mode (API.md: Static budget; README: Static mode): a flat Buffer with
max_tokens_per_rank and dispatch(pad_to_capacity=True) sends B = min(max_tokens, E_local * C)
rows to every peer, reads no header back after the first call, and keeps problems on the device
for Buffer.check(). The CPU runs the control flow CUDA runs: these tests check its results
against the reference, its host waits, and its errors in both status modes."""

import math

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import Case, all_inputs
from tests.checks import assert_dispatch_equal
from tests.distributed import run_distributed

MAX_TOKENS = 16


def _step(buf, x, idx, w, factor, policy, alignment):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idx, w, buf, capacity_factor=factor, drop_policy=policy,
                                                       pad_to_capacity=True, expert_alignment=alignment)
    expert_y = recv_x * 2 + 1
    y = moe_comm.combine(expert_y, handle, w)
    (y.float().square().sum() + recv_w.sum()).backward()
    return recv_x.detach(), recv_w.detach(), counts, handle, y.detach(), x.grad, w.grad


def _static_worker(rank, world_size, topk, hidden, dtype, pattern, policy, alignment, deferred):
    """Several calls with new routings and token counts on one Buffer (what a graph replay
    does): each exact against the reference, combine and gradients equal to those of the same
    call through the synced path, and no host wait once the first call agreed on the shapes."""
    E, factor = 2 * world_size, 0.75
    static = moe_comm.Buffer(num_experts=E, max_tokens_per_rank=MAX_TOKENS,
                             combine_status="deferred" if deferred else "immediate")
    synced = moe_comm.Buffer(num_experts=E, hierarchical=False, combine_status="immediate")
    C_rows = math.ceil(factor * MAX_TOKENS * topk / E)
    waits = []
    for call, tokens in enumerate([(13, 0, 16, 5), (16, 16, 16, 16), (0, 3, 1, 9)]):
        case = Case(world_size, E, topk=topk, hidden=hidden, dtype=dtype, pattern=pattern, tokens=tokens,
                    seed=call + 11)
        xs, idxs, ws = all_inputs(case)
        kept = [reference.drop_by_capacity(i, w, E, factor, policy, tokens=MAX_TOKENS) for i, w in zip(idxs, ws)]
        got = _step(static, xs[rank], idxs[rank], ws[rank], factor, policy, alignment)
        counted = static.counters["dispatch"]
        waits.append(counted["host_waits"])
        if call > 0:  # plan, header, pack, expand; the header and the rows (+ the status agreement)
            assert counted["launches"] == 4, counted
            assert counted["exchanges"] == (0 if world_size == 1 else 2 if deferred else 3), counted
        recv_x, recv_w, counts, handle = got[:4]
        expected = reference.dispatch_all_blocks(xs, kept, ws, E, C_rows, alignment)[rank]
        assert counts.device == recv_x.device  # the static mode's counts stay where the tokens are
        assert_dispatch_equal((recv_x, recv_w, counts.cpu()), expected, what=f"call {call}")
        dropped = int(((idxs[rank] >= 0) & (kept[rank] < 0)).sum())
        assert int(handle.stats["pairs_dropped"]) == dropped
        B = min(MAX_TOKENS, 2 * C_rows)
        assert handle.stats["rows_sent_intra_node"] == B * (world_size - 1)  # the fixed wire
        # The synced path with the same C (its T is the budget: same tokens on every rank there).
        padded_x = torch.zeros(MAX_TOKENS, hidden, dtype=xs[rank].dtype)
        padded_x[:xs[rank].shape[0]] = xs[rank]
        pad_idx = torch.full((MAX_TOKENS, topk), -1, dtype=torch.int64)
        pad_idx[:idxs[rank].shape[0]] = idxs[rank]
        pad_w = torch.zeros(MAX_TOKENS, topk)
        pad_w[:ws[rank].shape[0]] = ws[rank]
        ref = _step(synced, padded_x, pad_idx, pad_w, factor, policy, alignment)
        T = xs[rank].shape[0]
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert torch.equal(got[4], ref[4][:T]) and torch.equal(got[5], ref[5][:T]) and torch.equal(got[6], ref[6][:T])
        for kind in ("combine", "dispatch_backward", "combine_backward"):
            assert static.counters[kind]["host_waits"] == 0, kind
    static.close()
    synced.close()
    return waits


@pytest.mark.parametrize("world_size,topk,hidden,dtype,pattern,policy,alignment,deferred", [
    (4, 3, 5, "float32", "skewed", "probs", 1, True),
    (4, 1, 8, "bfloat16", "one_expert", "position", 8, False),
    (2, 2, 3, "float16", "masked", "probs", 4, True),
    (3, 2, 6, "float32", "random", "position", 1, False),
    (1, 2, 4, "float32", "random", "probs", 1, True),
])
def test_static_mode_matches_the_reference_without_host_waits(world_size, topk, hidden, dtype, pattern, policy,
                                                              alignment, deferred):
    for waits in run_distributed(world_size, _static_worker, topk, hidden, dtype, pattern, policy, alignment,
                                 deferred):
        # The first call reads its headers back (it agrees on the shapes); later ones do not.
        assert waits == [1, 0, 0]


def _inputs(rank, T=8, H=4, K=2, E=4, seed=0):
    gen = torch.Generator().manual_seed(seed * 31 + rank)
    x = torch.randn(T, H, generator=gen)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    w = torch.rand(T, K, generator=gen)
    return x, idx, w


def _good_call(buf, rank):
    x, idx, w = _inputs(rank, seed=5)
    recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf, capacity_factor=1.0, pad_to_capacity=True)
    return recv_x, moe_comm.combine(recv_x, handle, w)


def _one_rank_raises(buf, rank, bad_rank, deferred, call, own, peers):
    """call() raises `own` (type, pattern) on bad_rank at once. The others raise `peers` in the
    same call (immediate statuses), or get zeros from it and raise `peers` from Buffer.check()
    (deferred), on every rank."""
    if rank == bad_rank:
        with pytest.raises(own[0], match=own[1]):
            call()
    elif not deferred:
        with pytest.raises(peers[0], match=peers[1]):
            call()
    else:
        recv_x, recv_w, _, _ = call()
        assert not recv_x.any() and not recv_w.any()  # nothing placed: zeros, not stale rows
    if deferred:
        with pytest.raises(peers[0], match=peers[1]):
            buf.check()


def _errors_worker(rank, world_size, deferred):
    """A bad input on one rank after the shapes were agreed: that rank raises at once. With
    immediate statuses every other rank raises in the same call; deferred, they get zeros and
    Buffer.check() raises on every rank. The Buffer works afterwards."""
    buf = moe_comm.Buffer(num_experts=4, max_tokens_per_rank=8, timeout=30,
                          combine_status="deferred" if deferred else "immediate")
    expected_x, expected_y = _good_call(buf, rank)  # agrees on the shapes
    x, idx, w = _inputs(rank)
    static_error = r"^static mode \(max_tokens_per_rank, pad_to_capacity=True\): a dispatch found on the device that "

    # 1. Rank 1 passes a bad dtype (rejected in Python, before anything moves).
    bad_x = x.double() if rank == 1 else x
    _one_rank_raises(buf, rank, 1, deferred,
                     lambda: moe_comm.dispatch(bad_x, idx, w, buf, capacity_factor=1.0, pad_to_capacity=True),
                     (TypeError, r"^x: dtype must be"),
                     (RuntimeError, static_error + r"dispatch: rank 1 rejected its argument 'x'"))
    buf.check()  # reported once: nothing left

    # 2. A routing value out of range on rank 0, found only on the device.
    bad_idx = idx.clone()
    if rank == 0:
        bad_idx[3, 1] = 99
    if deferred:
        recv_x, _, _, handle = moe_comm.dispatch(x, bad_idx, w, buf, capacity_factor=1.0, pad_to_capacity=True)
        assert not recv_x.any()
        assert not moe_comm.combine(recv_x, handle, w).any()
        # The bad rank names the rule (ValueError); the others name the rank (RuntimeError).
        with pytest.raises((ValueError, RuntimeError), match=r"(topk_idx: a value outside \[-1, num_experts\)|"
                                                             r"rank 0 rejected its argument 'topk_idx')"):
            buf.check()
    else:
        with pytest.raises((ValueError, RuntimeError), match=r"topk_idx"):
            moe_comm.dispatch(x, bad_idx, w, buf, capacity_factor=1.0, pad_to_capacity=True)

    # 3. Rank 0 changes its hidden size alone: it reads its headers (its call changed), finds
    # the disagreement and joins rank 1's fixed exchange, so nobody waits for rows.
    wide = torch.randn(8, 6) if rank == 0 else x
    _one_rank_raises(buf, rank, 0, deferred,
                     lambda: moe_comm.dispatch(wide, idx, w, buf, capacity_factor=1.0, pad_to_capacity=True),
                     (ValueError, r"hidden size is 6 on rank 0 but 4 on rank 1"),
                     (ValueError, static_error + r"rank 0 disagreed with another rank"))

    # 4. Still usable, and what a synced dispatch reports of an earlier static problem.
    recv_x, y = _good_call(buf, rank)
    assert torch.equal(recv_x, expected_x) and torch.equal(y, expected_y)
    if rank == 1:
        bad_idx = idx.clone()
        bad_idx[0, 0] = -7
    else:
        bad_idx = idx
    if deferred:
        moe_comm.dispatch(x, bad_idx, w, buf, capacity_factor=1.0, pad_to_capacity=True)
        with pytest.raises((ValueError, RuntimeError), match=static_error + r".*topk_idx"):
            moe_comm.dispatch(x, idx, w, buf)  # reads its headers: reports it on every rank
    recv_x, y = _good_call(buf, rank)
    assert torch.equal(recv_x, expected_x) and torch.equal(y, expected_y)
    buf.check()
    buf.close()
    return True


@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
def test_static_mode_errors_reach_every_rank(deferred):
    assert run_distributed(2, _errors_worker, deferred) == [True, True]


def _hierarchical_worker(rank, world_size):
    # Static mode is flat only: a hierarchical Buffer pads through the synced path.
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=1, max_tokens_per_rank=8)
    assert buf.hierarchical and buf.static_tokens(True) == 0
    recv_x, _, counts, _ = _step(buf, *_inputs(rank), 1.0, "probs", 1)[:4]
    return counts.device.type, tuple(recv_x.shape)


def test_hierarchical_buffers_use_the_synced_path():
    assert run_distributed(2, _hierarchical_worker) == [("cpu", (16, 4))] * 2  # R = E_local * W * C
