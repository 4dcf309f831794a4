"""dispatch() and combine() as autograd functions: each call is one call into the C++ engine
(csrc/engine), which plans, exchanges headers and rows, expands and reduces over the Buffer's
stages (one flat, two hierarchical), on the CPU or on the caller's CUDA stream. Python keeps
what needs no device work: argument checks (validation.py), the autograd wrappers and the
errors every rank raises.

Wire traffic per call, per stage:
  dispatch:  a fixed-size header (status + counts), then one row exchange
  combine:   one row exchange back, carrying each rank's ok/error status in-band (no separate
             collective); a forward pass of the weights first only when combine's weights are
             not the tensor dispatch got (then that pass carries the status). The status is
             read at once ("immediate") or by the next dispatch's header ("deferred", the CUDA
             default: no host wait); Buffer's combine_status.
  backwards: reuse the handle; no header.
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .errors import (DISAGREEMENT, agreed_combine_error, call_engine, call_engine_here, dispatch_problem_error,
                     static_problem_error)
from . import library
from .handle import DispatchHandle, version_of
from .overlap import Pending, call_stream
from .roll_call import post_reason
from .streams import stream_of
from .validation import (CODE_OF, InputError, check_capacity_arguments, check_combine_inputs, check_dispatch_inputs,
                         check_token_budget, expert_capacity, fp8_parts)

COMBINE_ARGUMENT_CODES = {"expert_y": 1, "topk_weights": 2}


def _dispatch_call(x, topk_idx, topk_weights, buffer, capacity_factor, drop_policy, expert_alignment,
                   pad_to_capacity, wire_dtype=None):
    """The checks that need no device work, made at once on the calling thread. -> (what this
    rank rejected or None, run(here): the engine call; here: on the Buffer's worker already).
    x: a tensor, or the pair (x_fp8, x_scales) (pre-quantized FP8 rows)."""
    buffer.begin_call("dispatch")
    rejected = check_dispatch_inputs(x, topk_idx, topk_weights, buffer.device, wire_dtype)
    x, x_scales = fp8_parts(x)
    rejected = rejected or check_token_budget(x, buffer.max_tokens_per_rank)
    if rejected is None:  # x and topk_idx are sound: their shapes size the capacity
        tokens = buffer.max_tokens_per_rank if buffer.max_tokens_per_rank is not None else x.shape[0]
        rejected = check_capacity_arguments(capacity_factor, drop_policy, topk_weights, expert_alignment,
                                            pad_to_capacity, tokens, topk_idx.shape[1], buffer.num_experts)
    code = CODE_OF[rejected.argument] if rejected is not None else 0
    weights = topk_weights.detach() if (topk_weights is not None and not code) else None
    capacity = -1
    if capacity_factor is not None and not code:
        capacity = expert_capacity(capacity_factor, tokens, topk_idx.shape[1], buffer.num_experts)
    head = (None if code else x.detach(), None if code else topk_idx, weights, code)
    fp8 = not code and (x_scales is not None or wire_dtype is not None)
    tail = (capacity, drop_policy == "probs", expert_alignment if not code else 1, bool(pad_to_capacity) and not code,
            buffer.static_tokens(pad_to_capacity), fp8, None if code or x_scales is None else x_scales.detach())

    def run(here: bool):
        return (call_engine_here if here else call_engine)(buffer, "dispatch", *head, stream_of(buffer.device), *tail)
    return rejected, run


def _dispatch_outputs(result, x, topk_idx, topk_weights, buffer, rejected):
    """-> recv_x (pre-quantized input: recv_fp8), recv_scales or None, recv_weights,
    tokens_per_expert, handle."""
    problem, routing, recv_x, recv_weights, counts, layout, static_status = result
    if problem[0]:
        raise dispatch_problem_error(buffer, problem, routing, rejected)  # no token has moved, on any rank
    if static_status:  # the static mode with immediate statuses: agreed at the end of the call
        raise static_problem_error(buffer, static_status)
    recv_x, recv_scales = fp8_parts(recv_x)
    x, x_scales = fp8_parts(x)
    prequantized = x_scales is not None
    handle = DispatchHandle(
        buffer=buffer, num_tokens=x.shape[0], hidden=x.shape[1], topk=topk_idx.shape[1],
        dtype=torch.bfloat16 if prequantized else x.dtype, layout=layout, row_map=layout.row_map,
        tokens_per_expert=counts, dispatch_weights=topk_weights, dispatch_weights_version=version_of(topk_weights),
        stats=layout.stats, prequantized=prequantized)
    return recv_x, recv_scales, recv_weights, counts, handle


class _Dispatch(torch.autograd.Function):
    """Its forward turns the engine's result (of a call made before apply: at once, or on the
    Buffer's worker for async_op) into the outputs; its backward is the engine's."""

    @staticmethod
    def forward(ctx, x, x_scales, topk_weights, topk_idx, buffer, result, rejected):
        x_in = x if x_scales is None else (x, x_scales)
        recv_x, recv_scales, recv_weights, tokens_per_expert, handle = _dispatch_outputs(
            result, x_in, topk_idx, topk_weights, buffer, rejected)
        ctx.handle = handle
        ctx.mark_non_differentiable(tokens_per_expert)
        if recv_scales is not None:  # pre-quantized rows, moved bit for bit: no gradient to x
            ctx.mark_non_differentiable(recv_x, recv_scales)
        return recv_x, recv_scales, recv_weights, tokens_per_expert, handle

    @staticmethod
    @once_differentiable  # double backward raises instead of silently dropping terms (README)
    def backward(ctx, grad_recv_x, _grad_scales, grad_recv_weights, _grad_counts, _grad_handle):
        # The transpose of dispatch is an unweighted combine; router-weight gradients ride
        # back in the same rows.
        want_w = ctx.needs_input_grad[2]
        grad_x, grad_w = dispatch_backward_now(ctx.handle, grad_recv_x, grad_recv_weights if want_w else None)
        wants_x = ctx.needs_input_grad[0] and not ctx.handle.prequantized  # FP8 rows moved as bits: none
        return (grad_x if wants_x else None), None, grad_w, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_y, topk_weights, handle, result):
        h = handle
        status, y, slot_weights = result
        if status:
            raise agreed_combine_error(h.buffer, status)
        ctx.handle = h
        ctx.slot_weights = slot_weights
        ctx.save_for_backward(expert_y if topk_weights is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        # The transpose of combine is a dispatch of grad_y along the cached layout.
        (expert_y,) = ctx.saved_tensors
        want_w = ctx.needs_input_grad[1]
        grad_expert_y, grad_w = combine_backward_now(ctx.handle, grad_y, ctx.slot_weights,
                                                     expert_y if want_w else None)
        return grad_expert_y, grad_w, None, None


def _reject_combine(handle: DispatchHandle, topk_weights, problem, reuse=None):
    """This rank's combine input is bad: it raises its own error, after joining the exchange
    with zeros (and the error code in-band) so that its peers raise too instead of waiting.
    reuse: the path the peers take (whether they reuse dispatch's weights), None: inferred."""
    buffer = handle.buffer
    post_reason(buffer, f"combine rejected its argument '{problem.argument}': {problem.error}")
    if buffer.combine_status is None or buffer.world_size == 1:
        raise problem.error
    weights = None
    if topk_weights is None:
        reuse = False
    else:
        # Take the path the peers take: they reuse dispatch's weights when given that tensor.
        if reuse is None and problem.argument == "topk_weights":
            reuse = _views_dispatch_weights(topk_weights, handle)
        elif reuse is None:
            reuse = handle.same_weights_as_dispatch(topk_weights)
        weights = torch.zeros((handle.num_tokens, handle.topk), dtype=torch.float32, device=buffer.device)
    try:
        call_engine(buffer, "combine", handle.layout, None, weights, reuse, COMBINE_ARGUMENT_CODES[problem.argument],
                    stream_of(buffer.device))
    except Exception as lost:  # a peer is missing too: this rank's own error still comes first
        raise problem.error from lost
    raise problem.error


def _views_dispatch_weights(topk_weights, handle: DispatchHandle) -> bool:
    """A rejected topk_weights that is a view or reinterpretation of dispatch's tensor stands
    for it (its peers reuse dispatch's weights); anything else stands for new weights."""
    mine = handle.dispatch_weights
    return (isinstance(topk_weights, torch.Tensor) and mine is not None
            and topk_weights.untyped_storage().data_ptr() == mine.untyped_storage().data_ptr())


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], buffer,
             capacity_factor: Optional[float] = None, drop_policy: str = "probs", expert_alignment: int = 1,
             pad_to_capacity: bool = False, async_op: bool = False, previous_event=None, wire_dtype=None):
    """Sends each token once to every rank owning one of its experts (hierarchical: once to
    each destination node, then inside it); expands it there to one row per local expert.

    x [T, H] float32/bfloat16/float16; topk_idx [T, K] int64/int32 in [-1, E) (-1 = unused);
    topk_weights [T, K] float32 or None.
    capacity_factor: each expert keeps at most C = ceil(capacity_factor * T * K / E) of this
    rank's (token, expert) pairs, chosen by drop_policy: "probs" the largest weights (ties: the
    lower token), "position" the first tokens. Dropped pairs are never sent; combine gives them
    nothing and their weights a zero gradient; handle.stats["pairs_dropped"] counts them.
    expert_alignment: zero rows end each local expert's segment so that its length (counted in
    tokens_per_expert) is a multiple of it, for grouped GEMMs; combine ignores them, and their
    expert_y rows get a zero gradient.
    pad_to_capacity: every (local expert, source rank) block holds exactly C rows (kept rows, then
    zero rows): static shapes, R = E_local * W * C (then aligned). Every rank must get the same C:
    give the Buffer a max_tokens_per_rank (C then uses it for T), or the same T everywhere. With
    max_tokens_per_rank on a flat Buffer this is the static mode (README): no host wait.
    async_op: return at once a moe_comm.Pending whose .wait() gives the outputs (README: Overlap).
    previous_event: a torch.cuda.Event the call's stream waits for before it starts (CUDA).
    wire_dtype: torch.float8_e4m3fn sends each row as e4m3 with a float32 scale per 128
    elements (quantized in the pack, dequantized in the expand: recv_x in x's dtype, gradients
    straight through); None sends x's dtype. x may instead be the pair (x_fp8, x_scales)
    (moe_comm.quantize_fp8): its rows move bit for bit, recv_x is then the pair (recv_fp8 [R, H],
    recv_scales [R, ceil(H / 128)]), no gradient flows to x, and combine takes bfloat16.
    -> recv_x [R, H] (expert-major; inside an expert by source rank, then source token),
       recv_weights [R] float32, tokens_per_expert [E_local] int64 (CPU; static mode: on the
       Buffer's device), handle.
    """
    if traced():  # torch.compile, or a torch dispatch mode: the call as a torch op (library.py)
        _check_eager_only(async_op, previous_event)
        return library.dispatch(x, topk_idx, topk_weights, buffer, capacity_factor, drop_policy, expert_alignment,
                                pad_to_capacity, wire_dtype)
    stream = call_stream(buffer.device, previous_event)
    rejected, run = _dispatch_call(x, topk_idx, topk_weights, buffer, capacity_factor, drop_policy, expert_alignment,
                                   pad_to_capacity, wire_dtype)
    x_rows, x_scales = fp8_parts(x)

    def finish(result):
        recv_x, recv_scales, *rest = _Dispatch.apply(x_rows, x_scales, topk_weights, topk_idx, buffer, result, rejected)
        return ((recv_x, recv_scales) if recv_scales is not None else recv_x, *rest)
    return _call(buffer, run, finish, async_op, stream, previous_event)


