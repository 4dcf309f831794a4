"""moe_comm: expert-parallel Mixture-of-Experts dispatch/combine for PyTorch.

    buf = moe_comm.Buffer(group, num_experts=E)
    recv_x, recv_w, tokens_per_expert, handle = moe_comm.dispatch(x, topk_idx, topk_weights, buf)
    y = moe_comm.combine(expert_fn(recv_x), handle, topk_weights)
"""

from . import reference
from ._native import C  # noqa: F401  (loads the extension first)
from .buffer import Buffer
from .build import build_info
from .checkpointing import checkpoint_contexts, save_exchanges
from .fp8 import dequantize_fp8, quantize_fp8
from .handle import DispatchHandle
from .ops import combine, dispatch
from .overlap import Pending
from .routing import node_limited_topk
from .transport import CommError

__all__ = ["Buffer", "CommError", "DispatchHandle", "Pending", "build_info", "checkpoint_contexts", "combine",
           "dequantize_fp8", "dispatch", "launch", "nn", "node_limited_topk", "plan", "quantize_fp8", "reference",
           "save_exchanges"]
__version__ = "0.1.0"

# Submodules imported on first use (moe_comm.nn.MoELayer works after `import moe_comm`), not at
# `import moe_comm`: `python -m moe_comm.plan` must find moe_comm.plan not yet imported, and
# nothing that does not use them pays for them.
_LAZY_SUBMODULES = ("launch", "nn", "plan")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")  # also sets it as an attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
