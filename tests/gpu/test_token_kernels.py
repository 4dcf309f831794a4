"""The CUDA token kernels (csrc/kernels/token_ops.cu, expand_plan.cu) against their CPU twins,
through the same bindings (which run on the tensors' device): outputs poisoned
first so an unwritten row is caught; odd sizes, 0 rows, all dtypes, strided (unaligned) rows."""

import pytest
import torch

import moe_comm
from moe_comm._native import C as _C

SLOT_META_BYTES = _C.SLOT_META_BYTES
from tests.cases import DTYPES
from tests.gpu import marks

C = moe_comm.C
pytestmark = marks.KERNELS


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _routing(T, K, E, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    return idx.masked_fill(torch.rand(T, K, generator=gen) < 0.25, -1)


def _row_map(N, K, seed):
    """A valid expansion map: every target row exactly once. -> map [N, K], rows R."""
    gen = torch.Generator().manual_seed(seed)
    valid = torch.rand(N, K, generator=gen) < 0.7
    R = int(valid.sum())
    rows = torch.full((N, K), -1, dtype=torch.int64)
    rows[valid] = torch.randperm(R, generator=gen)
    return rows, R


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("T,H,K,E,W", [(0, 8, 2, 8, 2), (1, 7, 1, 4, 4), (301, 33, 4, 16, 4), (4097, 7168, 8, 64, 8)])
@pytest.mark.parametrize("strided", [False, True])
def test_pack_rows(dtype, T, H, K, E, W, strided):
    dt = DTYPES[dtype]
    idx = _routing(T, K, E, seed=T + H)
    base = torch.randn(T, H + 3).to(dt)
    x = base[:, 1:H + 1] if strided else base[:, :H].contiguous()  # strided: rows not 16-aligned
    w = torch.rand(T, K)
    _, _, offsets, send_token, _, _ = C.plan_send(idx, E, W)
    row_bytes = C.row_format(H, x.element_size(), K, SLOT_META_BYTES)[3]
    for meta in (True, False):
        cols = row_bytes if meta else C.row_format(H, x.element_size(), 0, 0)[3]
        cpu = torch.full((send_token.numel(), cols), 0xAB, dtype=torch.uint8)
        C.pack_rows(x, send_token, offsets, idx if meta else None, w if meta else None, E // W, cpu)
        gpu = torch.full_like(cpu, 0xCD).cuda()
        C.pack_rows(x.cuda(), send_token.cuda(), offsets.cuda(), idx.cuda() if meta else None,
                    w.cuda() if meta else None, E // W, gpu, stream=_stream())
        torch.cuda.synchronize()
        assert torch.equal(gpu.cpu(), cpu)
    # FP8 rows: the warps' quantization (shuffled amax) gives the CPU's emulated groups' bytes.
    fp8_cols = C.fp8_row_format(H, K, SLOT_META_BYTES)[3]
    cpu = torch.full((send_token.numel(), fp8_cols), 0xAB, dtype=torch.uint8)
    C.pack_rows(x, send_token, offsets, idx, w, E // W, cpu, quantize=True)
    gpu = torch.full_like(cpu, 0xCD).cuda()
    C.pack_rows(x.cuda(), send_token.cuda(), offsets.cuda(), idx.cuda(), w.cuda(), E // W, gpu, stream=_stream(),
                quantize=True)
    torch.cuda.synchronize()
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("N,K,H", [(0, 2, 8), (1, 1, 1), (257, 4, 33), (2048, 8, 7168)])
@pytest.mark.parametrize("weighted", [False, True])
def test_scatter_rows(dtype, N, K, H, weighted):
    dt = DTYPES[dtype]
    row_map, R = _row_map(N, K, seed=N)
    src = torch.randn(N, H).to(dt)
    weights = torch.rand(N, K) if weighted else None
    cpu = torch.full((R, H), float("nan")).to(dt)
    C.scatter_rows(src, row_map, weights, cpu)
    gpu = torch.full((R, H), 12345.0).to(dt).cuda()
    C.scatter_rows(src.cuda(), row_map.cuda(), weights.cuda() if weighted else None, gpu, stream=_stream())
    torch.cuda.synchronize()
    assert torch.equal(gpu.cpu().view(torch.uint8), cpu.view(torch.uint8))


@pytest.mark.parametrize("src_dtype,dst_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                                 ("float16", "float16"), ("bfloat16", "float32")])
@pytest.mark.parametrize("N,K,H,R", [(0, 2, 8, 5), (3, 1, 1, 2), (400, 8, 33, 900), (4097, 8, 7168, 4000)])
@pytest.mark.parametrize("weighted", [False, True])
def test_reduce_rows(src_dtype, dst_dtype, N, K, H, R, weighted):
    gen = torch.Generator().manual_seed(N + K)
    src = torch.randn(R, H, generator=gen).to(DTYPES[src_dtype])
    index = torch.randint(0, R, (N, K), generator=gen).masked_fill(torch.rand(N, K, generator=gen) < 0.3, -1)
    weights = torch.rand(N, K, generator=gen) if weighted else None
    cpu = torch.full((N, H), float("nan")).to(DTYPES[dst_dtype])
    C.reduce_rows(src, index, weights, cpu)
    gpu = torch.full((N, H), 777.0).to(DTYPES[dst_dtype]).cuda()
    C.reduce_rows(src.cuda(), index.cuda(), weights.cuda() if weighted else None, gpu, stream=_stream())
    torch.cuda.synchronize()
    # Same summation order (k ascending, float32); fused multiply-add may differ in the last bit.
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=1e-6 if dst_dtype == "float32" else 8e-3,
                               atol=1e-6)


@pytest.mark.parametrize("src_dtype,dst_dtype", [("bfloat16", "bfloat16"), ("float32", "float32"),
                                                 ("float16", "float32"), ("float32", "bfloat16")])
@pytest.mark.parametrize("K", [1, 8, 300, 3000])  # 3000 slots overflow the staged map: plain kernel
def test_reduce_rows_from_packed_rows_with_a_tail(src_dtype, dst_dtype, K):
    """Sources as packed wire rows (16-byte aligned stride, hidden not a multiple of the vector
    width): the 16-byte path plus its scalar tail must equal the CPU sums."""
    gen = torch.Generator().manual_seed(K)
    N, H, R = 65, 37, 129
    packed = torch.randn(R, 48, generator=gen).to(DTYPES[src_dtype])
    src = packed[:, :H]
    index = torch.randint(0, R, (N, K), generator=gen).masked_fill(torch.rand(N, K, generator=gen) < 0.3, -1)
    weights = torch.rand(N, K, generator=gen)
    cpu = torch.full((N, H), float("nan")).to(DTYPES[dst_dtype])
    C.reduce_rows(src, index, weights, cpu)
    gpu_out = torch.full((N, 48), 777.0).to(DTYPES[dst_dtype]).cuda()
    C.reduce_rows(packed.cuda()[:, :H], index.cuda(), weights.cuda(), gpu_out[:, :H], stream=_stream())
    torch.cuda.synchronize()
    torch.testing.assert_close(gpu_out[:, :H].cpu().float(), cpu.float(),
                               rtol=1e-6 if dst_dtype == "float32" else 8e-3, atol=1e-5)
    assert (gpu_out[:, H:].cpu().float() == 777.0).all()  # nothing written past the row


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("N,K,H", [(0, 2, 8), (1, 1, 1), (300, 4, 33), (1024, 8, 7168)])
def test_row_dots(dtype, N, K, H):
    dt = DTYPES[dtype]
    row_map, R = _row_map(N, K, seed=H)
    a = torch.randn(N, H).to(dt)
    b = torch.randn(R, H).to(dt)
    cpu = C.row_dots(a, b, row_map)
    gpu = C.row_dots(a.cuda(), b.cuda(), row_map.cuda(), stream=_stream())
    torch.cuda.synchronize()
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4 * H ** 0.5)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("T,H,K,E", [(0, 8, 2, 4), (1, 7, 1, 1), (300, 33, 4, 8), (4097, 7168, 8, 32)])
@pytest.mark.parametrize("ordered", [False, True])
def test_expand_rows(dtype, T, H, K, E, ordered):
    dt = DTYPES[dtype]
    idx = _routing(T, K, E, seed=T + K)
    x = torch.randn(T, H).to(dt)
    w = torch.rand(T, K)
    _, _, offsets, send_token, _, _ = C.plan_send(idx, E, 1)
    rows = torch.empty((send_token.numel(), C.row_format(H, x.element_size(), K, SLOT_META_BYTES)[3]),
                       dtype=torch.uint8)
    C.pack_rows(x, send_token, offsets, idx, w, E, rows)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(2)) if ordered else None
    cpu = C.expand_rows(rows, H, dt, K, E, order)
    dev_order = order.cuda() if ordered else None
    # Without counts the binding reads them from the device; with the header's counts it doesn't.
    for counts in (None, cpu[2]):
        gpu = C.expand_rows(rows.cuda(), H, dt, K, E, dev_order, counts, stream=_stream())
        torch.cuda.synchronize()
        assert gpu[2].device.type == "cpu"  # tokens_per_expert on the host, as the API says
        for name, g, c in zip(("recv_x", "recv_weights", "tokens_per_expert", "row_map", "slot_weights"), gpu, cpu):
            assert torch.equal(g.cpu(), c), name
