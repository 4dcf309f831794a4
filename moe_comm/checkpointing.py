"""Activation checkpointing around an MoE layer.

`torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)` recomputes the layer's
forward during backward, and with it dispatch and combine: their exchanges run again (every
rank recomputes, so they stay matched). `save_exchanges` is the selective checkpointing
policy that keeps the outputs of dispatch, combine and the collectives and routing around them
instead, so that only local work (router scores, experts) is recomputed:

    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False,
                                      context_fn=moe_comm.checkpoint_contexts)

It works eagerly (a selective checkpoint's dispatch mode makes the calls torch ops, which it
caches) and under torch.compile (the ops are tagged to be saved).
"""

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from . import group_sum, library, routing  # noqa: F401  (register the ops the policy names)


SAVED_OPS = (
    torch.ops.moe_comm.dispatch.default, torch.ops.moe_comm.combine.default,
    # The routing that fed the saved dispatch: recomputed, it could pick other experts (the
    # expert bias may have moved since), and the gradients would not match the exchange.
    torch.ops.moe_comm.node_limited_select.default,
    torch.ops.moe_comm.sum_over_group.default,  # a collective too
)


def save_exchanges(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save what dispatch, combine, the routing and the group sum return; recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


checkpoint_contexts = functools.partial(create_selective_checkpoint_contexts, save_exchanges)
checkpoint_contexts.__doc__ = "context_fn for torch.utils.checkpoint.checkpoint: the save_exchanges policy."

__all__ = ["checkpoint_contexts", "save_exchanges"]
