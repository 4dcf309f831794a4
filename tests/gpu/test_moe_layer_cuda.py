"""MoELayer trains the same on CUDA (our kernels + NCCL) as on the CPU path: a few steps of
expert-parallel training on 2 ranks sharing one GPU (own NCCL_HOSTID each)."""

import torch

import moe_comm
from moe_comm.nn import MoELayer, allreduce_replicated_grads
from tests.distributed import run_distributed
from tests.gpu.one_gpu import become_own_host
from tests.gpu import marks

pytestmark = marks.EXCHANGES


def _train(buf, rank, steps=5):
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 8, 2, buf, aux_loss_coef=1e-2)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(100 + rank)
        for w in (layer.w_gate, layer.w_up, layer.w_down):
            w.copy_(torch.randn(w.shape, generator=gen) * 0.2)
    layer.to(buf.device)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(7 + rank)
    losses = []
    for _ in range(steps):
        x = torch.randn(33, 16, generator=gen).to(buf.device)
        opt.zero_grad()
        loss = (layer(x) ** 2).mean() + layer.aux_loss
        loss.backward()
        allreduce_replicated_grads(layer, group=buf.group, average=True)
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().cpu() for p in layer.parameters()]


def _worker(rank, world_size):
    become_own_host(rank)
    cpu_losses, cpu_params = _train(moe_comm.Buffer(num_experts=8, device="cpu"), rank)
    gpu_losses, gpu_params = _train(moe_comm.Buffer(num_experts=8, device="cuda", timeout=120), rank)
    torch.testing.assert_close(torch.tensor(gpu_losses), torch.tensor(cpu_losses), rtol=1e-4, atol=1e-5)
    for g, c in zip(gpu_params, cpu_params):
        torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-5)
    return True


def test_moe_layer_trains_the_same_on_cuda_and_cpu():
    assert run_distributed(2, _worker, timeout=600) == [True, True]
