"""dispatch, combine and their backwards as torch custom ops (torch.library), for torch.compile
(fullgraph), torch dispatch modes (selective activation checkpointing, FakeTensorMode) and
torch.library.opcheck. README: torch.compile.

The ops take and return tensors only. A dispatch's layout (its plans, maps and counts: the
DispatchHandle) stays in Python; the graph carries a *token* for it: a 1-element int64 CPU
tensor holding a number unique in the process, whose storage is a small Python buffer that
holds the DispatchHandle. Whatever keeps the token's storage alive (the graph's values, tensors
autograd saved for backward, a checkpoint's cache) keeps the layout alive, and nothing has to
be freed by hand; a copy of the token (opcheck clones its inputs) names the same dispatch
while the original lives. The Buffer is passed as a string key (`Buffer.op_key`): a constant of
the graph.

`R` (rows received) is data-dependent: the fake dispatch gives an unbacked size, except where
every shape is fixed in advance (pad_to_capacity with the Buffer's max_tokens_per_rank), where
it is exact.
"""

import itertools
import weakref
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .handle import DispatchHandle
from .validation import InputError, expert_capacity

_BUFFERS = weakref.WeakValueDictionary()  # op key -> Buffer
_KEYS = itertools.count(1)  # keys are strings: a compiler never makes a string symbolic
_TOKENS = weakref.WeakValueDictionary()  # a token's value -> its _TokenMemory
_TOKEN_IDS = itertools.count(1)


def register_buffer(buffer) -> str:
    """-> the key the ops name `buffer` by (kept weakly: a closed Buffer is gone)."""
    key = f"buffer{next(_KEYS)}"
    _BUFFERS[key] = buffer
    return key


def buffer_of(key: str):
    buffer = _BUFFERS.get(key)
    if buffer is None:
        raise RuntimeError(f"buffer: the moe_comm.Buffer with op key {key} no longer exists; create a new one "
                           f"(and recompile what was compiled with the old one)")
    return buffer


class _TokenMemory(bytearray):
    """A token's 8 bytes; holds the DispatchHandle for as long as the token's storage lives."""


def token_of(handle: DispatchHandle) -> Tensor:
    number = next(_TOKEN_IDS)
    memory = _TokenMemory(number.to_bytes(8, "little"))
    memory.handle = handle
    _TOKENS[number] = memory
    return torch.frombuffer(memory, dtype=torch.int64)  # the storage keeps `memory` referenced


def handle_of(token: Tensor) -> DispatchHandle:
    memory = None
    if isinstance(token, Tensor) and token.device.type == "cpu" and token.numel() == 1:
        memory = _TOKENS.get(int(token.reshape(())))
    if memory is None:
        raise ValueError("handle: this token names no dispatch of this process (a copy of a token, or a tensor that "
                         "is not one); pass the handle that moe_comm.dispatch returned")
    return memory.handle


class OpHandle(NamedTuple):
    """What dispatch returns under torch.compile or a torch dispatch mode: tensors and constants
    the compiler can carry. combine takes it like a DispatchHandle."""

    token: Tensor                      # names the DispatchHandle (see the module's note)
    num_tokens: int                    # T (a SymInt while tracing)
    topk: int                          # K
    buffer: object
    dispatch_weights: Optional[Tensor]  # dispatch's topk_weights: combine given them exchanges none
    pairs_dropped: Tensor              # 0-d int64: handle.stats["pairs_dropped"]

    @property
    def stats(self) -> dict:
        """The DispatchHandle's stats (eager only: a compiled graph has pairs_dropped alone)."""
        return handle_of(self.token).stats


# -- the ops ------------------------------------------------------------------------------------

