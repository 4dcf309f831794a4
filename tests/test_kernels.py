"""The C++ CPU kernels (moe_comm._C) against plain torch and moe_comm.reference, single process."""

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import DTYPES

C = moe_comm.C
SLOT_META_BYTES = C.SLOT_META_BYTES


@pytest.fixture(params=[1, 3, 32], ids=lambda n: f"lanes{n}")
def lanes(request):
    """Runs the single-source kernel bodies with this many emulated lanes per row, as a GPU
    block's threads run them (1 is the CPU backend's default)."""
    C.set_cpu_lanes(request.param)
    yield request.param
    C.set_cpu_lanes(1)


def _routing(T, K, E, seed, mask=0.3):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    return idx.masked_fill(torch.rand(T, K, generator=gen) < mask, -1)


def _special_floats():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4000, generator=gen) * 10.0 ** torch.randint(-9, 6, (4000,), generator=gen),
        # (no -0.0: the accumulator starts at +0.0, so a sum of one -0.0 is +0.0, as in torch.sum)
        torch.tensor([0.0, 1.0, 65504.0, 65519.0, 65520.0, 70000.0, 6e-8, 3e-8, 2.98e-8,
                      6.1e-5, 6.0e-5, 1e-40, -1e-40, 3.4e38, float("inf"), float("-inf")]),
        # exact halfway points between neighbouring bf16 / fp16 values: ties to even
        torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11]),
    ])
    return x


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_float_conversions_round_like_torch(dtype):
    dt = DTYPES[dtype]
    x = _special_floats().unsqueeze(1)
    identity = torch.arange(x.shape[0]).unsqueeze(1)
    out = torch.empty(x.shape, dtype=dt)
    C.reduce_rows(x, identity, None, out)  # float32 -> dtype
    expected = x.to(dt)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    back = torch.empty(x.shape, dtype=torch.float32)
    C.reduce_rows(expected, identity, None, back)  # dtype -> float32 is exact
    assert torch.equal(back, expected.float())
    nan = torch.full((1, 1), float("nan"))
    C.reduce_rows(nan, torch.zeros(1, 1, dtype=torch.int64), None, out[:1])
    assert torch.isnan(out[:1].float()).all()


