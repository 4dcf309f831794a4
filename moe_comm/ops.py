"""dispatch() and combine() as autograd functions on the CPU/gloo path.

Wire traffic per call (W > 1):
  dispatch:  header [W, 6] int64, then one row exchange (payload + per-slot metadata)
  combine:   one row exchange back (per-(token, rank) partial sums); a second, small one first
             only when combine's weights are not the tensor dispatch got
  backwards: reuse the handle, no header exchange.
"""

from typing import Optional, Tuple

import torch

from ._native import C
from .handle import DispatchHandle
from .transport import DTYPE_CODES, H, HEADER_FIELDS, exchange_header, exchange_rows
from .validation import ARGUMENT_CODES, CODE_OF, InputError, check_combine_inputs, check_dispatch_inputs

SLOT_META_BYTES = 8   # core/row_format.h SlotMeta: int32 local expert + float32 weight
SCALAR_BYTES = 4      # one float32 per slot on the return wire


def _row_format(hidden: int, dtype: torch.dtype, topk: int, meta_bytes_per_slot: int):
    """-> (payload_bytes, meta_offset, meta_bytes, row_bytes), computed in csrc/core."""
    return C.row_format(hidden, torch.empty((), dtype=dtype).element_size(), topk, meta_bytes_per_slot)


def _payload(rows: torch.Tensor, dtype: torch.dtype, hidden: int) -> torch.Tensor:
    """The [N, hidden] dtype view of packed uint8 rows."""
    return rows.view(dtype)[:, :hidden]


def _scalars(rows: torch.Tensor, meta_offset: int, topk: int) -> torch.Tensor:
    """The [N, topk] float32 view of the scalar block of packed uint8 rows."""
    start = meta_offset // SCALAR_BYTES
    return rows.view(torch.float32)[:, start:start + topk]


