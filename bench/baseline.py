"""The torch-native dispatch/combine a user writes today (Megatron-LM AlltoAll style), with
the same results as moe_comm: sort (token, expert) pairs by expert, exchange per-expert counts,
all_to_all_single the rows and the router weights, chunk-sort [source][expert] into
[expert][source]; combine reverses it and un-permutes with index_add_. A token picking two
experts on one rank crosses the wire twice."""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd


@dataclass
class BaselineHandle:
    pair_token: torch.Tensor   # [P] token of each sent (token, expert) pair, send order
    pair_weight: torch.Tensor  # [P]
    send_splits: list
    recv_splits: list
    chunk_order: torch.Tensor  # [R] received row -> expert-major position
    num_tokens: int


def _exchange(rows, recv_splits, send_splits, group, differentiable):
    if differentiable:  # what TorchTitan uses for its autograd all-to-all
        out = all_to_all_single_autograd(rows, recv_splits, send_splits, group or dist.group.WORLD)
        return out.wait() if hasattr(out, "wait") else out
    out = rows.new_empty((sum(recv_splits),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows, recv_splits, send_splits, group=group)
    return out


def dispatch(x, topk_idx, topk_weights, num_experts, group=None, differentiable=False):
    W = dist.get_world_size(group)
    per_rank = num_experts // W
    T, K = topk_idx.shape
    flat = topk_idx.flatten()
    valid = flat >= 0
    experts = flat[valid]
    order = torch.argsort(experts, stable=True)
    pair_token = (torch.arange(T * K, device=x.device)[valid] // K)[order]
    pair_weight = topk_weights.flatten()[valid][order]
    counts = torch.bincount(experts, minlength=num_experts)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    send_splits = counts.view(W, per_rank).sum(1).tolist()
    recv_splits = recv_counts.view(W, per_rank).sum(1).tolist()
    recv_x = _exchange(x[pair_token], recv_splits, send_splits, group, differentiable)
    recv_w = _exchange(pair_weight, recv_splits, send_splits, group, differentiable)
    # Received rows are [source][local expert]; the API order is [local expert][source].
    chunks = recv_counts.cpu().view(W, per_rank)
    starts = (chunks.flatten().cumsum(0) - chunks.flatten()).view(W, per_rank)
    chunk_order = torch.cat([torch.arange(int(starts[s, e]), int(starts[s, e] + chunks[s, e]))
                             for e in range(per_rank) for s in range(W)] or [torch.zeros(0, dtype=torch.int64)])
    chunk_order = chunk_order.to(x.device)
    handle = BaselineHandle(pair_token, pair_weight, send_splits, recv_splits, chunk_order, T)
    return recv_x[chunk_order], recv_w[chunk_order], chunks.sum(0), handle


def combine(expert_y, handle: BaselineHandle, weighted=True, group=None, differentiable=False):
    source_order = torch.empty_like(expert_y)
    if differentiable:
        source_order = source_order.index_copy(0, handle.chunk_order, expert_y)
    else:
        source_order[handle.chunk_order] = expert_y
    back = _exchange(source_order, handle.send_splits, handle.recv_splits, group, differentiable)
    rows = back.float()
    if weighted:
        rows = rows * handle.pair_weight.unsqueeze(1)
    y = torch.zeros((handle.num_tokens, expert_y.shape[1]), dtype=torch.float32, device=expert_y.device)
    return y.index_add(0, handle.pair_token, rows).to(expert_y.dtype)
