"""Activation checkpointing around an MoE layer.

`torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)` recomputes the layer's
forward during backward, and with it dispatch and combine: their exchanges run again (every
rank recomputes, so they stay matched). `save_exchanges` is the selective checkpointing
policy that keeps dispatch's and combine's outputs instead, so that only local work (router,
experts) is recomputed:

    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False,
                                      context_fn=moe_comm.checkpoint_contexts)

It works eagerly (a selective checkpoint's dispatch mode makes the calls torch ops, which it
caches) and under torch.compile (the ops are tagged to be saved).
"""

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from . import library  # noqa: F401  (registers the ops the policy names)


def save_exchanges(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save what dispatch and combine return; recompute the rest."""
    if op in (torch.ops.moe_comm.dispatch.default, torch.ops.moe_comm.combine.default):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


checkpoint_contexts = functools.partial(create_selective_checkpoint_contexts, save_exchanges)
checkpoint_contexts.__doc__ = "context_fn for torch.utils.checkpoint.checkpoint: the save_exchanges policy."

__all__ = ["checkpoint_contexts", "save_exchanges"]