@torch.library.custom_op("moe_comm::dispatch", mutates_args=())
def dispatch_op(x: Tensor, x_scales: Optional[Tensor], topk_idx: Tensor, topk_weights: Optional[Tensor],
                buffer_key: str, capacity_factor: Optional[float], drop_policy: str, expert_alignment: int,
                pad_to_capacity: bool, wire_dtype: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """wire_dtype: "" (None) or str() of dispatch's (any value: the op checks it, on every rank).
    -> recv_x, recv_scales (x_scales given: of recv_x's e4m3 rows; else empty [0]), recv_weights,
    tokens_per_expert, token, pairs_dropped (0-d int64)."""
    from .ops import dispatch_now  # ops imports this module
    buffer = buffer_of(buffer_key)
    recv_x, recv_scales, recv_weights, counts, handle = dispatch_now(
        x if x_scales is None else (x, x_scales), topk_idx, topk_weights, buffer, capacity_factor, drop_policy,
        expert_alignment, pad_to_capacity, _WIRE_DTYPES.get(wire_dtype, wire_dtype))
    dropped = handle.stats["pairs_dropped"]
    # The static mode's count is a word of the engine's: the graph gets a copy it may reuse.
    dropped = dropped.clone() if isinstance(dropped, Tensor) else torch.tensor(dropped, dtype=torch.int64)
    recv_scales = recv_scales if recv_scales is not None else _nothing(recv_weights)
    return recv_x, recv_scales, recv_weights, counts, token_of(handle), dropped


_WIRE_DTYPES = {"": None, str(torch.float8_e4m3fn): torch.float8_e4m3fn}  # what the op's string stands for


@dispatch_op.register_fake
def _dispatch_fake(x, x_scales, topk_idx, topk_weights, buffer_key, capacity_factor, drop_policy, expert_alignment,
                   pad_to_capacity, wire_dtype):
    buffer = buffer_of(buffer_key)
    rows = fixed_recv_rows(buffer, topk_idx.shape[-1], capacity_factor, expert_alignment, pad_to_capacity)
    if rows is None:
        rows = torch.library.get_ctx().new_dynamic_size()
    counts_on = x.device if buffer.static_tokens(pad_to_capacity) else torch.device("cpu")
    recv_scales = (x_scales.new_empty((rows, x_scales.shape[-1])) if x_scales is not None
                   else x.new_empty((0,), dtype=torch.float32))
    return (x.new_empty((rows, x.shape[-1])), recv_scales, x.new_empty((rows,), dtype=torch.float32),
            torch.empty((buffer.experts_per_rank,), dtype=torch.int64, device=counts_on),
            torch.empty((1,), dtype=torch.int64), torch.empty((), dtype=torch.int64, device=counts_on))


def fixed_recv_rows(buffer, topk: int, capacity_factor, expert_alignment: int, pad_to_capacity) -> Optional[int]:
    """R when it is known before the call (every block padded to a C that the Buffer's
    max_tokens_per_rank fixes), else None."""
    if pad_to_capacity is not True or capacity_factor is None or not buffer.max_tokens_per_rank:
        return None
    capacity = expert_capacity(capacity_factor, buffer.max_tokens_per_rank, topk, buffer.num_experts)
    segment = buffer.world_size * capacity
    segment += -segment % max(1, expert_alignment)
    return buffer.experts_per_rank * segment


def _dispatch_setup(ctx, inputs, output):
    x, x_scales, topk_idx = inputs[:3]
    ctx.save_for_backward(output[4])
    ctx.num_tokens, ctx.topk = x.shape[0], topk_idx.shape[1]
    ctx.prequantized = x_scales is not None


def _dispatch_backward(ctx, grad_recv_x, _grad_scales, grad_recv_weights, *_):
    (token,) = ctx.saved_tensors
    want_w = ctx.needs_input_grad[3]
    if ctx.prequantized:  # no gradient to x: only the weights' travels (dispatch_backward_now)
        if not want_w:
            return (None,) * 10
        grad_recv_x = grad_recv_weights.new_empty((0, 0))
    grad_x, grad_w = dispatch_backward_op(grad_recv_x, grad_recv_weights if want_w else None, token, ctx.num_tokens,
                                          ctx.topk)
    grad_x = None if ctx.prequantized or not ctx.needs_input_grad[0] else grad_x
    return grad_x, None, None, (grad_w if want_w else None), None, None, None, None, None, None


dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("moe_comm::dispatch_backward", mutates_args=())
def dispatch_backward_op(grad_recv_x: Tensor, grad_recv_weights: Optional[Tensor], token: Tensor, num_tokens: int,
                         topk: int) -> Tuple[Tensor, Tensor]:
    """The transpose of dispatch (an unweighted combine). -> grad_x [T, H], grad_weights [T, K]
    (empty [0] when grad_recv_weights is None)."""
    from .ops import dispatch_backward_now
    grad_x, grad_w = dispatch_backward_now(handle_of(token), grad_recv_x, grad_recv_weights)
    return grad_x, (grad_w if grad_w is not None else _nothing(grad_recv_x))


@dispatch_backward_op.register_fake
def _dispatch_backward_fake(grad_recv_x, grad_recv_weights, token, num_tokens, topk):
    grad_w = (grad_recv_x.new_empty((num_tokens, topk), dtype=torch.float32) if grad_recv_weights is not None
              else _nothing(grad_recv_x))
    return grad_recv_x.new_empty((num_tokens, grad_recv_x.shape[-1])), grad_w


@torch.library.custom_op("moe_comm::combine", mutates_args=())
def combine_op(expert_y: Tensor, token: Tensor, topk_weights: Optional[Tensor], num_tokens: int,
               reuse_weights: bool) -> Tuple[Tensor, Tensor]:
    """-> y [T, H], the weights each received row was reduced with ([N, K]; empty [0] unweighted).
    reuse_weights: topk_weights is dispatch's tensor, so the receivers hold its values already
    (every rank passes the same; that tensor modified in place since is rejected on every rank)."""
    from .ops import combine_now
    handle = handle_of(token)
    y, slot_weights = combine_now(expert_y, handle, topk_weights, _checked_reuse(handle, topk_weights, reuse_weights))
    if slot_weights is None:
        return y, _nothing(expert_y)
    # Reused, they are the layout's own (the next combine reads them): the graph gets a copy.
    return y, (slot_weights.clone() if reuse_weights else slot_weights)


@combine_op.register_fake
def _combine_fake(expert_y, token, topk_weights, num_tokens, reuse_weights):
    slot_weights = _nothing(expert_y)
    if topk_weights is not None:
        rows = torch.library.get_ctx().new_dynamic_size()
        slot_weights = expert_y.new_empty((rows, topk_weights.shape[-1]), dtype=torch.float32)
    return expert_y.new_empty((num_tokens, expert_y.shape[-1])), slot_weights


def _checked_reuse(handle: DispatchHandle, topk_weights, reuse: bool):
    """reuse, or the InputError of dispatch's tensor modified in place since. (A tensor with
    other memory is a copy, the compiler's or opcheck's: it is taken to hold the same values; an
    inference tensor has no version to compare. Under torch.compile an in-place change between
    dispatch and combine is not seen: README.)"""
    mine = handle.dispatch_weights
    if (reuse and topk_weights is not None and mine is not None and topk_weights.numel()
            and handle.dispatch_weights_version >= 0 and not topk_weights.is_inference()
            and topk_weights.data_ptr() == mine.data_ptr() and topk_weights._version != handle.dispatch_weights_version):
        return InputError("topk_weights", ValueError(
            "topk_weights: combine was given dispatch's topk_weights, but the tensor was modified in place since "
            "dispatch; pass the unchanged tensor, or a new one"))
    return reuse


def _combine_setup(ctx, inputs, output):
    expert_y, token, topk_weights = inputs[:3]
    weighted = topk_weights is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(token, output[1] if weighted else None, expert_y if weighted else None)
    ctx.num_recv_rows, ctx.topk = expert_y.shape[0], topk_weights.shape[1] if weighted else 0


def _combine_backward(ctx, grad_y, _grad_slot_weights):
    token, slot_weights, expert_y = ctx.saved_tensors
    want_w = ctx.needs_input_grad[2]
    grad_expert_y, grad_w = combine_backward_op(grad_y, token, slot_weights, expert_y if want_w else None,
                                                ctx.num_recv_rows, ctx.topk)
    return grad_expert_y, None, (grad_w if want_w else None), None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


@torch.library.custom_op("moe_comm::combine_backward", mutates_args=())
def combine_backward_op(grad_y: Tensor, token: Tensor, slot_weights: Optional[Tensor], expert_y: Optional[Tensor],
                        num_recv_rows: int, topk: int) -> Tuple[Tensor, Tensor]:
    """The transpose of combine (a dispatch of grad_y along the layout). -> grad_expert_y [R, H],
    grad_weights [T, K] (empty [0] without expert_y)."""
    from .ops import combine_backward_now
    grad_expert_y, grad_w = combine_backward_now(handle_of(token), grad_y, slot_weights, expert_y)
    return grad_expert_y, (grad_w if grad_w is not None else _nothing(grad_y))


@combine_backward_op.register_fake
def _combine_backward_fake(grad_y, token, slot_weights, expert_y, num_recv_rows, topk):
    grad_w = (grad_y.new_empty((grad_y.shape[0], topk), dtype=torch.float32) if expert_y is not None
              else _nothing(grad_y))
    return grad_y.new_empty((num_recv_rows, grad_y.shape[-1])), grad_w


def _nothing(like: Tensor) -> Tensor:
    """The empty float32 tensor an op returns for a result it was not asked for."""
    return like.new_empty((0,), dtype=torch.float32)


# -- what dispatch() and combine() call on this path -------------------------------------------

def dispatch(x, topk_idx, topk_weights, buffer, capacity_factor, drop_policy, expert_alignment, pad_to_capacity,
             wire_dtype=None):
    from .validation import fp8_parts
    x_rows, x_scales = fp8_parts(x)
    recv_x, recv_scales, recv_weights, counts, token, dropped = dispatch_op(
        x_rows, x_scales, topk_idx, topk_weights, buffer.op_key, capacity_factor, drop_policy, expert_alignment,
        pad_to_capacity, "" if wire_dtype is None else str(wire_dtype))
    handle = OpHandle(token, x_rows.shape[0], topk_idx.shape[1], buffer, topk_weights, dropped)
    return (recv_x, recv_scales) if x_scales is not None else recv_x, recv_weights, counts, handle


def combine(expert_y, handle: OpHandle, topk_weights):
    # Known while tracing: the very tensor dispatch got (the op checks it is still unchanged).
    reuse = topk_weights is not None and topk_weights is handle.dispatch_weights
    y, _ = combine_op(expert_y, handle.token, topk_weights, handle.num_tokens, reuse)
    return y

