"""DispatchHandle: the layout of one dispatch, reused by combine and by both backwards."""

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class DispatchHandle:
    """Opaque to users. Rows: N token rows received by the final stage (one per (source token,
    this rank)), R expanded expert rows, T local tokens, K top-k slots. `stats` counts the token
    rows and bytes this rank sent, by link class."""

    buffer: object
    num_tokens: int                 # T
    hidden: int                     # H
    topk: int                       # K
    dtype: torch.dtype
    row_map: torch.Tensor           # [N, K] int64: expert-major row of (received row, k), -1 masked
    tokens_per_expert: torch.Tensor  # [E_local] int64
    layout: object = None           # C.DispatchLayout: the engine's plans and maps
    dispatch_weights: Optional[torch.Tensor] = None  # the topk_weights given to dispatch
    dispatch_weights_version: int = -1
    stats: dict = field(default_factory=dict)
    prequantized: bool = False      # x came as (x_fp8, x_scales): no gradient to x; combine in bfloat16

    @property
    def num_recv_rows(self) -> int:  # R
        return self.layout.num_recv_rows  # known natively: no tensor op per combine

    @property
    def pairs_dropped(self):
        """stats["pairs_dropped"]: an int, or a 0-d device tensor in the static mode."""
        return self.stats["pairs_dropped"]

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def same_weights_as_dispatch(self, topk_weights: Optional[torch.Tensor]) -> bool:
        """True when combine gets the very tensor dispatch got, unmodified: the receivers then
        already hold its values and no weight exchange is needed. An inference tensor
        (torch.inference_mode) has no version counter to prove it unmodified: its weights are
        sent again."""
        return (topk_weights is not None and topk_weights is self.dispatch_weights
                and self.dispatch_weights_version >= 0 and topk_weights._version == self.dispatch_weights_version)


def version_of(tensor: Optional[torch.Tensor]) -> int:
    """The tensor's version counter, or -1 when it has none (None, or an inference tensor)."""
    if tensor is None or tensor.is_inference():
        return -1
    return tensor._version
