"""Expert capacity (API.md: Capacity): each expert keeps at most C = ceil(factor * T * K / E) of a
rank's (token, expert) pairs, the largest weights ("probs") or the first tokens ("position");
dropped pairs are never sent. Checked against moe_comm.reference.drop_by_capacity, exactly, at
the kernel (every split into workers) and through whole dispatch/combine/backward steps, flat
and hierarchical."""

import math

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import Case, all_inputs, expert_scale
from tests.checks import assert_combine_close, assert_dispatch_equal
from tests.distributed import run_distributed

C = moe_comm.C


@pytest.fixture(params=[1, 3, 32], ids=lambda n: f"workers{n}")
def workers(request):
    C.set_cpu_lanes(request.param)  # the plans' CPU workers are the emulated lanes
    yield request.param
    C.set_cpu_lanes(1)


def _routing(T, K, E, seed, skew=0.0, mask=0.2):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=gen) * torch.linspace(1.0 + skew, 1.0, E)
    idx = scores.argsort(dim=1, descending=True)[:, :K].contiguous()
    idx = idx.masked_fill(torch.rand(T, K, generator=gen) < mask, -1)
    # Coarse weights: many ties, so the tie rule (lower token first) is exercised.
    weights = (torch.rand(T, K, generator=gen) * 4).floor() / 4
    return idx, weights


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("T,K,E,factor,skew", [(0, 2, 4, 1.0, 0.0), (1, 1, 1, 0.5, 0.0), (37, 3, 8, 1.0, 3.0),
                                              (200, 4, 16, 0.5, 5.0), (64, 8, 8, 2.0, 0.0), (50, 2, 6, 0.01, 1.0)])
def test_kernel_drops_exactly_what_the_reference_drops(T, K, E, factor, skew, policy, workers):
    idx, w = _routing(T, K, E, seed=T + K + E, skew=skew)
    capacity = math.ceil(factor * T * K / E)
    kept, dropped = C.drop_by_capacity(idx, w, E, capacity, policy == "probs")
    expected = reference.drop_by_capacity(idx, w, E, factor, policy)
    assert torch.equal(kept, expected)
    assert int(dropped) == int(((idx >= 0) & (expected < 0)).sum())
    if T > 1:  # a NaN weight ranks below every number
        w[::3] = float("nan")
        kept, _ = C.drop_by_capacity(idx, w, E, capacity, policy == "probs")
        assert torch.equal(kept, reference.drop_by_capacity(idx, w, E, factor, policy))
    for e in range(E):
        assert int((kept == e).sum()) == min(capacity, int((idx == e).sum()))


def _check(rank, case, buf, factor, policy):
    """One step with capacity on: dispatch exact against the reference on the kept routing,
    combine within rounding, gradients equal to a dispatch of the kept routing itself, and the
    dropped pairs counted and given a zero weight gradient."""
    E = case.num_experts
    xs, idxs, ws = all_inputs(case)
    kept = [reference.drop_by_capacity(i, w, E, factor, policy) for i, w in zip(idxs, ws)]
    x = xs[rank].clone().requires_grad_(True)
    w = ws[rank].clone().requires_grad_(True)
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idxs[rank], w, buf, capacity_factor=factor,
                                                       drop_policy=policy)
    ref = reference.dispatch_all(xs, kept, ws, E)
    assert_dispatch_equal((recv_x.detach(), recv_w.detach(), counts), ref[rank], what=f"{case} {policy}")
    assert handle.stats["pairs_dropped"] == int(((idxs[rank] >= 0) & (kept[rank] < 0)).sum())

    dtype = case.torch_dtype
    scale = expert_scale(case, rank, recv_x.shape[0], counts)
    y = moe_comm.combine((recv_x.float() * scale).to(dtype), handle, w)
    expert_ys = [(r[0].float() * expert_scale(case, d, r[0].shape[0], r[2])).to(dtype) for d, r in enumerate(ref)]
    tokens = [case.tokens_of(r) for r in range(case.world_size)]
    ref_y = reference.combine_all(expert_ys, kept, ws, E, tokens, dtype)[rank]
    bound = reference.combine_all([e.float().abs() for e in expert_ys], kept, ws, E, tokens, torch.float32)[rank]
    assert_combine_close(y.detach(), ref_y, bound, dtype, stages=len(buf.stages), what=f"{case} {policy}")
    y.float().square().sum().backward()

    # The same step on the kept routing, no capacity: the same gradients.
    x2 = xs[rank].clone().requires_grad_(True)
    w2 = ws[rank].clone().requires_grad_(True)
    recv_x2, _, counts2, handle2 = moe_comm.dispatch(x2, kept[rank], w2, buf)
    y2 = moe_comm.combine((recv_x2.float() * expert_scale(case, rank, recv_x2.shape[0], counts2)).to(dtype),
                          handle2, w2)
    y2.float().square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)
    assert not w.grad[(idxs[rank] >= 0) & (kept[rank] < 0)].any()  # dropped pairs: zero gradient
    return handle.stats["pairs_dropped"]


