"""dispatch() and combine() as autograd functions, over the Buffer's stages (stages.py).

Wire traffic per call, per stage (one stage flat, two hierarchical):
  dispatch:  a fixed-size header (status + counts; all headers first, then one host
             synchronisation for all), then one row exchange (payload + per-slot expert ids and
             weights)
  combine:   an ok/error value agreed over gloo on the host (peer_status.py), then one row
             exchange back per stage (partial sums per (token, destination)); a small
             forward pass of the weights first only when combine's weights are not the
             tensor dispatch got
  backwards: reuse the handle; no header exchange.
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ._native import C
from .agreement import DTYPE_CODES, F, HeaderLayout, build_header, find_problem, local_problem, relay_header
from .handle import DispatchHandle, version_of
from .peer_status import start_status
from .roll_call import post_reason
from .route import (SLOT_META_BYTES, gather_masked, payload, plan_stage, reduce_back, row_format, send_along,
                    slot_meta, source_order)
from .streams import stream_of, to_device
from .transport import CommError, exchange_header, exchange_rows, headers_to_host
from .validation import check_combine_inputs, check_dispatch_inputs, explain_routing, routing_status


def _source_ranks(buffer, senders: int, blocks: int) -> torch.Tensor:
    """[senders, blocks] source rank of each arrival block at the final stage. Flat: sender s is
    the source. Hierarchical: the node stage's sender is the forwarder with local index l, its
    block b is what rail peer b (node b) sent it, so the source is b * P + l."""
    if len(buffer.stages) == 1:
        return torch.arange(senders).unsqueeze(1)
    P = buffer.topology.ranks_per_node
    return torch.arange(blocks).unsqueeze(0) * P + torch.arange(senders).unsqueeze(1)


def _link_stats(buffer, plans, hidden: int, elem_size: int) -> dict:
    """Token rows this rank put on the wire in this dispatch, by link class; rows a rank sends
    itself cross no link."""
    intra = inter = 0
    for plan in plans:
        stage = plan.stage
        for d, n in enumerate(plan.send_splits):
            if d == stage.index:
                continue
            if stage.crosses_nodes and (buffer.topology.node_of(stage.global_ranks[d]) != buffer.topology.node):
                inter += n
            else:
                intra += n
    row = hidden * elem_size
    return {"rows_sent_intra_node": intra, "rows_sent_inter_node": inter,
            "bytes_sent_intra_node": intra * row, "bytes_sent_inter_node": inter * row}


def _layouts(buffer):
    """HeaderLayout per stage: flat [rows | pairs per expert of d]; hierarchical rail [rows |
    rows per local index of node n | pairs of node n's experts], node [rows per source node |
    pairs per expert of l]."""
    if len(buffer.stages) == 1:
        return [HeaderLayout(1, 0, buffer.experts_per_rank)]
    rail, node = buffer.stages
    return [HeaderLayout(1, node.size, rail.experts_per_dest), HeaderLayout(rail.size, 0, node.experts_per_dest)]


def _exchange_headers(buffer, call, problem, status, idx, plan0):
    """Every stage's header, one host synchronisation. -> (sent, received) per stage, on the
    host."""
    device, layouts = buffer.device, _layouts(buffer)
    first, rank = buffer.stages[0], buffer.rank
    if problem is None:
        forward = None
        if len(buffer.stages) == 2:  # rows each rail peer will forward to each of its node's ranks
            forward = C.count_layout(idx, buffer.num_experts, buffer.world_size, stream_of(device))[0]
            forward = forward.view(first.size, -1)
        header = build_header(first, call, rank, layouts[0], device, status=status,
                              rows=plan0.rows_per_dest.unsqueeze(1), forward=forward,
                              expert_pairs=plan0.pairs_per_expert.view(first.size, -1))
    else:
        header = build_header(first, call, rank, layouts[0], device, problem=problem)
    headers = [header, exchange_header(buffer, first, header, f"dispatch/{first.name}/header")]
    if len(buffer.stages) == 2:
        node = buffer.stages[1]
        relayed = relay_header(node, call, rank, layouts[1], device, headers[1], layouts[0], first.global_ranks,
                               problem=problem, status=status)
        headers += [relayed, exchange_header(buffer, node, relayed, f"dispatch/{node.name}/header")]
    host = headers_to_host(buffer, headers, f"dispatch/{buffer.stages[-1].name}/header")
    return host[0::2], host[1::2], layouts


def _dispatch_forward(x, topk_idx, topk_weights, buffer):
    buffer.begin_call("dispatch")
    rejected = check_dispatch_inputs(x, topk_idx, topk_weights, buffer.device)
    problem = local_problem(buffer.rank, rejected)
    status = plan0 = idx = None
    if problem is None:
        idx = topk_idx.to(torch.int64).contiguous()
        status = routing_status(idx, buffer.num_experts)
        # Plan on a routing that is safe to index even if the status turns out bad (then every
        # slot is masked, nothing is sent and the header tells every rank why).
        checked_idx, idx = idx, idx.masked_fill(status.bool(), -1)
        weights = topk_weights.detach().contiguous() if topk_weights is not None else None
        rows = x.detach()
        if rows.shape[1] > 1 and rows.stride(1) != 1:
            rows = rows.contiguous()
        hidden, topk = x.shape[1], idx.shape[1]
        _, meta_offset, _, row_bytes = row_format(hidden, x.dtype, topk, SLOT_META_BYTES)
        call = dict(hidden=hidden, dtype=DTYPE_CODES[x.dtype], topk=topk, num_experts=buffer.num_experts)
        plan0 = plan_stage(buffer.stages[0], idx)
    else:
        call = dict(hidden=0, dtype=0, topk=0, num_experts=buffer.num_experts)

    sent, received, layouts = _exchange_headers(buffer, call, problem, status, idx, plan0)
    if problem is None and int(sent[0][0, F["status"]]):
        problem = local_problem(buffer.rank, explain_routing(checked_idx, buffer.num_experts))
    for stage, got in zip(buffer.stages, received):
        if problem is None:
            problem = find_problem(stage, call, got, buffer.rank)
    if problem is not None:
        raise problem.exception()  # no token has moved, on any rank

    device, stream = buffer.device, stream_of(buffer.device)
    plans = []
    for stage, layout, mine, got in zip(buffer.stages, layouts, sent, received):
        plan = plan0 if not plans else plan_stage(stage, idx)
        plan.set_splits(layout.rows(mine).sum(dim=1).tolist(), layout.rows(got).sum(dim=1).tolist())
        name = f"dispatch/{stage.name}"
        send = buffer.workspace(name + "/send", len(plan.send_token), row_bytes)
        C.pack_rows(rows, plan.send_token, plan.send_offsets, idx, weights, stage.experts_per_dest, send, stream)
        recv = exchange_rows(buffer, stage, send, plan.send_splits, plan.recv_splits, name)
        plans.append(plan)
        # What arrived is the next stage's input: rows with stage-local expert ids.
        rows = payload(recv, x.dtype, hidden)
        idx, weights = slot_meta(recv, meta_offset, topk)

    # The last header announced every arrival: recv_x is sized without waiting on the device.
    arrived = layouts[-1].rows(received[-1])
    tokens_per_expert = layouts[-1].expert_pairs(received[-1]).sum(dim=0)
    order = source_order(arrived, _source_ranks(buffer, *arrived.shape))
    if order is not None:
        order = to_device(order, device)
    recv_x, recv_weights, tokens_per_expert, row_map, slot_weights = C.expand_rows(
        recv, hidden, x.dtype, topk, buffer.experts_per_rank, order, tokens_per_expert, stream)
    handle = DispatchHandle(
        buffer=buffer, num_tokens=x.shape[0], hidden=hidden, topk=topk, dtype=x.dtype, plans=plans,
        row_map=row_map, slot_weights=slot_weights, tokens_per_expert=tokens_per_expert,
        dispatch_weights=topk_weights,
        dispatch_weights_version=version_of(topk_weights),
        stats=_link_stats(buffer, plans, hidden, x.element_size()))
    return recv_x, recv_weights, tokens_per_expert, handle


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, buffer):
        recv_x, recv_weights, tokens_per_expert, handle = _dispatch_forward(x, topk_idx, topk_weights, buffer)
        ctx.handle = handle
        ctx.mark_non_differentiable(tokens_per_expert)
        return recv_x, recv_weights, tokens_per_expert, handle

    @staticmethod
    @once_differentiable  # double backward raises instead of silently dropping terms (README)
    def backward(ctx, grad_recv_x, grad_recv_weights, _grad_counts, _grad_handle):
        # The transpose of dispatch is an unweighted combine; router-weight gradients ride
        # back in the same rows.
        h = ctx.handle
        want_w = ctx.needs_input_grad[1]
        slot_grads = gather_masked(grad_recv_weights, h.row_map) if want_w else None
        grad_x, grad_w = reduce_back(h.buffer, h.plans, h.num_tokens, grad_recv_x.contiguous(), h.row_map,
                                     None, slot_grads, "dispatch-backward")
        return (grad_x if ctx.needs_input_grad[0] else None), grad_w, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_y, topk_weights, handle, reuse_dispatch_weights, status):
        h = handle
        check_status = status.check if status is not None else None
        if topk_weights is None:
            slot_weights = None
        elif reuse_dispatch_weights:
            slot_weights = h.slot_weights
        else:
            if check_status is not None:  # this weight exchange comes first: agree before it
                check_status()
                check_status = None
            # Receivers need this call's weights: send each token's K weights along the layout.
            sent = send_along(h.buffer, h.plans, topk_weights.detach().contiguous(), "combine-weights")
            slot_weights = sent.masked_fill(h.row_map < 0, 0.0).contiguous()
        y, _ = reduce_back(h.buffer, h.plans, h.num_tokens, expert_y.detach(), h.row_map, slot_weights, None,
                           "combine", before_wire=check_status)
        ctx.handle = h
        ctx.slot_weights = slot_weights
        ctx.save_for_backward(expert_y if topk_weights is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        # The transpose of combine is a dispatch of grad_y along the cached layout.
        h = ctx.handle
        (expert_y,) = ctx.saved_tensors
        grad_rows = send_along(h.buffer, h.plans, grad_y.contiguous(), "combine-backward")
        stream = stream_of(grad_y.device)
        grad_expert_y = torch.empty((h.num_recv_rows, h.hidden), dtype=grad_y.dtype, device=grad_y.device)
        C.scatter_rows(grad_rows, h.row_map, ctx.slot_weights, grad_expert_y, stream)
        grad_w = None
        if ctx.needs_input_grad[1]:
            dots = C.row_dots(grad_rows, expert_y.detach(), h.row_map, stream)  # [n_last, K]
            no_rows = torch.empty((h.num_recv_rows, 0), dtype=torch.float32, device=grad_y.device)
            _, grad_w = reduce_back(h.buffer, h.plans, h.num_tokens, no_rows, h.row_map, None, dots,
                                    "combine-backward-weights")
        return grad_expert_y, grad_w, None, None, None


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], buffer):
    """Sends each token once to every rank owning one of its experts (hierarchical: once to
    each destination node, then inside it); expands it there to one row per local expert.

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
    buffer = handle.buffer
    buffer.begin_call("combine")
    problem = check_combine_inputs(expert_y, topk_weights, handle)
    if problem is not None:
        # The peers' error quotes this: after the status exchange, or (combine_status=False)
        # when their row exchange times out.
        post_reason(buffer, f"combine rejected its argument '{problem.argument}': {problem.error}")
        status = start_status(buffer, problem.argument)
        try:
            if status is not None:
                status.wait()
        except CommError as lost:  # a peer is missing too: this rank's own error still comes first
            raise problem.error from lost
        raise problem.error
    status = start_status(buffer)
    reuse = handle.same_weights_as_dispatch(topk_weights)
    return _Combine.apply(expert_y, topk_weights, handle, reuse, status)


__all__ = ["combine", "dispatch"]
