"""moe_comm: expert-parallel Mixture-of-Experts dispatch/combine for PyTorch.

    buf = moe_comm.Buffer(group, num_experts=E)
    recv_x, recv_w, tokens_per_expert, handle = moe_comm.dispatch(x, topk_idx, topk_weights, buf)
    y = moe_comm.combine(expert_fn(recv_x), handle, topk_weights)
"""

from . import reference
from ._native import C  # noqa: F401  (loads the extension first)
from .buffer import Buffer
from .build import build_info
from .handle import DispatchHandle
from .ops import combine, dispatch
from .routing import node_limited_topk
from .transport import CommError

__all__ = ["Buffer", "CommError", "DispatchHandle", "build_info", "combine", "dispatch", "node_limited_topk", "reference"]
__version__ = "0.1.0"