def combine(expert_y: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
            async_op: bool = False, previous_event=None):
    """y[t] = sum over valid k of w[t, k] * expert_y[row(t, k)] (float32 accumulation; w = 1
    when topk_weights is None). expert_y [R, H] in recv_x's row order and dtype -> y [T, H].
    async_op, previous_event: as dispatch's."""
    if isinstance(handle, library.OpHandle):
        _check_eager_only(async_op, previous_event)
        return library.combine(expert_y, handle, topk_weights)
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: must be the handle returned by moe_comm.dispatch, got {type(handle).__name__}")
    if torch.compiler.is_compiling():  # an eager dispatch's handle: combined outside the graph
        return _combine_outside_graph(expert_y, handle, topk_weights, async_op, previous_event)
    stream = call_stream(handle.buffer.device, previous_event)
    run = _combine_call(expert_y, handle, topk_weights)

    def finish(result):
        return _Combine.apply(expert_y, topk_weights, handle, result)
    return _call(handle.buffer, run, finish, async_op, stream, previous_event)


@torch.compiler.disable
def _combine_outside_graph(expert_y, handle, topk_weights, async_op, previous_event):
    return combine(expert_y, handle, topk_weights, async_op, previous_event)


def _combine_call(expert_y, handle: DispatchHandle, topk_weights, reuse=None):
    """The checks of a combine, made at once (a bad input raises, on every rank). reuse: whether
    topk_weights are dispatch's (None: found here), or an InputError saying they changed since.
    -> run(here): the engine call."""
    buffer = handle.buffer
    buffer.begin_call("combine")
    problem = check_combine_inputs(expert_y, topk_weights, handle)
    if isinstance(reuse, InputError):  # the peers reuse dispatch's weights: this rank takes that path too
        problem, reuse = problem or reuse, True
    if problem is not None:
        _reject_combine(handle, topk_weights, problem, reuse)
    if reuse is None:
        reuse = handle.same_weights_as_dispatch(topk_weights)
    weights = topk_weights.detach() if topk_weights is not None else None
    status_code = 0 if buffer.combine_status is not None else -1
    head = (handle.layout, expert_y.detach(), weights, reuse, status_code)

    def run(here: bool):
        return (call_engine_here if here else call_engine)(buffer, "combine", *head, stream_of(buffer.device))
    return run


