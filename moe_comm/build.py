"""What the installed extension was built with."""

import torch

from ._native import C


def build_info() -> dict:
    """-> {"cuda": bool, "cuda_archs": ["sm_90", ...], "nccl": "2.x.y" or None,
    "torch": torch version, "cuda_runtime": int or None}.

    `cuda` says device code was compiled in, not that a GPU is present.
    """
    native = C.native_build_info()
    archs = [a for a in native["cuda_archs_compiled"].split(";") if a]
    return {
        "cuda": bool(native["cuda"]),
        "cuda_archs": archs,
        "nccl": native["nccl"],
        "torch": torch.__version__,
        "cuda_runtime": native["cuda_runtime"],
    }
