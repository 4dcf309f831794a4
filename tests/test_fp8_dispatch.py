"""FP8 on the wire (API.md): dispatch(wire_dtype=torch.float8_e4m3fn) quantizes in the pack
kernel and dequantizes in the expand, so recv_x must equal the reference dispatch of every
rank's x quantized and dequantized by moe_comm.quantize_fp8's rule, bit for bit; the backward
is the plain dispatch's. A pre-quantized pair (x_fp8, x_scales) moves bit for bit. Flat,
hierarchical (forwarders pass FP8 rows on as they are), capacity and padding, the static mode,
bad input on one rank, and the op path under torch.compile."""

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import Case, all_inputs
from tests.checks import assert_dispatch_equal
from tests.distributed import run_distributed

FP8 = torch.float8_e4m3fn


def _scales(hidden: int) -> int:
    return -(-hidden // 128)


def _crafted(case: Case, xs):
    """Rank 0's first row gets values that hit the conversion's edges with a ratio of exactly 1
    (amax 448): ties between e4m3 neighbours (to even), subnormal steps and their ties, and the
    largest value; its second row is all zeros (the amax floor)."""
    if xs[0].shape[0] < 2 or case.hidden < 16:
        return xs
    edges = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 2.0 ** -10, 3 * 2.0 ** -10, -3 * 2.0 ** -10, 2.0 ** -9,
                          0.0, -0.0, 416.0, 432.0, 240.0, 0.015625 * 1.0625, 2.0 ** -7 * 1.5, 5 * 2.0 ** -11])
    x0 = xs[0].clone()
    x0[0, :16] = edges.to(x0.dtype)
    x0[0, 16:] = 0
    x0[1] = 0
    return [x0] + list(xs[1:])


def _step(rank, case, buf, **kwargs):
    """One FP8 dispatch checked against the reference, its stats, and its backward against the
    plain dispatch's; then the same rows pre-quantized. -> rows this rank received."""
    E, H, dtype = case.num_experts, case.hidden, case.torch_dtype
    xs, idxs, ws = all_inputs(case)
    xs = _crafted(case, xs)
    factor, alignment = kwargs.get("capacity_factor"), kwargs.get("expert_alignment", 1)
    kept = idxs
    if factor is not None:
        tokens = buf.max_tokens_per_rank
        kept = [reference.drop_by_capacity(i, w, E, factor, tokens=tokens) for i, w in zip(idxs, ws)]

    def expected(rows, weights):
        if kwargs.get("pad_to_capacity"):
            C = moe_comm.validation.expert_capacity(factor, tokens or case.tokens_of(rank), case.topk, E)
            return reference.dispatch_all_blocks(rows, kept, weights, E, C, alignment)[rank]
        out = reference.dispatch_all(rows, kept, weights, E)[rank]
        return reference.pad_experts(*out, alignment) if alignment > 1 else out

    x = xs[rank].clone().requires_grad_(True)
    w = ws[rank].clone().requires_grad_(True)
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idxs[rank], w, buf, wire_dtype=FP8, **kwargs)
    counts = counts.cpu()
    assert_dispatch_equal((recv_x.detach(), recv_w.detach(), counts), expected(reference.over_fp8_wire(xs), ws),
                          what=f"{case} {kwargs}")
    sent = handle.stats["rows_sent_intra_node"] + handle.stats["rows_sent_inter_node"]
    wire_bytes = handle.stats["bytes_sent_intra_node"] + handle.stats["bytes_sent_inter_node"]
    assert wire_bytes == sent * (H + 4 * _scales(H))  # e4m3 bytes and scales, no metadata

    # Gradients straight through: the plain dispatch's backward, for the same upstream gradient.
    grad = torch.randn(recv_x.shape, generator=torch.Generator().manual_seed(rank)).to(dtype)
    (recv_x.float() * grad.float()).sum().add((recv_w * 2).sum()).backward()
    x2 = xs[rank].clone().requires_grad_(True)
    w2 = ws[rank].clone().requires_grad_(True)
    plain_x, plain_w, _, _ = moe_comm.dispatch(x2, idxs[rank], w2, buf, **kwargs)
    (plain_x.float() * grad.float()).sum().add((plain_w * 2).sum()).backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)

    # Combine is unchanged: expert rows in x's dtype.
    y = moe_comm.combine(recv_x.detach() * 2, handle, w.detach())
    assert y.shape == x.shape and y.dtype == dtype

    # Pre-quantized: the rows and scales move bit for bit, and dequantize to the FP8 wire's recv_x.
    quantized = [moe_comm.quantize_fp8(r) for r in xs]
    quantized[rank] = moe_comm.quantize_fp8(xs[rank].clone().requires_grad_(True))  # parts that track gradients
    wq = ws[rank].clone().requires_grad_(True)
    (recv_q, recv_s), recv_wq, counts_q, handle_q = moe_comm.dispatch(quantized[rank], idxs[rank], wq, buf, **kwargs)
    assert recv_q.dtype == FP8 and recv_s.dtype == torch.float32 and recv_s.shape == (recv_q.shape[0], _scales(H))
    assert torch.equal(counts_q.cpu(), counts) and torch.equal(recv_wq.detach(), recv_w.detach())
    exp_q, _, _ = expected([q.view(torch.uint8) for q, _ in quantized], ws)
    exp_s, _, _ = expected([s for _, s in quantized], ws)
    assert torch.equal(recv_q.view(torch.uint8), exp_q) and torch.equal(recv_s, exp_s)
    assert torch.equal(moe_comm.dequantize_fp8(recv_q, recv_s, dtype), recv_x.detach())
    assert not recv_q.requires_grad and not recv_s.requires_grad
    (recv_wq * 2).sum().backward()  # the router weights still get their gradient
    assert torch.equal(wq.grad, w2.grad)
    y_q = moe_comm.combine(torch.ones(recv_q.shape, dtype=torch.bfloat16), handle_q, wq.detach())
    assert y_q.dtype == torch.bfloat16 and y_q.shape == x.shape
    return recv_x.shape[0]