def _gather_masked(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] with 0 where index < 0."""
    if values.shape[0] == 0:
        return torch.zeros(index.shape, dtype=values.dtype)
    return values[index.clamp(min=0)].masked_fill(index < 0, 0.0)


def _collect_pairs(per_slot: torch.Tensor, pair_slot: torch.Tensor) -> torch.Tensor:
    """[n_send, K] per send slot -> [T, K]: out[t, k] = per_slot[pair_slot[t, k], k], 0 if masked."""
    k = torch.arange(pair_slot.shape[1]).expand_as(pair_slot)
    if per_slot.shape[0] == 0:
        return torch.zeros(pair_slot.shape, dtype=torch.float32)
    return per_slot[pair_slot.clamp(min=0), k].masked_fill(pair_slot < 0, 0.0)


def _raise_agreed_errors(buffer, local: Optional[InputError], received: torch.Tensor, x_meta):
    """Every rank raises when any rank rejected its input or the ranks disagree on the call."""
    if local is not None:
        raise local.error
    for src in range(buffer.world_size):
        code = int(received[src, H["status"]])
        if code:
            raise RuntimeError(f"dispatch: rank {src} rejected its argument "
                               f"'{ARGUMENT_CODES.get(code, code)}' (see that rank's error); "
                               f"no tokens were exchanged")
    hidden, dtype_code, topk = x_meta
    for field, mine, label in (("hidden", hidden, "x: hidden size"), ("dtype", dtype_code, "x: dtype code"),
                               ("topk", topk, "topk_idx: k"), ("num_experts", buffer.num_experts, "num_experts")):
        theirs = received[:, H[field]]
        bad = (theirs != mine).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{label} is {mine} on rank {buffer.rank} but {int(theirs[bad[0]])} on rank "
                             f"{bad[0]}: every rank of the group must agree")


def _link_stats(buffer, send_splits, hidden: int, elem_size: int) -> dict:
    """Token rows this rank put on the wire, by link class (rows to itself cross no link)."""
    topo = buffer.topology
    intra = sum(n for d, n in enumerate(send_splits) if d != buffer.rank and topo.node_of(d) == topo.node)
    inter = sum(n for d, n in enumerate(send_splits) if topo.node_of(d) != topo.node)
    row = hidden * elem_size
    return {"rows_sent_intra_node": intra, "rows_sent_inter_node": inter,
            "bytes_sent_intra_node": intra * row, "bytes_sent_inter_node": inter * row}


def _dispatch_forward(x, topk_idx, topk_weights, buffer) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle]:
    W = buffer.world_size
    problem = check_dispatch_inputs(x, topk_idx, topk_weights, buffer.num_experts, buffer.device)
    header = torch.zeros(W, len(HEADER_FIELDS), dtype=torch.int64)
    if problem is None:
        idx = topk_idx.to(torch.int64).contiguous()
        weights = topk_weights.detach().contiguous() if topk_weights is not None else None
        tokens_per_rank, _, send_offsets, send_token, pair_slot, first_slot = C.plan_send(
            idx, buffer.num_experts, W)
        header[:, H["count"]] = tokens_per_rank
        meta = (x.shape[1], DTYPE_CODES[x.dtype], idx.shape[1])
    else:
        header[:, H["status"]] = CODE_OF[problem.argument]
        meta = (0, 0, 0)
    header[:, H["hidden"]], header[:, H["dtype"]], header[:, H["topk"]] = meta
    header[:, H["num_experts"]] = buffer.num_experts
    received = exchange_header(buffer, header, "dispatch/header")
    _raise_agreed_errors(buffer, problem, received, meta)

    hidden, topk = x.shape[1], idx.shape[1]
    send_splits = tokens_per_rank.tolist()
    recv_splits = received[:, H["count"]].tolist()
    x_rows = x.detach()
    if x_rows.shape[1] > 1 and x_rows.stride(1) != 1:
        x_rows = x_rows.contiguous()
    row_bytes = _row_format(hidden, x.dtype, topk, SLOT_META_BYTES)[3]
    send = buffer.workspace("dispatch/tokens/send", len(send_token), row_bytes)
    C.pack_rows(x_rows, send_token, send_offsets, idx, weights, buffer.experts_per_rank, send)
    recv = exchange_rows(buffer, send, send_splits, recv_splits, "dispatch/tokens")
    recv_x, recv_weights, tokens_per_expert, row_map, slot_weights = C.expand_rows(
        recv, hidden, x.dtype, topk, buffer.experts_per_rank)
    handle = DispatchHandle(
        buffer=buffer, num_tokens=x.shape[0], hidden=hidden, topk=topk, dtype=x.dtype,
        send_token=send_token, send_offsets=send_offsets, send_splits=send_splits,
        recv_splits=recv_splits, pair_slot=pair_slot, first_slot=first_slot, row_map=row_map,
        slot_weights=slot_weights, tokens_per_expert=tokens_per_expert,
        dispatch_weights=topk_weights,
        dispatch_weights_version=topk_weights._version if topk_weights is not None else -1,
        stats=_link_stats(buffer, send_splits, hidden, x.element_size()))
    return recv_x, recv_weights, tokens_per_expert, handle


def _reduce_back(handle: DispatchHandle, rows: torch.Tensor, slot_weights: Optional[torch.Tensor],
                 scalars: Optional[torch.Tensor], stage_name: str):
    """Receiver: partial[i] = sum_k w[i, k] * rows[row_map[i, k]] (float32), packed with optional
    per-slot scalars; one exchange back; source: y[t] = sum of its partials (float32).
    -> (y [T, H] in rows' dtype, scalars per (t, k) [T, K] or None)"""
    dtype, hidden, topk = rows.dtype, handle.hidden, handle.topk
    _, meta_offset, _, row_bytes = _row_format(hidden, dtype, topk if scalars is not None else 0, SCALAR_BYTES)
    packed = handle.buffer.workspace(stage_name + "/send", handle.row_map.shape[0], row_bytes)
    C.reduce_rows(rows, handle.row_map, slot_weights, _payload(packed, dtype, hidden))
    if scalars is not None:
        _scalars(packed, meta_offset, topk).copy_(scalars)
    back = exchange_rows(handle.buffer, packed, handle.recv_splits, handle.send_splits, stage_name)
    y = torch.empty((handle.num_tokens, hidden), dtype=dtype)
    C.reduce_rows(_payload(back, dtype, hidden), handle.first_slot, None, y)
    pair_scalars = None
    if scalars is not None:
        pair_scalars = _collect_pairs(_scalars(back, meta_offset, topk), handle.pair_slot)
    return y, pair_scalars


def _send_to_experts(handle: DispatchHandle, rows: torch.Tensor, stage_name: str) -> torch.Tensor:
    """Sends each token's row [T, H'] once to every rank it was dispatched to (cached layout).
    -> [N, H'] view in the order of the received rows."""
    rows = rows.contiguous()
    row_bytes = _row_format(rows.shape[1], rows.dtype, 0, 0)[3]
    send = handle.buffer.workspace(stage_name + "/send", len(handle.send_token), row_bytes)
    C.pack_rows(rows, handle.send_token, handle.send_offsets, None, None, 1, send)
    recv = exchange_rows(handle.buffer, send, handle.send_splits, handle.recv_splits, stage_name)
    return _payload(recv, rows.dtype, rows.shape[1])


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, buffer):
        recv_x, recv_weights, tokens_per_expert, handle = _dispatch_forward(x, topk_idx, topk_weights, buffer)
        ctx.handle = handle
        ctx.mark_non_differentiable(tokens_per_expert)
        return recv_x, recv_weights, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_weights, _grad_counts, _grad_handle):
        # The transpose of dispatch is an unweighted combine; router-weight gradients ride
        # back in the same rows.
        handle = ctx.handle
        want_w = ctx.needs_input_grad[1]
        scalars = _gather_masked(grad_recv_weights, handle.row_map) if want_w else None
        grad_x, grad_w = _reduce_back(handle, grad_recv_x.contiguous(), None, scalars, "dispatch-backward/rows")
        return (grad_x if ctx.needs_input_grad[0] else None), grad_w, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_y, topk_weights, handle, reuse_dispatch_weights):
        if topk_weights is None:
            slot_weights = None
        elif reuse_dispatch_weights:
            slot_weights = handle.slot_weights
        else:
            # Receivers need this call's weights: send each token's K weights with the layout.
            sent = _send_to_experts(handle, topk_weights.detach(), "combine/weights")
            slot_weights = sent.masked_fill(handle.row_map < 0, 0.0).contiguous()
        y, _ = _reduce_back(handle, expert_y.detach(), slot_weights, None, "combine/rows")
        ctx.handle = handle
        ctx.slot_weights = slot_weights
        ctx.save_for_backward(expert_y if topk_weights is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # The transpose of combine is a dispatch of grad_y along the cached layout.
        handle = ctx.handle
        (expert_y,) = ctx.saved_tensors
        grad_rows = _send_to_experts(handle, grad_y, "combine-backward/rows")
        grad_expert_y = torch.empty((int(handle.tokens_per_expert.sum()), handle.hidden), dtype=grad_y.dtype)
        C.scatter_rows(grad_rows, handle.row_map, ctx.slot_weights, grad_expert_y)
        grad_w = None
        if ctx.needs_input_grad[1]:
            dots = C.row_dots(grad_rows, expert_y.detach(), handle.row_map)  # [N, K]
            back = exchange_rows(handle.buffer, dots, handle.recv_splits, handle.send_splits,
                                 "combine-backward/weights")
            grad_w = _collect_pairs(back, handle.pair_slot)
        return grad_expert_y, grad_w, None, None


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], buffer):
    """Sends each token once to every rank owning one of its experts; expands it there to one
    row per (token, local expert).

    x [T, H] float32/bfloat16/float16; topk_idx [T, K] int64/int32 in [-1, E) (-1 = unused);
    topk_weights [T, K] float32 or None.
    -> recv_x [R, H] (expert-major; inside an expert by source rank, then source token),
       recv_weights [R] float32, tokens_per_expert [E_local] int64 (CPU), handle.
    """
    return _Dispatch.apply(x, topk_weights, topk_idx, buffer)


def combine(expert_y: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None):
    """y[t] = sum over valid k of w[t, k] * expert_y[row(t, k)] (float32 accumulation; w = 1
    when topk_weights is None). expert_y [R, H] in recv_x's row order and dtype -> y [T, H]."""
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: must be the handle returned by moe_comm.dispatch, got {type(handle).__name__}")
    problem = check_combine_inputs(expert_y, topk_weights, handle)
    if problem is not None:
        raise problem.error
    reuse = handle.same_weights_as_dispatch(topk_weights)
    return _Combine.apply(expert_y, topk_weights, handle, reuse)
