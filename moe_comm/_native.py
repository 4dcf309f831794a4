"""Loads the compiled extension, with an actionable message when it is missing."""

import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "moe_comm's compiled extension moe_comm._C is missing or failed to load "
        f"({exc}). Build it with `pip install --no-build-isolation .` from the source tree."
    ) from exc

C = _C