FLAT_CASES = [
    Case(3, 6, topk=2, hidden=300, dtype="bfloat16", pattern="masked", tokens=(20, 0, 9), seed=1),
    Case(3, 6, topk=1, hidden=128, dtype="float32", pattern="one_expert", tokens=(5,), seed=2),
    Case(3, 6, topk=3, hidden=129, dtype="float16", pattern="skewed", tokens=(17, 4), seed=3),
    Case(3, 6, topk=2, hidden=5, dtype="float32", pattern="random", tokens=(6, 3, 1), seed=4),
]


def _flat_worker(rank, world_size, lanes):
    moe_comm.C.set_cpu_lanes(lanes)  # the pack's byte / vector splits of each lane
    buf = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size)
    return sum(_step(rank, case, buf) for case in FLAT_CASES)


@pytest.mark.parametrize("lanes", [1, 7])
def test_fp8_dispatch_flat_equals_the_reference_bit_for_bit(lanes):
    assert sum(run_distributed(3, _flat_worker, lanes)) > 0


def _every_code_worker(rank, world_size):
    """Every finite e4m3 value, in blocks whose amax is 448 (a ratio and scale of exactly 1):
    quantize and dequantize must give each value back, through both conversions."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    values = codes[~codes.isnan()]  # 254 values, +-0 included
    x = torch.cat([values, values.new_full((2,), 448.0)]).view(2, 128)  # each block holds 448
    x[1, -1] = -448.0
    idx = torch.tensor([[0], [1]])
    buf = moe_comm.Buffer(num_experts=2, ranks_per_node=world_size)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # every e4m3 value fits each
        recv_x, _, _, _ = moe_comm.dispatch(x.to(dtype), idx, None, buf, wire_dtype=FP8)
        assert torch.equal(recv_x, x.to(dtype)), dtype
    return values.numel()


def test_every_e4m3_value_crosses_the_wire_unchanged():
    assert run_distributed(1, _every_code_worker) == [254]


def _hier_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=2)
    assert buf.hierarchical
    rows = _step(rank, Case(4, 8, topk=3, hidden=260, dtype="bfloat16", pattern="skewed", tokens=(19, 0, 8, 13),
                            seed=5), buf)
    return rows + _step(rank, Case(4, 8, topk=2, hidden=40, dtype="float32", pattern="masked", tokens=(7,), seed=6),
                        buf, capacity_factor=0.75, pad_to_capacity=True, expert_alignment=4)


def test_fp8_dispatch_hierarchical_forwards_rows_as_they_are():
    assert sum(run_distributed(4, _hier_worker)) > 0


def _capacity_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size)
    case = Case(3, 6, topk=2, hidden=200, dtype="bfloat16", pattern="skewed", tokens=(16, 5, 0), seed=7)
    rows = _step(rank, case, buf, capacity_factor=0.5)
    rows += _step(rank, case, buf, capacity_factor=1.0, expert_alignment=8)
    same_tokens = Case(3, 6, topk=2, hidden=200, dtype="float16", pattern="skewed", tokens=(12,), seed=9)
    rows += _step(rank, same_tokens, buf, capacity_factor=0.75, pad_to_capacity=True)
    static = moe_comm.Buffer(num_experts=6, ranks_per_node=world_size, max_tokens_per_rank=16)
    for _ in range(2):  # the static mode's first call reads its headers; the second does not
        rows += _step(rank, case, static, capacity_factor=0.75, pad_to_capacity=True)
    return rows


def test_fp8_dispatch_with_capacity_padding_and_the_static_mode():
    assert sum(run_distributed(3, _capacity_worker)) > 0


def _bad_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size, timeout=20)
    x = torch.randn(5, 130, dtype=torch.bfloat16)
    idx, w = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [2, 1]]), torch.rand(5, 2)
    q, s = moe_comm.quantize_fp8(x)
    bad = [
        (dict(x=x, wire_dtype=torch.float16), ValueError, r"^wire_dtype: must be None .* or torch.float8_e4m3fn",
         "wire_dtype"),
        (dict(x=q), TypeError, r"^x: a float8_e4m3fn x needs its scales", "x"),
        (dict(x=(q, s[:, :1])), ValueError, r"^x: x_scales of the pair .* must be float32 \[tokens, ceil", "x"),
        (dict(x=(q, s.double())), ValueError, r"^x: x_scales of the pair", "x"),
        (dict(x=(x, s)), TypeError, r"^x: x_fp8 of the pair .* must be a 2-D float8_e4m3fn", "x"),
        (dict(x=(q, s, s)), TypeError, r"^x: a tuple x must be the pair", "x"),
        (dict(x=(q, s), wire_dtype=torch.bfloat16), ValueError, r"^wire_dtype:", "wire_dtype"),
    ]
    for kwargs, exc_type, match, argument in bad:
        if rank == 1:
            with pytest.raises(exc_type, match=match):
                moe_comm.dispatch(kwargs.pop("x"), idx, w, buf, **kwargs)
        else:
            with pytest.raises(RuntimeError, match=rf"^dispatch: rank 1 rejected its argument '{argument}'"):
                moe_comm.dispatch(x, idx, w, buf, wire_dtype=FP8)
        recv_x, _, _, handle = moe_comm.dispatch(x, idx, w, buf, wire_dtype=FP8)  # still usable
        assert moe_comm.combine(recv_x, handle, w).shape == x.shape
    # Ranks that disagree on the wire: every rank raises, naming it, before any row moves.
    with pytest.raises(ValueError, match=r"x: dtype and wire is .* on rank \d but .* on rank \d"):
        moe_comm.dispatch(x, idx, w, buf, wire_dtype=FP8 if rank == 0 else None)
    # A pre-quantized dispatch's combine takes bfloat16, and says so.
    (recv_q, _), _, _, handle = moe_comm.dispatch((q, s), idx, w, buf)
    if rank == 0:
        with pytest.raises(TypeError, match=r"pre-quantized FP8 dispatch"):
            moe_comm.combine(recv_q.float(), handle, w)
    else:
        with pytest.raises(RuntimeError, match=r"rank 0 rejected its argument 'expert_y'"):
            moe_comm.combine(recv_q.to(torch.bfloat16), handle, w)
    # The torch-op path (torch.compile) checks wire_dtype the same way, on every rank.
    if rank == 1:
        with pytest.raises(ValueError, match=r"^wire_dtype: must be None"):
            moe_comm.library.dispatch(x, idx, w, buf, None, "probs", 1, False, torch.float16)
    else:
        with pytest.raises(RuntimeError, match=r"rank 1 rejected its argument 'wire_dtype'"):
            moe_comm.library.dispatch(x, idx, w, buf, None, "probs", 1, False, FP8)
    return len(bad)


def test_bad_fp8_input_raises_on_every_rank_and_sends_nothing():
    assert run_distributed(2, _bad_worker) == [7, 7]


def _compiled_worker(rank, world_size):
    torch._dynamo.reset()
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size)
    case = Case(2, 4, topk=2, hidden=136, dtype="bfloat16", pattern="masked", tokens=(9, 4), seed=8)
    xs, idxs, ws = all_inputs(case)

    def step(x, idx, w):
        recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idx, w, buf, wire_dtype=FP8)
        return moe_comm.combine(recv_x * 2, handle, w), recv_x

    def step_quantized(q, s, idx, w):
        (recv_q, recv_s), recv_w, counts, handle = moe_comm.dispatch((q, s), idx, w, buf)
        return recv_q, recv_s, recv_w

    x = xs[rank].clone().requires_grad_(True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y, recv_x = compiled(x, idxs[rank], ws[rank])
    y.float().sum().backward()
    x_eager = xs[rank].clone().requires_grad_(True)
    y_eager, recv_eager = step(x_eager, idxs[rank], ws[rank])
    y_eager.float().sum().backward()
    assert torch.equal(y, y_eager) and torch.equal(recv_x, recv_eager) and torch.equal(x.grad, x_eager.grad)
    q, s = moe_comm.quantize_fp8(xs[rank])
    got = torch.compile(step_quantized, backend="aot_eager", fullgraph=True)(q, s, idxs[rank], ws[rank])
    want = step_quantized(q, s, idxs[rank], ws[rank])
    assert got[0].dtype == FP8 and all(torch.equal(a.view(torch.uint8) if a.dtype == FP8 else a,
                                                   b.view(torch.uint8) if b.dtype == FP8 else b)
                                       for a, b in zip(got, want))
    return recv_x.shape[0]


def test_fp8_dispatch_compiles_and_equals_eager():
    assert sum(run_distributed(2, _compiled_worker)) > 0


def _layer_worker(rank, world_size):
    """MoELayer(wire_dtype=float8_e4m3fn): the same layer as without, within FP8's rounding
    (e4m3 keeps 3 mantissa bits), and not bit-equal to it (the rows did cross in FP8)."""
    from moe_comm.nn import MoELayer
    buf = moe_comm.Buffer(num_experts=4, ranks_per_node=world_size)
    torch.manual_seed(0)
    plain = MoELayer(64, 32, 4, 2, buf)
    fp8 = MoELayer(64, 32, 4, 2, buf, wire_dtype=FP8)
    fp8.load_state_dict(plain.state_dict())
    x = torch.randn(24 + 8 * rank, 64, generator=torch.Generator().manual_seed(rank))
    outs = []
    for layer in (plain, fp8):
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.square().sum().backward()
        outs.append((y.detach(), xg.grad, layer.w_up.grad))
    for a, b in zip(*outs):
        assert not torch.equal(a, b)
        assert (a - b).norm() <= 0.1 * a.norm(), (a - b).norm() / a.norm()
    return True


def test_moe_layer_with_fp8_dispatch_rows():
    assert run_distributed(2, _layer_worker) == [True, True]
