"""Trains a small MoE model with expert parallelism on a synthetic task.

    torchrun --standalone --nproc-per-node 4 examples/train_tiny_moe.py --steps 60

Task: tokens come from C clusters; the target is a cluster-specific linear map of the token,
so experts pay off when the router learns to send each cluster to its own experts. The model is
x + MoELayer(x) followed by a linear head. Every rank draws its own batch (data parallel over
tokens) and holds E / W experts (expert parallel); the router and head are replicated and their
gradients summed over the group. Runs on GPU `LOCAL_RANK` over NCCL when torch sees GPUs,
else on CPU tensors over gloo (`--device` forces one).
"""

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn

import moe_comm
from moe_comm.launch import init_distributed
from moe_comm.nn import MoELayer, allreduce_replicated_grads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--ffn-hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-loss", type=float, default=1e-2, help="load-balancing loss coefficient")
    p.add_argument("--bias-rate", type=float, default=0.0, help="DeepSeek-style bias balancing rate")
    p.add_argument("--max-nodes", type=int, help="node-limited routing (with --ranks-per-node)")
    p.add_argument("--ranks-per-node", type=int)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (fullgraph)")
    p.add_argument("--fp8-dispatch", action="store_true",
                   help="send the dispatch rows in FP8 (e4m3 with per-128 scales; README: FP8 on the wire)")
    return p.parse_args(argv)


class Task:
    """Clustered tokens with a per-cluster linear target; the same on every rank."""

    def __init__(self, hidden, clusters, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(clusters, hidden, generator=gen) * 2
        self.maps = torch.randn(clusters, hidden, hidden, generator=gen) / hidden ** 0.5

    def batch(self, tokens, gen):
        cluster = torch.randint(0, len(self.centres), (tokens,), generator=gen)
        x = self.centres[cluster] + torch.randn(tokens, self.centres.shape[1], generator=gen) * 0.3
        return x, torch.einsum("th,thg->tg", x, self.maps[cluster])


class TinyMoEModel(nn.Module):
    def __init__(self, args, buffer):
        super().__init__()
        self.moe = MoELayer(args.hidden, args.ffn_hidden, args.experts, args.topk, buffer,
                            max_nodes=args.max_nodes, aux_loss_coef=args.aux_loss,
                            bias_update_rate=args.bias_rate,
                            wire_dtype=torch.float8_e4m3fn if args.fp8_dispatch else None)
        self.head = nn.Linear(args.hidden, args.hidden)

    def forward(self, x):
        return self.head(x + self.moe(x))


def main(argv=None):
    args = parse_args(argv)
    init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    buf = moe_comm.Buffer(num_experts=args.experts, ranks_per_node=args.ranks_per_node)
    device = buf.device  # the current GPU on NCCL, else the CPU
    torch.manual_seed(0)  # replicated parameters start equal on every rank
    model = TinyMoEModel(args, buf)
    with torch.no_grad():  # experts differ per rank
        gen = torch.Generator().manual_seed(100 + rank)
        for w in (model.moe.w_gate, model.moe.w_up, model.moe.w_down):
            w.copy_(torch.randn(w.shape, generator=gen) * w.shape[1] ** -0.5)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    task = Task(args.hidden, args.clusters)
    gen = torch.Generator().manual_seed(1234 + rank)
    if rank == 0:
        print(f"training: {world} ranks ({buf.topology.num_nodes}x{buf.topology.ranks_per_node}"
              f"{', hierarchical' if buf.hierarchical else ''}), {args.experts} experts "
              f"({buf.experts_per_rank} per rank), top-{args.topk}, {args.tokens} tokens/rank/step")
    forward = torch.compile(model, fullgraph=True) if args.compile else model
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, target = (t.to(device) for t in task.batch(args.tokens, gen))
        opt.zero_grad()
        mse = ((forward(x) - target) ** 2).mean()
        (mse + model.moe.aux_loss).backward()
        allreduce_replicated_grads(model, average=True)  # router and head: data parallel
        opt.step()
        stats = torch.tensor([mse.item(), model.moe.aux_loss.item()], device=device)
        dist.all_reduce(stats)
        if rank == 0 and (step % args.log_every == 0 or step == 1 or step == args.steps):
            load = model.moe.last_load.tolist()
            rate = step * args.tokens * world / (time.perf_counter() - start)
            print(f"step {step:4d}  loss {stats[0] / world:.4f}  aux {stats[1] / world:.4f}  "
                  f"expert load {load}  {rate:.0f} tokens/s", flush=True)
    dist.barrier()
    buf.close()  # its groups go before the process group they were built beside
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
