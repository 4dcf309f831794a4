"""A user's script: Buffer, dispatch, combine, backward, destroy_process_group, and a plain
exit (no os._exit, no del, no close). Run as `python exit_script.py RANK WORLD INIT_FILE`."""

import sys

import torch
import torch.distributed as dist

import moe_comm

rank, world, init_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
buf = moe_comm.Buffer(num_experts=4, timeout=60, ranks_per_node=1 if len(sys.argv) > 4 else None)
x = torch.randn(5, 8, requires_grad=True)
weights, idx = torch.rand(5, 4).softmax(-1).topk(2, dim=-1)
recv_x, _, _, handle = moe_comm.dispatch(x, idx, weights, buf)
moe_comm.combine(recv_x * 2, handle, weights).sum().backward()
dist.destroy_process_group()
print(f"rank {rank} done", flush=True)
