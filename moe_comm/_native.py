"""Loads the compiled extension, with an actionable message when it is missing."""

import re
from typing import Optional

import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

NCCL_WHEELS = ("nvidia-nccl-cu13", "nvidia-nccl-cu12")


def declared_nccl_wheel() -> Optional[str]:
    """The nvidia-nccl wheel this install of moe_comm requires (the one it was built against,
    see setup.py), or None: built without NCCL, or no install metadata (a bare source tree)."""
    try:
        from importlib import metadata
        requirements = metadata.requires("moe_comm") or []
    except Exception:  # noqa: BLE001  (no metadata: nothing to say)
        return None
    for requirement in requirements:
        name = re.match(r"\s*([A-Za-z0-9._-]+)", requirement)
        if name and name.group(1).lower().replace("_", "-") in NCCL_WHEELS:
            return name.group(1).lower().replace("_", "-")
    return None


def load_error_message(error: str, nccl_wheel: Optional[str] = None) -> str:
    """What to tell the user when `from . import _C` failed with `error` (its text).

    A missing libnccl.so.2 (`libnccl.so.2: cannot open shared object file: ...`) means the NCCL
    wheel the extension was built against is not installed here: name it (nccl_wheel, else the
    one the install metadata declares). Anything else: the extension is missing or was built
    for another torch or Python: rebuild.
    """
    if "libnccl.so" in error:
        wheel = nccl_wheel or declared_nccl_wheel()
        install = (f"`pip install {wheel}`" if wheel else
                   "`pip install nvidia-nccl-cu13` (nvidia-nccl-cu12 if it was built with CUDA 12)")
        return (f"moe_comm's compiled extension was built with NCCL, and NCCL's libnccl.so.2 is not "
                f"installed in this environment ({error}). Install the NCCL wheel it was built "
                f"against: {install} (its lib folder, site-packages/nvidia/nccl/lib, is where "
                f"moe_comm looks), or put a libnccl.so.2 on LD_LIBRARY_PATH.")
    return ("moe_comm's compiled extension moe_comm._C is missing or failed to load "
            f"({error}). Build it with `pip install --no-build-isolation .` from the source tree.")


try:
    from . import _C  # noqa: F401
except ImportError as exc:  # only on a broken install
    raise ImportError(load_error_message(str(exc))) from exc

C = _C