CASES = [
    Case(3, 6, topk=2, hidden=5, pattern="skewed", tokens=(40, 0, 17), seed=1),
    Case(3, 6, topk=1, hidden=8, pattern="one_expert", tokens=(9,), seed=2),
    Case(3, 6, topk=3, hidden=7, dtype="bfloat16", pattern="masked", tokens=(25, 12), seed=3),
]


def _flat_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size)
    dropped = 0
    for case in CASES:
        for policy in ("probs", "position"):
            for factor in (0.5, 1.0, 4.0):
                dropped += _check(rank, case, buf, factor, policy)
    return dropped


def test_capacity_through_whole_steps_flat():
    assert sum(run_distributed(3, _flat_worker)) > 0  # some pairs were dropped


def _hier_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=2)
    assert buf.hierarchical
    case = Case(4, 8, topk=3, hidden=6, pattern="skewed", tokens=(30, 11, 0, 23), seed=4)
    return sum(_check(rank, case, buf, factor, policy) for policy in ("probs", "position") for factor in (0.5, 1.5))


def test_capacity_through_whole_steps_hierarchical():
    assert sum(run_distributed(4, _hier_worker)) > 0


def _bad_capacity_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size, timeout=20)
    x, idx = torch.randn(5, 4), torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [2, 1]])
    w = torch.rand(5, 2)
    bad = {"zero": dict(capacity_factor=0.0), "nan": dict(capacity_factor=float("nan")),
           "type": dict(capacity_factor="1"), "policy": dict(capacity_factor=1.0, drop_policy="random"),
           "probs without weights": dict(capacity_factor=1.0)}
    expected = {"zero": (ValueError, r"^capacity_factor: must be a finite number > 0", "capacity_factor"),
                "nan": (ValueError, r"^capacity_factor: must be a finite number > 0", "capacity_factor"),
                "type": (TypeError, r"^capacity_factor: must be a number or None", "capacity_factor"),
                "policy": (ValueError, r"^drop_policy: must be one of", "drop_policy"),
                "probs without weights": (ValueError, r"^drop_policy: 'probs' keeps the largest", "drop_policy")}
    for name, kwargs in bad.items():
        exc_type, match, argument = expected[name]
        weights = None if name == "probs without weights" else w
        if rank == 1:
            with pytest.raises(exc_type, match=match):
                moe_comm.dispatch(x, idx, weights, buf, **kwargs)
        else:
            with pytest.raises(RuntimeError, match=rf"^dispatch: rank 1 rejected its argument '{argument}'"):
                moe_comm.dispatch(x, idx, w, buf, capacity_factor=1.0)
        recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf, capacity_factor=1.0)  # still usable
        assert moe_comm.combine(recv_x, handle, w).shape == x.shape
    return len(bad)


def test_bad_capacity_arguments_raise_on_every_rank():
    assert run_distributed(2, _bad_capacity_worker) == [5, 5]


def _aligned_worker(rank, world_size, ranks_per_node, alignment):
    """expert_alignment: each local expert's segment ends with zero rows up to a multiple of it;
    everything else is the unaligned step's, bit for bit, and padding rows get zero gradient."""
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=ranks_per_node)
    case = Case(world_size, 8, topk=3, hidden=5, pattern="skewed", tokens=(13, 0, 22, 5), seed=6)
    xs, idxs, ws = all_inputs(case)
    outputs = []
    for kwargs in (dict(expert_alignment=alignment), dict(), dict(capacity_factor=0.75, expert_alignment=alignment)):
        x = xs[rank].clone().requires_grad_(True)
        w = ws[rank].clone().requires_grad_(True)
        recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idxs[rank], w, buf, **kwargs)
        kept = idxs
        if "capacity_factor" in kwargs:
            kept = [reference.drop_by_capacity(i, ww, 8, 0.75, "probs") for i, ww in zip(idxs, ws)]
        expected = reference.dispatch_all(xs, kept, ws, 8)[rank]
        if "expert_alignment" in kwargs:
            expected = reference.pad_experts(*expected, alignment)
            assert all(int(c) % alignment == 0 for c in counts)
        assert_dispatch_equal((recv_x.detach(), recv_w.detach(), counts), expected, what=str(kwargs))
        expert_y = recv_x * 3
        expert_y.retain_grad()
        y = moe_comm.combine(expert_y, handle, w)
        y.square().sum().backward()
        outputs.append((y.detach(), x.grad, w.grad, expert_y.grad, counts))
    (y_a, gx_a, gw_a, gy_a, counts_a), (y_u, gx_u, gw_u, gy_u, counts_u), _ = outputs
    assert torch.equal(y_a, y_u) and torch.equal(gx_a, gx_u) and torch.equal(gw_a, gw_u)
    real = torch.cat([torch.arange(int(p)) < int(r) for p, r in zip(counts_a, counts_u)])
    assert torch.equal(gy_a[real], gy_u) and not gy_a[~real].any()  # padding rows: zero gradient
    return int((~real).sum())


