"""moe_comm.quantize_fp8 follows API.md's rule exactly (per-128 blocks, the last shorter; amax
clamped to 1e-4; q = x * (448 / amax) cast to e4m3; scale = amax / 448), for every input dtype
and hidden size, and dequantize_fp8 gives the rows back within e4m3's precision."""

import pytest
import torch

import moe_comm
from moe_comm.fp8 import dequantize_fp8


def _by_the_rule(x):
    """The rule written out block by block, in float32."""
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty((x.shape[0], -(-x.shape[1] // 128)), dtype=torch.float32)
    for t in range(x.shape[0]):
        for b, start in enumerate(range(0, x.shape[1], 128)):
            block = x[t, start:start + 128].float()
            amax = torch.clamp_min(block.abs().max(), 1e-4)
            q[t, start:start + 128] = (block * (torch.tensor(448.0) / amax)).to(torch.float8_e4m3fn)
            scales[t, b] = amax / 448.0
    return q, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [1, 127, 128, 129, 300])
def test_quantize_follows_the_rule_exactly(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(5, hidden, generator=gen) * torch.logspace(-6, 3, 5).unsqueeze(1)).to(dtype)
    x[1] = 0  # a zero row: amax takes its floor
    q, scales = moe_comm.quantize_fp8(x)
    want_q, want_scales = _by_the_rule(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scales.shape == want_scales.shape
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scales, want_scales)
    assert torch.all(scales[1] == torch.tensor(1e-4) / 448.0) and not q[1].float().any()
    back = dequantize_fp8(q, scales, dtype)
    assert back.dtype == dtype
    # e4m3 keeps 3 mantissa bits: 1/16 of a value, or (subnormals) 2^-9 of its block's scale.
    err = (back.float() - x.float()).abs()
    bound = x.float().abs() / 16 + scales.repeat_interleave(128, dim=1)[:, :hidden] * 2 ** -9
    assert torch.all(err <= bound * 1.01 + x.float().abs() * 2 ** -7)


def test_quantize_no_tokens_and_bad_input():
    q, scales = moe_comm.quantize_fp8(torch.zeros(0, 200, dtype=torch.bfloat16))
    assert q.shape == (0, 200) and scales.shape == (0, 2)
    for bad in (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3), "x"):
        with pytest.raises(ValueError, match="^x: "):
            moe_comm.quantize_fp8(bad)
