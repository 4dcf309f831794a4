"""FP8 rows (API.md: FP8 on the wire): the quantization rule, in a few lines of torch.

Each row is cut into blocks of 128 elements (the last may be shorter). A block's amax is
max |x| over it in float32, at least 1e-4; its elements become `x_float32 * (448 / amax)` cast
to float8_e4m3fn, and its scale is `amax / 448`; `q.float() * scale` gives the row back. These
are the exact float32 operations the wire kernels make, so their results can be checked
against this bit for bit.
"""

from typing import Tuple

import torch

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scale_columns(hidden: int) -> int:
    """Scales per row: ceil(hidden / 128)."""
    return -(-hidden // BLOCK)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[T, H] -> [T, blocks, 128] float32, the last block padded with zeros (which change no amax)."""
    tokens, hidden = x.shape
    padded = torch.nn.functional.pad(x.float(), (0, scale_columns(hidden) * BLOCK - hidden))
    return padded.view(tokens, scale_columns(hidden), BLOCK)


def quantize_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] float32/bfloat16/float16 -> (x_fp8 [T, H] float8_e4m3fn, x_scales [T, ceil(H / 128)]
    float32), by the rule above."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: must be a 2-D float32, bfloat16 or float16 tensor [tokens, hidden], got {got}")
    blocks = _blocks(x)
    amax = blocks.abs().amax(dim=2).clamp_min(AMAX_FLOOR)
    # A true float32 division, as the kernels make: torch's `448.0 / amax` is a reciprocal then a
    # product, one rounding more, and gives other bits for some amax.
    ratio = torch.full_like(amax, E4M3_MAX) / amax
    q = (blocks * ratio.unsqueeze(2)).flatten(1)[:, :x.shape[1]]
    return q.to(torch.float8_e4m3fn), amax / E4M3_MAX


def dequantize_fp8(x_fp8: torch.Tensor, x_scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(x_fp8 [T, H], x_scales [T, ceil(H / 128)]) -> x [T, H] in `dtype`: q.float() * scale."""
    tokens, hidden = x_fp8.shape
    blocks = _blocks(x_fp8.float()) * x_scales.unsqueeze(2)
    return blocks.flatten(1)[:, :hidden].to(dtype)