@pytest.mark.parametrize("ranks_per_node,alignment", [(4, 4), (2, 3), (4, 1)])
def test_expert_alignment_pads_with_zero_rows_and_changes_nothing_else(ranks_per_node, alignment):
    padding = run_distributed(4, _aligned_worker, ranks_per_node, alignment)
    assert (sum(padding) > 0) == (alignment > 1)


def _bad_alignment_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size, timeout=20)
    x, idx, w = torch.randn(5, 4), torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [2, 1]]), torch.rand(5, 2)
    for bad, exc_type, match in ((0, ValueError, r"^expert_alignment: must be in \[1, 2\*\*40\]"),
                                 ("4", TypeError, r"^expert_alignment: must be an int")):
        if rank == 0:
            with pytest.raises(exc_type, match=match):
                moe_comm.dispatch(x, idx, w, buf, expert_alignment=bad)
        else:
            with pytest.raises(RuntimeError, match=r"^dispatch: rank 0 rejected its argument 'expert_alignment'"):
                moe_comm.dispatch(x, idx, w, buf, expert_alignment=4)
    recv_x, _, counts, handle = moe_comm.dispatch(x, idx, w, buf, expert_alignment=4)
    assert all(int(c) % 4 == 0 for c in counts)
    return moe_comm.combine(recv_x, handle, w).shape == x.shape


def test_bad_expert_alignment_raises_on_every_rank():
    assert run_distributed(2, _bad_alignment_worker) == [True, True]


