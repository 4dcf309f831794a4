"""Comparisons shared by the tests: dispatch is exact, combine is bounded by its rounding."""

import torch

# Unit roundoff u (half an ulp at 1.0): rounding to nearest changes a value by at most u * |value|.
EPS = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def assert_dispatch_equal(got, expected, what: str = "") -> None:
    recv_x, recv_w, counts = got
    ref_x, ref_w, ref_counts = expected
    assert torch.equal(counts, ref_counts), f"{what} tokens_per_expert {counts.tolist()} != {ref_counts.tolist()}"
    assert recv_x.dtype == ref_x.dtype and recv_x.shape == ref_x.shape, \
        f"{what} recv_x {recv_x.dtype}{tuple(recv_x.shape)} != {ref_x.dtype}{tuple(ref_x.shape)}"
    if not torch.equal(recv_x, ref_x):
        bad = (recv_x != ref_x).any(dim=1).nonzero().flatten()[:5].tolist()
        raise AssertionError(f"{what} recv_x differs at rows {bad}: got source (rank, t//64, t%64) "
                             f"{recv_x[bad, :3].tolist()}, expected {ref_x[bad, :3].tolist()}")
    assert torch.equal(recv_w, ref_w), f"{what} recv_weights differ"


def assert_combine_close(y, ref_y, bound, dtype, stages: int = 1, what: str = "") -> None:
    """|y - ref| <= (stages + 2) u(dtype) * bound + float32 slack, bound = the combine of
    |w| * |expert_y|. Each rounding to dtype costs at most u * (its value <= bound): one per
    stage on the way back (the final receiver's partials; each forwarder's node sums), one for
    the result and one in the reference."""
    assert y.dtype == ref_y.dtype and y.shape == ref_y.shape, \
        f"{what} y {y.dtype}{tuple(y.shape)} != {ref_y.dtype}{tuple(ref_y.shape)}"
    err = (y.float() - ref_y.float()).abs()
    tol = (stages + 2) * EPS[dtype] * bound.float() + 1e-6 + 8 * 2.0 ** -23 * bound.float()
    if not bool((err <= tol).all()):
        worst = int((err - tol).flatten().argmax())
        raise AssertionError(f"{what} combine error {err.flatten()[worst].item():.3g} above "
                             f"tolerance {tol.flatten()[worst].item():.3g} at flat index {worst}")


def assert_grad_close(got, expected, dtype, name: str) -> None:
    assert got is not None, f"{name}: no gradient"
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    rtol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=rtol * max(scale, 1e-3),
                               msg=lambda m: f"{name}: {m}")
