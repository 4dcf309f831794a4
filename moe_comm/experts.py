"""grouped_mm: one matmul per local expert over its segment of the expert-major rows, as a
torch op with autograd, so that a layer's experts compile without a graph break (the segment
lengths are data that the compiler cannot slice by). Each expert's product is the plain
`rows_e @ weights[e]`, so the results equal a Python loop's bit for bit, on any dtype and shape.
"""

from typing import List

import torch
from torch import Tensor


def _segments(rows: Tensor, tokens_per_expert: Tensor) -> List[Tensor]:
    return list(rows.split(tokens_per_expert.tolist()))


def _check(rows: Tensor, weights: Tensor, tokens_per_expert: Tensor) -> None:
    if tokens_per_expert.device.type != "cpu" or tokens_per_expert.dim() != 1:
        raise ValueError(f"tokens_per_expert: must be a 1-D CPU tensor, got {tuple(tokens_per_expert.shape)} on "
                         f"{tokens_per_expert.device}")
    if weights.dim() != 3 or weights.shape[0] != tokens_per_expert.shape[0] or rows.shape[-1] != weights.shape[1]:
        raise ValueError(f"weights: must be [experts, {rows.shape[-1]}, out] with {tokens_per_expert.shape[0]} "
                         f"experts, got {tuple(weights.shape)}")


@torch.library.custom_op("moe_comm::grouped_mm", mutates_args=())
def grouped_mm(rows: Tensor, weights: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """rows [R, in] in expert-major segments of tokens_per_expert (CPU int64 [E]) rows,
    weights [E, in, out] -> [R, out]: segment e times weights[e]."""
    _check(rows, weights, tokens_per_expert)
    outs = [segment @ weights[e] for e, segment in enumerate(_segments(rows, tokens_per_expert))]
    return torch.cat(outs) if outs else rows.new_empty((0, weights.shape[2]))


@grouped_mm.register_fake
def _grouped_mm_fake(rows, weights, tokens_per_expert):
    return rows.new_empty((rows.shape[0], weights.shape[2]))


@torch.library.custom_op("moe_comm::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(rows: Tensor, grad_out: Tensor, tokens_per_expert: Tensor) -> Tensor:
    """The gradient of grouped_mm's weights: [E, in, out], segment e's rows^T @ grad_out."""
    pairs = zip(_segments(rows, tokens_per_expert), _segments(grad_out, tokens_per_expert))
    grads = [r.transpose(0, 1) @ g for r, g in pairs]
    if not grads:
        return rows.new_empty((0, rows.shape[1], grad_out.shape[1]))
    return torch.stack(grads)


@grouped_mm_weight_grad.register_fake
def _grouped_mm_weight_grad_fake(rows, grad_out, tokens_per_expert):
    return rows.new_empty((tokens_per_expert.shape[0], rows.shape[1], grad_out.shape[1]))


def _setup(ctx, inputs, output):
    rows, weights, tokens_per_expert = inputs
    ctx.save_for_backward(rows, weights, tokens_per_expert)


def _backward(ctx, grad_out):
    rows, weights, tokens_per_expert = ctx.saved_tensors
    grad_rows = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_rows = grouped_mm(grad_out, weights.transpose(1, 2), tokens_per_expert)
    if ctx.needs_input_grad[1]:
        grad_weights = grouped_mm_weight_grad(rows, grad_out, tokens_per_expert)
    return grad_rows, grad_weights, None


grouped_mm.register_autograd(_backward, setup_context=_setup)