def _padded_worker(rank, world_size, ranks_per_node, alignment, topk, dtype, pattern, policy):
    """pad_to_capacity: every (expert, source rank) block has exactly C rows, R = E_local * W * C
    (aligned) on every rank whatever the routing; combine and the gradients as without padding."""
    max_tokens = 24
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=ranks_per_node, max_tokens_per_rank=max_tokens)
    case = Case(world_size, 8, topk=topk, hidden=5, dtype=dtype, pattern=pattern, tokens=(13, 0, 22, 5), seed=7)
    xs, idxs, ws = all_inputs(case)
    factor = 0.75
    C_rows = math.ceil(factor * max_tokens * topk / 8)
    kept = [reference.drop_by_capacity(i, w, 8, factor, policy, tokens=max_tokens) for i, w in zip(idxs, ws)]
    results = []
    for pad in (True, False):
        x = xs[rank].clone().requires_grad_(True)
        w = ws[rank].clone().requires_grad_(True)
        recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idxs[rank], w, buf, capacity_factor=factor,
                                                           drop_policy=policy, pad_to_capacity=pad,
                                                           expert_alignment=alignment)
        if pad:
            segment = -(-world_size * C_rows // alignment) * alignment
            assert counts.tolist() == [segment] * 2 and recv_x.shape[0] == 2 * segment  # static shapes
            expected = reference.dispatch_all_blocks(xs, kept, ws, 8, C_rows, alignment)[rank]
        else:
            expected = reference.pad_experts(*reference.dispatch_all(xs, kept, ws, 8)[rank], alignment)
        assert_dispatch_equal((recv_x.detach(), recv_w.detach(), counts), expected, what=f"pad {pad}")
        # Garbage in the padding rows of expert_y must not reach y; gradients the caller puts on
        # padding rows of recv_x and recv_weights must not reach x or w.
        garbage = torch.where(recv_w.detach() == 0, float("nan"), 0.0).unsqueeze(1).to(recv_x.dtype)
        expert_y = recv_x * 3 + garbage
        expert_y.retain_grad()
        y = moe_comm.combine(expert_y, handle, w)
        (y.square().sum() + recv_x.sum() + recv_w.sum()).backward()
        results.append((y.detach(), x.grad, w.grad, expert_y.grad, recv_w.detach()))
    (y_p, gx_p, gw_p, gy_p, rw_p), (y_u, gx_u, gw_u, gy_u, rw_u) = results
    assert torch.equal(y_p, y_u) and torch.equal(gx_p, gx_u) and torch.equal(gw_p, gw_u)
    assert torch.equal(gy_p[rw_p != 0], gy_u[rw_u != 0]) and not gy_p[rw_p == 0].any()
    return recv_x.shape[0]


@pytest.mark.parametrize("ranks_per_node,alignment,topk,dtype,pattern,policy", [
    (4, 1, 3, "float32", "skewed", "probs"), (2, 8, 3, "float32", "skewed", "position"),
    (4, 4, 1, "bfloat16", "one_expert", "probs"), (2, 1, 2, "float16", "masked", "position")])
def test_pad_to_capacity_gives_static_blocks(ranks_per_node, alignment, topk, dtype, pattern, policy):
    run_distributed(4, _padded_worker, ranks_per_node, alignment, topk, dtype, pattern, policy)


def _pad_disagreement_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size, timeout=20)  # no max_tokens_per_rank
    tokens = 6 if rank == 0 else 9  # so C differs
    gen = torch.Generator().manual_seed(rank)
    x, w = torch.randn(tokens, 4, generator=gen), torch.rand(tokens, 2, generator=gen)
    idx = torch.rand(tokens, 4, generator=gen).argsort(dim=1)[:, :2]
    with pytest.raises(ValueError, match=r"pad_to_capacity is C = \d on rank \d but C = \d on rank \d"):
        moe_comm.dispatch(x, idx, w, buf, capacity_factor=1.0, pad_to_capacity=True)
    # No tokens on rank 0 (C = 0) padding, rank 1 not padding: a disagreement, not a silent mix.
    with pytest.raises(ValueError, match=r"pad_to_capacity is (C = 0|off) on rank \d but (off|C = 0) on rank \d"):
        if rank == 0:
            moe_comm.dispatch(x[:0], idx[:0], w[:0], buf, capacity_factor=1.0, pad_to_capacity=True)
        else:
            moe_comm.dispatch(x, idx, w, buf, capacity_factor=1.0)
    # A capacity past 2**40 rows: rejected on every rank, not an overflow on one.
    if rank == 0:
        with pytest.raises(ValueError, match=r"^capacity_factor: 1e\+20 gives a capacity over 2\*\*40 rows"):
            moe_comm.dispatch(x, idx, w, buf, capacity_factor=1e20)
    else:
        with pytest.raises(RuntimeError, match=r"^dispatch: rank 0 rejected its argument 'capacity_factor'"):
            moe_comm.dispatch(x, idx, w, buf, capacity_factor=1.0)
    with pytest.raises((ValueError, RuntimeError), match=r"pad_to_capacity"):
        moe_comm.dispatch(x, idx, w, buf, pad_to_capacity=rank == 0)  # no capacity_factor on rank 0
    small = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size, timeout=20, max_tokens_per_rank=7)
    if rank == 1:
        with pytest.raises(ValueError, match=r"^x: has 9 tokens, more than the Buffer's max_tokens_per_rank 7"):
            moe_comm.dispatch(x, idx, w, small)
    else:
        with pytest.raises(RuntimeError, match=r"^dispatch: rank 1 rejected its argument 'x'"):
            moe_comm.dispatch(x, idx, w, small)
    # A rank rejected while the others pad: every rank raises, naming it.
    bad_x = x[:7].double() if rank == 1 else x[:7]
    if rank == 1:
        with pytest.raises(TypeError, match=r"^x: dtype must be"):
            moe_comm.dispatch(bad_x, idx[:7], w[:7], small, capacity_factor=1.0, pad_to_capacity=True)
    else:
        with pytest.raises(RuntimeError, match=r"^dispatch: rank 1 rejected its argument 'x'"):
            moe_comm.dispatch(bad_x, idx[:7], w[:7], small, capacity_factor=1.0, pad_to_capacity=True)
    recv_x, _, _, handle = moe_comm.dispatch(x[:7], idx[:7], w[:7], small, capacity_factor=1.0, pad_to_capacity=True)
    return tuple(recv_x.shape)


def test_pad_to_capacity_errors_on_every_rank():
    shapes = run_distributed(2, _pad_disagreement_worker)
    assert shapes[0] == shapes[1]  # the same static shape on both ranks
