"""Expert-parallel training with moe_comm.nn.MoELayer over 4 ranks matches one process holding
all experts and all tokens (plain torch, no moe_comm), step for step: losses and parameters."""

import pytest
import torch

import moe_comm
from moe_comm import reference
from moe_comm.nn import MoELayer, allreduce_replicated_grads
from tests.distributed import run_distributed

H, F, E, K, STEPS, LR = 8, 12, 8, 2, 4, 0.2


def _full_params(seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "router": torch.randn(E, H, generator=gen) * 0.5,
        "w_gate": torch.randn(E, H, F, generator=gen) * H ** -0.5,
        "w_up": torch.randn(E, H, F, generator=gen) * H ** -0.5,
        "w_down": torch.randn(E, F, H, generator=gen) * F ** -0.5,
    }


def _data(step, rank):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    tokens = [6, 0, 9, 3][rank]  # rank 1 has no tokens
    return torch.randn(tokens, H, generator=gen), torch.randn(tokens, H, generator=gen)


def _dense_step(p, expert_bias, x, target, total, cfg, sizes):
    """One process, every expert: route (the reference router), drop by each rank's capacity
    (sizes: tokens per rank), run each expert on its tokens, weighted sum, squared error.
    -> loss, global expert load (before dropping)."""
    logits = x @ p["router"].T
    nodes = cfg["nodes"] if cfg["max_nodes"] else 1
    idx, w = reference.node_limited_topk(logits, K, nodes, min(cfg["max_nodes"] or 1, nodes),
                                         score_func=cfg["score_func"], normalize=cfg["normalize"],
                                         bias=expert_bias if cfg["bias_rate"] else None)
    kept = idx
    if cfg.get("capacity"):
        kept = torch.cat([reference.drop_by_capacity(i, ww.detach(), E, cfg["capacity"], cfg["policy"],
                                                     tokens=cfg.get("max_tokens"))
                          for i, ww in zip(idx.split(sizes), w.split(sizes))])
    y = torch.zeros_like(x)
    for e in range(E):
        token, slot = (kept == e).nonzero(as_tuple=True)
        rows = x[token]
        out = (torch.nn.functional.silu(rows @ p["w_gate"][e]) * (rows @ p["w_up"][e])) @ p["w_down"][e]
        y = y.index_add(0, token, w[token, slot].unsqueeze(1) * out)
    return ((y - target) ** 2).sum() / total, torch.bincount(idx.flatten(), minlength=E)


def _train_worker(rank, world_size, cfg):
    buf = moe_comm.Buffer(num_experts=E, ranks_per_node=cfg["ranks_per_node"], max_tokens_per_rank=cfg.get("max_tokens"))
    layer = MoELayer(H, F, E, K, buf, score_func=cfg["score_func"], max_nodes=cfg["max_nodes"],
                     normalize=cfg["normalize"], bias_update_rate=cfg["bias_rate"],
                     capacity_factor=cfg.get("capacity"), drop_policy=cfg.get("policy", "probs"),
                     expert_alignment=cfg.get("alignment", 1), pad_to_capacity=cfg.get("pad", False))
    full = _full_params(seed=5)
    local = slice(layer.first_expert, layer.first_expert + buf.experts_per_rank)
    with torch.no_grad():
        layer.router.weight.copy_(full["router"])
        for name in ("w_gate", "w_up", "w_down"):
            getattr(layer, name).copy_(full[name][local])
    opt = torch.optim.SGD(layer.parameters(), lr=LR)

    dense = {k: v.clone().requires_grad_() for k, v in full.items()}
    dense_opt = torch.optim.SGD(dense.values(), lr=LR)
    dense_bias = torch.zeros(E)
    cfg = dict(cfg, nodes=buf.topology.num_nodes)

    dropped = []
    for step in range(STEPS):
        data = [_data(step, r) for r in range(world_size)]
        total = sum(x.shape[0] for x, _ in data) * H
        x, target = data[rank]
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).sum() / total
        loss.backward()
        allreduce_replicated_grads(layer)
        opt.step()
        global_loss = loss.detach().clone()
        torch.distributed.all_reduce(global_loss)

        dense_opt.zero_grad()
        all_x = torch.cat([d[0] for d in data])
        all_t = torch.cat([d[1] for d in data])
        dense_loss, dense_load = _dense_step(dense, dense_bias, all_x, all_t, total, cfg,
                                             [d[0].shape[0] for d in data])
        dense_loss.backward()
        dense_opt.step()
        if cfg["bias_rate"]:
            dense_bias += cfg["bias_rate"] * torch.sign(dense_load.float().mean() - dense_load.float())

        torch.testing.assert_close(global_loss, dense_loss.detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"step {step} loss: {m}")
        assert torch.equal(layer.last_load, dense_load), f"step {step}: expert load differs"
        torch.testing.assert_close(layer.expert_bias, dense_bias)
        torch.testing.assert_close(layer.router.weight, dense["router"], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"step {step} router: {m}")
        for name in ("w_gate", "w_up", "w_down"):
            torch.testing.assert_close(getattr(layer, name), dense[name][local], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step} {name}: {m}")
        if cfg.get("capacity"):
            dropped.append(layer.drop_rate)
    assert not cfg.get("capacity") or max(dropped) > 0 or rank == 1  # rank 1 has no tokens
    return float(global_loss)


@pytest.mark.parametrize("cfg", [
    dict(ranks_per_node=4, score_func="softmax", max_nodes=None, normalize=False, bias_rate=0.0),
    dict(ranks_per_node=2, score_func="sigmoid", max_nodes=1, normalize=True, bias_rate=0.01),
    dict(ranks_per_node=4, score_func="softmax", max_nodes=None, normalize=False, bias_rate=0.0, capacity=0.5,
         policy="probs", pad=True, max_tokens=12),
    dict(ranks_per_node=2, score_func="sigmoid", max_nodes=None, normalize=True, bias_rate=0.0, capacity=0.75,
         policy="position", alignment=4),
], ids=["flat-softmax-topk", "2x2-hierarchical-sigmoid-node-limited-bias", "flat-capacity-probs-padded",
        "2x2-hierarchical-capacity-position-aligned"])
def test_expert_parallel_training_equals_single_process(cfg):
    losses = run_distributed(4, _train_worker, cfg)
    assert len(set(losses)) == 1  # every rank saw the same global loss


def _aux_worker(rank, world_size):
    buf = moe_comm.Buffer(num_experts=E, ranks_per_node=world_size)
    layer = MoELayer(H, F, E, K, buf, aux_loss_coef=0.01)
    x = torch.randn(16, H, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and layer.aux_loss.requires_grad and float(layer.aux_loss) > 0
    (y.sum() + layer.aux_loss).backward()
    assert layer.router.weight.grad is not None and layer.w_down.grad is not None
    assert int(layer.last_load.sum()) == 16 * K * world_size
    return True


def test_aux_loss_and_load_are_reported():
    assert run_distributed(2, _aux_worker) == [True, True]
