"""sum_over_group: a tensor summed over a Buffer's group, as a torch op that runs after a given
tensor exists. Inside a compiled graph the compiler may place a plain all_reduce anywhere its
input allows; ranks whose graphs differ (torch compiles a rank with 0 tokens on its own) could
then order it differently around dispatch and combine, each rank waiting in a different
collective. An input `after` (a layer's output) fixes its place on every rank."""

import torch
import torch.distributed as dist
from torch import Tensor

from .library import buffer_of


@torch.library.custom_op("moe_comm::sum_over_group", mutates_args=())
def sum_over_group(tensor: Tensor, after: Tensor, buffer_key: str) -> Tensor:
    """-> tensor summed over the Buffer's group (its own group, as given to Buffer); `after` is
    only waited for."""
    buffer = buffer_of(buffer_key)
    out = tensor.clone()
    if buffer.world_size > 1:
        dist.all_reduce(out, group=buffer.group)
    return out


@sum_over_group.register_fake
def _sum_over_group_fake(tensor, after, buffer_key):
    return torch.empty_like(tensor)
