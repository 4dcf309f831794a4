"""MoELayer: a router, SwiGLU experts sharded over the Buffer's ranks, dispatch/combine between.

Each rank holds E / W experts and the whole router (replicated: sum its gradients over the
group, as for any data-parallel parameter; `allreduce_replicated_grads` does it).
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .experts import grouped_mm
from .group_sum import sum_over_group
from .ops import combine, dispatch
from .routing import node_limited_topk


class MoELayer(nn.Module):
    """y = sum over the token's top-k experts of weight * SwiGLU_e(x).

    hidden, ffn_hidden: model and expert widths; num_experts (global), topk.
    score_func: "softmax" or "sigmoid"; max_nodes: node-limited routing over the Buffer's nodes
    (None: plain top-k); normalize / scaling_factor: as in node_limited_topk.
    aux_loss_coef: Switch-style load-balancing loss E * sum_e f_e * P_e over this rank's tokens,
    kept in `self.aux_loss` (add it to your loss).
    bias_update_rate: DeepSeek-V3 bias balancing: after each training forward, every expert's
    selection bias moves by rate * sign(mean load - its load), loads counted over the group.
    capacity_factor, drop_policy: expert capacity, as in dispatch (None: no dropping; a dropped
    pair contributes nothing, the residual stream carries the token). `self.drop_rate` is the
    fraction of this rank's routed pairs dropped in the last forward. expert_alignment: as in
    dispatch (the experts then also run on the zero padding rows, which combine ignores).
    pad_to_capacity: static expert segments, as in dispatch (the Buffer needs a
    max_tokens_per_rank unless every rank has the same number of tokens).
    wire_dtype: torch.float8_e4m3fn sends the dispatch rows in FP8 (as dispatch's; the experts
    get them back in x's dtype, gradients straight through).
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, topk: int, buffer, *,
                 score_func: str = "softmax", max_nodes: Optional[int] = None, normalize: bool = False,
                 scaling_factor: float = 1.0, aux_loss_coef: float = 0.0, bias_update_rate: float = 0.0,
                 capacity_factor: Optional[float] = None, drop_policy: str = "probs", expert_alignment: int = 1,
                 pad_to_capacity: bool = False, wire_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if num_experts != buffer.num_experts:
            raise ValueError(f"num_experts: {num_experts} but the Buffer was built for {buffer.num_experts}")
        self.buffer = buffer
        self.num_experts, self.topk = num_experts, topk
        self.score_func, self.max_nodes = score_func, max_nodes
        self.normalize, self.scaling_factor = normalize, scaling_factor
        self.aux_loss_coef, self.bias_update_rate = aux_loss_coef, bias_update_rate
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.expert_alignment, self.pad_to_capacity = expert_alignment, pad_to_capacity
        self.wire_dtype = wire_dtype
        self._drop_counts = (0, 0)  # (pairs dropped, pairs routed) in the last forward
        self._routing_bias = None  # the expert bias the last forward routed with
        local = buffer.experts_per_rank
        self.first_expert = buffer.rank * local
        self.router = nn.Linear(hidden, num_experts, bias=False)
        scale_in, scale_ffn = hidden ** -0.5, ffn_hidden ** -0.5
        self.w_gate = nn.Parameter(torch.randn(local, hidden, ffn_hidden) * scale_in)
        self.w_up = nn.Parameter(torch.randn(local, hidden, ffn_hidden) * scale_in)
        self.w_down = nn.Parameter(torch.randn(local, ffn_hidden, hidden) * scale_ffn)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.aux_loss = torch.zeros(())
        self.last_load = torch.zeros(num_experts, dtype=torch.int64)

    def route(self, x: torch.Tensor):
        """x [T, H] -> topk_idx [T, k], topk_weights [T, k] float32, probabilities [T, E]."""
        logits = self.router(x).float()
        nodes = self.buffer.topology.num_nodes if self.max_nodes else 1
        bias = None
        if self.bias_update_rate:
            # A checkpoint's recomputation routes as the first forward did, before its update.
            if not _recomputing() or self._routing_bias is None:
                self._routing_bias = self.expert_bias.detach().clone()
            bias = self._routing_bias
        idx, weights = node_limited_topk(logits, self.topk, nodes, min(self.max_nodes or 1, nodes),
                                         score_func=self.score_func, bias=bias, normalize=self.normalize,
                                         scaling_factor=self.scaling_factor)
        probs = torch.softmax(logits, -1) if self.score_func == "softmax" else torch.sigmoid(logits)
        return idx, weights, probs

    def run_experts(self, recv_x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """SwiGLU per local expert over the expert-major rows (grouped_mm: a torch op, so that
        the layer compiles; CPU torch has no grouped matmul of its own)."""
        counts = tokens_per_expert
        if counts.device.type != "cpu":  # the static mode: equal segments, known without a read
            local = self.buffer.experts_per_rank
            counts = torch.full((local,), recv_x.shape[0] // local, dtype=torch.int64)
        gate = torch.nn.functional.silu(grouped_mm(recv_x, self.w_gate, counts))
        return grouped_mm(gate * grouped_mm(recv_x, self.w_up, counts), self.w_down, counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        idx, weights, probs = self.route(x)
        recv_x, _, tokens_per_expert, handle = dispatch(x, idx, weights, self.buffer,
                                                        capacity_factor=self.capacity_factor,
                                                        drop_policy=self.drop_policy,
                                                        expert_alignment=self.expert_alignment,
                                                        pad_to_capacity=self.pad_to_capacity,
                                                        wire_dtype=self.wire_dtype)
        y = combine(self.run_experts(recv_x, tokens_per_expert), handle, weights)
        routed = idx >= 0
        self._drop_counts = (handle.pairs_dropped, routed.sum())  # read by drop_rate, not here
        # Loads by scatter, not by a boolean index: fixed shapes, no host wait (torch.compile).
        load = torch.zeros(self.num_experts, dtype=torch.int64, device=idx.device)
        load.scatter_add_(0, idx.clamp(min=0).flatten(), routed.flatten().long())
        self.aux_loss = self._aux_loss(load, probs) if self.aux_loss_coef else probs.new_zeros(())
        load = sum_over_group(load, y, self.buffer.op_key)  # after combine on every rank (group_sum.py)
        self.last_load = load
        if self.training and self.bias_update_rate and not _recomputing():
            with torch.no_grad():
                self.expert_bias += self.bias_update_rate * torch.sign(load.float().mean() - load.float())
        return y.reshape(shape)

    @property
    def drop_rate(self) -> float:
        """The fraction of this rank's routed pairs dropped in the last forward (read on use)."""
        dropped, routed = (int(n) for n in self._drop_counts)
        return dropped / routed if routed else 0.0

    def _aux_loss(self, load: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        tokens = probs.shape[0]
        if tokens == 0:
            return probs.sum() * 0.0
        fraction = load.float() / (tokens * self.topk)
        return self.aux_loss_coef * self.num_experts * (fraction * probs.mean(0)).sum()


def _recomputing() -> bool:
    """Whether this forward is an activation checkpoint's recomputation (eager: it runs inside
    backward); its state updates were made by the first forward. (Compiled, torch skips them:
    README: torch.compile.)"""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def allreduce_replicated_grads(module: nn.Module, group=None, average: bool = False,
                               sharded=("w_gate", "w_up", "w_down")):
    """Sums (or, with `average`, averages) over the group the gradients of every parameter
    replicated across it: all but the sharded experts (parameters named in `sharded`)."""
    size = dist.get_world_size(group)
    for name, param in module.named_parameters():
        if param.grad is None or name.split(".")[-1] in sharded:
            continue
        dist.all_reduce(param.grad, group=group)
        if average:
            param.grad /= size