@pytest.mark.parametrize("T,K,E,W", [(0, 2, 4, 2), (1, 1, 1, 1), (37, 3, 16, 4), (200, 8, 32, 8), (50, 6, 6, 3)])
def test_plan_send_matches_python(T, K, E, W, lanes):
    idx = _routing(T, K, E, seed=T + K)
    tokens_per_rank, pairs_per_expert, offsets, send_token, pair_slot, first_slot = C.plan_send(idx, E, W)
    per_rank = E // W
    dest = (idx // per_rank).masked_fill(idx < 0, -1)
    expected_tokens = [[t for t in range(T) if d in dest[t].tolist()] for d in range(W)]
    assert tokens_per_rank.tolist() == [len(ts) for ts in expected_tokens]
    assert pairs_per_expert.tolist() == [int((idx == e).sum()) for e in range(E)]
    assert offsets.tolist() == [0] + torch.tensor([len(ts) for ts in expected_tokens]).cumsum(0).tolist()
    assert send_token.tolist() == [t for ts in expected_tokens for t in ts]
    for t in range(T):
        seen = set()
        for k in range(K):
            d = int(dest[t, k])
            if d < 0:
                assert pair_slot[t, k] == -1 and first_slot[t, k] == -1
                continue
            slot = int(pair_slot[t, k])
            assert offsets[d] <= slot < offsets[d + 1] and send_token[slot] == t
            assert int(first_slot[t, k]) == (slot if d not in seen else -1)
            seen.add(d)
    # The counts-only plan gives the same counts (the hierarchical header uses it).
    assert torch.equal(C.count_tokens(idx, E, W), tokens_per_rank)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("W", [1, 3])
@pytest.mark.parametrize("H", [13, 64, 69])  # element path; 16-byte vectors; vectors + tail
def test_pack_then_expand_equals_reference(dtype, W, H, lanes):
    T, K, E = 41, 3, 6 * W
    dt = DTYPES[dtype]
    idx = _routing(T, K, E, seed=W)
    x = torch.randn(T, H).to(dt)
    w = torch.rand(T, K)
    _, _, offsets, send_token, _, _ = C.plan_send(idx, E, W)
    _, meta_offset, meta_bytes, row_bytes = C.row_format(H, x.element_size(), K, SLOT_META_BYTES)
    rows = torch.full((send_token.numel(), row_bytes), 0xAB, dtype=torch.uint8)  # poisoned
    C.pack_rows(x, send_token, offsets, idx, w, E // W, rows)
    assert rows.shape == (send_token.numel(), row_bytes) and row_bytes % 16 == 0
    assert torch.equal(rows.view(dt)[:, :H], x[send_token])
    empty = [x[:0]] * (W - 1)
    expected = reference.dispatch_all([x] + empty, [idx] + [idx[:0]] * (W - 1), [w] + [w[:0]] * (W - 1), E)
    for d in range(W):
        segment = rows[offsets[d]:offsets[d + 1]]
        recv_x, recv_w, counts, row_map, slot_w = C.expand_rows(segment, H, dt, K, E // W, None)
        ref_x, ref_w, ref_counts = expected[d]
        assert torch.equal(counts, ref_counts) and torch.equal(recv_x, ref_x) and torch.equal(recv_w, ref_w)
        assert sorted(row_map[row_map >= 0].tolist()) == list(range(recv_x.shape[0]))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H,strided", [(13, False), (128, False), (300, True), (129, True)])
def test_quantizing_pack_writes_quantize_fp8s_rows(dtype, H, strided, lanes):
    """FP8 rows: e4m3 bytes, then at a 16-byte offset one float32 scale per 128 elements, then
    the SlotMeta block; equal to moe_comm.quantize_fp8 of the token, every other byte zero."""
    T, K, E, W = 37, 3, 12, 3
    dt = DTYPES[dtype]
    idx = _routing(T, K, E, seed=H)
    base = torch.randn(T, H + 1).to(dt) * torch.logspace(-6, 3, T).unsqueeze(1).to(dt)
    x = base[:, 1:] if strided else base[:, :H].contiguous()  # strided: rows not 16-aligned
    x[0] = 0  # the amax floor
    w = torch.rand(T, K)
    _, _, offsets, send_token, _, _ = C.plan_send(idx, E, W)
    payload, meta_offset, meta_bytes, row_bytes, scale_offset, scale_bytes = C.fp8_row_format(H, K, SLOT_META_BYTES)
    assert payload == H and scale_offset % 16 == 0 and meta_offset % 16 == 0 and scale_bytes == 4 * -(-H // 128)
    rows = torch.full((send_token.numel(), row_bytes), 0xAB, dtype=torch.uint8)  # poisoned
    C.pack_rows(x, send_token, offsets, idx, w, E // W, rows, quantize=True)
    q, s = moe_comm.quantize_fp8(x)
    assert torch.equal(rows[:, :H], q.view(torch.uint8)[send_token])
    assert torch.equal(rows[:, scale_offset:scale_offset + scale_bytes].contiguous().view(torch.float32), s[send_token])
    assert not rows[:, H:scale_offset].any() and not rows[:, scale_offset + scale_bytes:meta_offset].any()
    assert not rows[:, meta_offset + meta_bytes:].any()
    plain = torch.empty((send_token.numel(), C.row_format(H, x.element_size(), K, SLOT_META_BYTES)[3]),
                        dtype=torch.uint8)
    C.pack_rows(x, send_token, offsets, idx, w, E // W, plain)
    plain_meta = C.row_format(H, x.element_size(), K, SLOT_META_BYTES)[1]
    assert torch.equal(rows[:, meta_offset:meta_offset + meta_bytes], plain[:, plain_meta:plain_meta + meta_bytes])


def test_expand_follows_row_order():
    """Rows expand in the given order: the order decides each expert's row sequence, the row
    map still indexes arrival rows."""
    T, K, E, H = 9, 2, 2, 5
    idx = _routing(T, K, E, seed=3, mask=0.2)
    x = torch.arange(T * H, dtype=torch.float32).view(T, H)
    _, _, offsets, send_token, _, _ = C.plan_send(idx, E, 1)
    rows = torch.empty((send_token.numel(), C.row_format(H, 4, K, SLOT_META_BYTES)[3]), dtype=torch.uint8)
    C.pack_rows(x, send_token, offsets, idx, None, E, rows)
    order = torch.randperm(send_token.numel(), generator=torch.Generator().manual_seed(1))
    recv_x, _, counts, row_map, _ = C.expand_rows(rows, H, torch.float32, K, E, order)
    plain_x, _, plain_counts, _, _ = C.expand_rows(rows[order], H, torch.float32, K, E, None)
    assert torch.equal(counts, plain_counts) and torch.equal(recv_x, plain_x)
    valid = row_map >= 0
    assert torch.equal(recv_x[row_map[valid]], x[send_token].repeat_interleave(valid.sum(1), dim=0))
    # The counts a header announces are checked against what arrived (the CUDA path sizes
    # recv_x from them without looking).
    announced = C.expand_rows(rows, H, torch.float32, K, E, order, counts.clone())
    assert torch.equal(announced[0], recv_x)
    wrong = counts.clone()
    wrong[0] += 1
    with pytest.raises(RuntimeError, match="header announced"):
        C.expand_rows(rows, H, torch.float32, K, E, order, wrong)


@pytest.mark.parametrize("src_dtype,dst_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                                 ("float16", "float32"), ("float32", "bfloat16")])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("H", [19, 64, 70])
def test_reduce_rows_matches_torch(src_dtype, dst_dtype, weighted, H, lanes):
    gen = torch.Generator().manual_seed(5)
    N, K, R = 23, 4, 40
    src = torch.randn(R, H, generator=gen).to(DTYPES[src_dtype])
    index = torch.randint(0, R, (N, K), generator=gen).masked_fill(torch.rand(N, K, generator=gen) < 0.3, -1)
    index[0] = -1
    weights = torch.rand(N, K, generator=gen) if weighted else None
    dst = torch.full((N, H), float("nan")).to(DTYPES[dst_dtype])
    C.reduce_rows(src, index, weights, dst)
    w = weights if weighted else torch.ones(N, K)
    expected = (src.float()[index.clamp(min=0)] * (w * (index >= 0)).unsqueeze(2)).sum(dim=1)
    torch.testing.assert_close(dst.float(), expected.to(DTYPES[dst_dtype]).float(), rtol=1e-2, atol=1e-2)
    assert not dst[0].float().any()


def test_reduce_rows_reads_strided_rows(lanes):
    packed = torch.randn(6, 12)
    src = packed[:, :5]  # rows 48 bytes apart
    out = torch.empty(6, 5)
    C.reduce_rows(src, torch.arange(6).unsqueeze(1), None, out)
    assert torch.equal(out, src)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H", [11, 64, 68])
def test_scatter_rows_and_row_dots(dtype, H, lanes):
    gen = torch.Generator().manual_seed(9)
    dt = DTYPES[dtype]
    N, K = 17, 3
    perm = torch.randperm(N * K, generator=gen)
    row_map = perm.view(N, K).clone()
    row_map[row_map % 4 == 0] = -1
    valid = row_map[row_map >= 0]
    remap = torch.full((N * K,), -1, dtype=torch.int64)
    remap[valid.sort().values] = torch.arange(valid.numel())
    row_map = torch.where(row_map >= 0, remap[row_map.clamp(min=0)], row_map)
    R = valid.numel()
    src = torch.randn(N, H, generator=gen).to(dt)
    weights = torch.rand(N, K, generator=gen)
    out = torch.full((R, H), float("nan")).to(dt)
    C.scatter_rows(src, row_map, weights, out)
    plain = torch.full((R, H), float("nan")).to(dt)
    C.scatter_rows(src, row_map, None, plain)
    other = torch.randn(R, H, generator=gen).to(dt)
    dots = C.row_dots(src, other, row_map)
    for i in range(N):
        for k in range(K):
            r = int(row_map[i, k])
            if r < 0:
                assert dots[i, k] == 0
                continue
            assert torch.equal(plain[r], src[i])
            assert torch.equal(out[r], (src[i].float() * weights[i, k]).to(dt))
            torch.testing.assert_close(dots[i, k], (src[i].float() * other[r].float()).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_send_plan_of_a_bad_routing_counts_only_valid_slots(seed, lanes):
    """The engine plans before a routing's status is known: an index outside [0, E) plans as
    masked (nothing out of bounds); the status it reports reaches the header (test_errors)."""
    gen = torch.Generator().manual_seed(seed)
    T, K, E = int(torch.randint(0, 6, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen)), 6
    idx = torch.randint(-2, E + 2, (T, K), generator=gen)
    tokens_per_rank, pairs, offsets, send_token, pair_slot, _ = C.plan_send(idx, E, 2)
    valid = (idx >= 0) & (idx < E)
    assert int(pairs.sum()) == int(valid.sum())
    assert bool(((pair_slot >= 0) == valid).all())
    for r in range(2):
        mine = valid & (idx.clamp(min=0) // 3 == r)
        assert int(tokens_per_rank[r]) == int(mine.any(dim=1).sum())


def test_kernels_reject_bad_arguments():
    with pytest.raises(RuntimeError, match="divisible"):
        C.plan_send(torch.zeros(2, 1, dtype=torch.int64), 5, 2)
    with pytest.raises(RuntimeError, match="topk_idx must be Long"):
        C.plan_send(torch.zeros(2, 1, dtype=torch.int32), 4, 2)
    with pytest.raises(RuntimeError, match="map points past"):
        C.reduce_rows(torch.zeros(2, 3), torch.tensor([[5]]), None, torch.zeros(1, 3))
    with pytest.raises(RuntimeError, match="rows are"):
        C.expand_rows(torch.zeros(1, 8, dtype=torch.uint8), 16, torch.float32, 2, 1, None)
    with pytest.raises(RuntimeError, match="not a permutation"):
        C.expand_rows(torch.zeros(2, 32, dtype=torch.uint8), 4, torch.float32, 1, 1, torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        C.reduce_rows(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.int64), None,
                      torch.zeros(1, 3))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("H", [8, 24, 29])
def test_lanes_change_no_bit_of_pack_scatter_reduce(dtype, H):
    """The lane-strided loops and the vector / tail split give the same bytes whatever the
    number of lanes (the GPU runs 256): only the work division changes."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(H)
    T, K, E = 19, 3, 6
    idx = _routing(T, K, E, seed=H)
    x = torch.randn(T, H, generator=gen).to(dt)
    w = torch.rand(T, K, generator=gen)
    _, _, offsets, send_token, _, _ = C.plan_send(idx, E, 2)
    row_bytes = C.row_format(H, x.element_size(), K, SLOT_META_BYTES)[3]
    out = {}
    for n in (1, 2, 5, 32, 256):
        C.set_cpu_lanes(n)
        try:
            rows = torch.full((send_token.numel(), row_bytes), 0xAB, dtype=torch.uint8)
            C.pack_rows(x, send_token, offsets, idx, w, E // 2, rows)
            map_ = torch.arange(T * K).view(T, K).masked_fill(idx < 0, -1)
            scattered = torch.zeros(T * K, H, dtype=dt)
            C.scatter_rows(x, map_, w, scattered)
            reduced = torch.zeros(T, H, dtype=torch.float32)
            C.reduce_rows(scattered, map_, w, reduced)
            out[n] = (rows, scattered, reduced)
        finally:
            C.set_cpu_lanes(1)
    for n, got in out.items():
        assert all(torch.equal(a, b) for a, b in zip(got, out[1])), f"{n} lanes differ from 1"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("offset", [0, 1, 2, 4])
def test_copies_of_rows_at_any_alignment_take_every_word_tier(dtype, offset):
    """Rows that start 16-, 8-, 4- or 2-byte aligned (a view at an element offset) move through
    the 16-byte (four in flight per lane), 8-, 4-byte and byte paths of the copy body, with any
    number of lanes: same bytes as torch's own copy."""
    dt = DTYPES[dtype]
    T, H, K, E = 9, 203, 2, 4
    gen = torch.Generator().manual_seed(offset)
    base = torch.randn(T, H + 8, generator=gen).to(dt)
    x = base[:, offset:offset + H]
    idx = _routing(T, K, E, seed=offset)
    _, _, offsets, send_token, _, _ = C.plan_send(idx, E, 2)
    row_bytes = C.row_format(H, x.element_size(), 0, 0)[3]
    for n in (1, 3, 32):
        C.set_cpu_lanes(n)
        try:
            rows = torch.full((send_token.numel(), row_bytes), 0xAB, dtype=torch.uint8)
            C.pack_rows(x, send_token, offsets, None, None, 1, rows)
        finally:
            C.set_cpu_lanes(1)
        payload = rows.view(dt)[:, :H]
        assert torch.equal(payload, x[send_token]), f"{n} lanes, offset {offset}"


def test_cpu_lanes_setting_is_checked():
    with pytest.raises(RuntimeError, match="lanes must be in"):
        C.set_cpu_lanes(0)
    assert C.cpu_lanes() == 1
