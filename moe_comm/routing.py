"""Router helpers: DeepSeek-V3 style node-limited (group-limited) top-k."""

from typing import Optional, Tuple

import torch

from ._native import C
from .streams import stream_of

SCORE_FUNCS = ("sigmoid", "softmax", "none")


def _activate(scores: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "sigmoid":
        return torch.sigmoid(scores.float())
    if score_func == "softmax":
        return torch.softmax(scores.float(), dim=-1)
    return scores.float()


def check_routing_args(scores, k, num_nodes, max_nodes, score_func, bias, node_score_topk) -> int:
    """Raises a ValueError/TypeError naming the argument. -> node_score_topk resolved."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores: must be a 2-D tensor [tokens, experts], got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores: must be a floating tensor, got {scores.dtype}")
    E = scores.shape[1]
    for name, value in (("k", k), ("num_nodes", num_nodes), ("max_nodes", max_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive int, got {value!r}")
    if E % num_nodes:
        raise ValueError(f"num_nodes: {E} experts do not split evenly over {num_nodes} nodes")
    if max_nodes > num_nodes:
        raise ValueError(f"max_nodes: {max_nodes} is more than num_nodes {num_nodes}")
    per_node = E // num_nodes
    if k > max_nodes * per_node:
        raise ValueError(f"k: {k} experts cannot come from {max_nodes} node(s) of {per_node} experts")
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func: must be one of {SCORE_FUNCS}, got {score_func!r}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (E,)):
        raise ValueError(f"bias: must be a tensor of shape [{E}], got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if node_score_topk is None:
        node_score_topk = max(1, min(per_node, k // max_nodes))
    if not 1 <= node_score_topk <= per_node:
        raise ValueError(f"node_score_topk: must be in [1, {per_node}], got {node_score_topk}")
    return node_score_topk


@torch.library.custom_op("moe_comm::node_limited_select", mutates_args=())
def node_limited_select(select: torch.Tensor, scores: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                        num_nodes: int, max_nodes: int, node_score_topk: int) -> torch.Tensor:
    """The routing kernel as a torch op (torch.compile sees it): select [T, E] float32 selection
    scores -> topk_idx [T, k] int64. scores and bias are only checked (here, where their values
    are read anyway: no host wait of its own under torch.compile)."""
    if scores.numel() and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores: contains NaN or infinity")
    if bias is not None and bias.numel() and not bool(torch.isfinite(bias).all()):
        raise ValueError("bias: contains NaN or infinity")
    return C.node_limited_select(select, k, num_nodes, max_nodes, node_score_topk, stream_of(select.device))


@node_limited_select.register_fake
def _node_limited_select_fake(select, scores, bias, k, num_nodes, max_nodes, node_score_topk):
    return select.new_empty((select.shape[0], k), dtype=torch.int64)


def node_limited_topk(scores: torch.Tensor, k: int, num_nodes: int, max_nodes: int, *,
                      score_func: str = "sigmoid", bias: Optional[torch.Tensor] = None,
                      normalize: bool = True, scaling_factor: float = 1.0,
                      node_score_topk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token from at most `max_nodes` nodes.

    scores [T, E]: router logits (score_func "sigmoid" or "softmax" turns them into
    probabilities; "none" takes them as they are). Experts [n * E / N, (n + 1) * E / N) live on
    node n. A node's score is the sum of its best `node_score_topk` (default k // max_nodes)
    selection scores; the best `max_nodes` nodes are kept, then the top-k experts among them.
    bias [E] (DeepSeek-V3 load balancing) is added for selection only. The weights are the
    probabilities of the chosen experts, normalised to sum to 1 when `normalize`, times
    `scaling_factor`; they carry gradients to `scores`.
    -> topk_idx [T, k] int64 (by descending selection score), topk_weights [T, k] float32.
    """
    node_score_topk = check_routing_args(scores, k, num_nodes, max_nodes, score_func, bias, node_score_topk)
    probs = _activate(scores, score_func)
    select = probs.detach() + bias.detach().float() if bias is not None else probs.detach()
    topk_idx = node_limited_select(select.float().contiguous(), scores.detach(),
                                   bias.detach() if bias is not None else None, k, num_nodes, max_nodes, node_score_topk)
    weights = probs.gather(1, topk_idx)
    if normalize:
        weights = weights / (weights.sum(dim=1, keepdim=True) + 1e-20)
    return topk_idx, weights * scaling_factor