def dispatch_now(x, topk_idx, topk_weights, buffer, capacity_factor, drop_policy, expert_alignment, pad_to_capacity,
                 wire_dtype=None):
    """dispatch without autograd (the op's body, library.py): -> recv_x, recv_scales or None,
    recv_weights, tokens_per_expert, DispatchHandle; raises as dispatch does."""
    rejected, run = _dispatch_call(x, topk_idx, topk_weights, buffer, capacity_factor, drop_policy, expert_alignment,
                                   pad_to_capacity, wire_dtype)
    return _dispatch_outputs(run(False), x, topk_idx, topk_weights, buffer, rejected)


def combine_now(expert_y, handle: DispatchHandle, topk_weights, reuse):
    """combine without autograd (the op's body): -> y, the weights the rows were reduced with
    (None unweighted); raises as combine does."""
    status, y, slot_weights = _combine_call(expert_y, handle, topk_weights, reuse)(False)
    if status:
        raise agreed_combine_error(handle.buffer, status)
    return y, slot_weights


def dispatch_backward_now(handle: DispatchHandle, grad_recv_x, grad_recv_weights):
    """The transpose of dispatch (the eager backward's and the op's body): -> grad_x [T, H],
    grad_weights [T, K] or None (without grad_recv_weights). After a pre-quantized dispatch only
    the weights' gradient travels (rows of no columns) and grad_x is [T, 0]."""
    buffer = handle.buffer
    if handle.prequantized:
        grad_recv_x = torch.zeros((handle.num_recv_rows, 0), dtype=torch.float32, device=buffer.device)
    return call_engine(buffer, "dispatch_backward", handle.layout, grad_recv_x.contiguous(),
                       grad_recv_weights.contiguous() if grad_recv_weights is not None else None,
                       stream_of(buffer.device))


def combine_backward_now(handle: DispatchHandle, grad_y, slot_weights, expert_y):
    """The transpose of combine (the eager backward's and the op's body): -> grad_expert_y
    [R, H], grad_weights [T, K] or None (without expert_y)."""
    buffer = handle.buffer
    return call_engine(buffer, "combine_backward", handle.layout, grad_y.contiguous(), slot_weights,
                       expert_y.detach() if expert_y is not None else None, stream_of(buffer.device))


def traced() -> bool:
    """Whether a call now must be a torch op: under torch.compile, or with a torch dispatch mode
    on (selective checkpointing's, FakeTensorMode, a FLOP counter)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _check_eager_only(async_op, previous_event) -> None:
    if async_op or previous_event is not None:
        raise ValueError("async_op, previous_event: for eager calls only; under torch.compile or a torch dispatch "
                         "mode the call is a torch op (the compiler orders it)")


def _call(buffer, run, finish, async_op, stream, previous_event):
    """finish(the engine call's result) now; or, async, a Pending: the call on the Buffer's
    worker, in order, and finish on .wait()."""
    if async_op:
        future = buffer.in_order().submit(lambda: run(True), stream, previous_event, record_done=stream is not None)
        return Pending(future, finish, buffer.device, stream)
    if previous_event is not None:
        stream.wait_event(previous_event)
    return finish(run(False))


__all__ = ["combine", "dispatch", "DISAGREEMENT"]
