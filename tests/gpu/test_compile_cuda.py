"""torch.compile on CUDA (README: torch.compile): MoELayer compiled with inductor and
fullgraph=True gives eager's outputs and gradients over NCCL, in the default and the static mode,
and the communication ops pass torch.library.opcheck on CUDA tensors. Two ranks on one GPU."""

import pytest
import torch
from torch._dynamo.utils import counters

import moe_comm
from moe_comm import library
from moe_comm.nn import MoELayer
from tests.distributed import run_distributed
from tests.gpu.one_gpu import become_own_host
from tests.gpu import marks

pytestmark = marks.EXCHANGES


def _grads(layer, call, x):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = call(x)
    (y.float().square().sum() + layer.aux_loss).backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


def _worker(rank, world_size, static):
    become_own_host(rank)
    buf = moe_comm.Buffer(num_experts=8, device="cuda", timeout=120, max_tokens_per_rank=64 if static else None)
    torch.manual_seed(0)
    kwargs = {"capacity_factor": 2.0, "pad_to_capacity": True} if static else {}
    layer = MoELayer(64, 96, 8, 2, buf, aux_loss_coef=1e-2, **kwargs).cuda()
    x = torch.randn(64 if static else 40 + 8 * rank, 64, generator=torch.Generator().manual_seed(rank)).cuda()
    counters.clear()
    want = _grads(layer, layer, x)
    got = _grads(layer, torch.compile(layer, fullgraph=True), x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not counters["graph_break"]

    idx = torch.rand(x.shape[0], 8, device="cuda").argsort(dim=1)[:, :2]
    w = torch.rand(idx.shape, device="cuda", requires_grad=True)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    args = (xb, None, idx, w, buf.op_key, None, "probs", 1, False, "")
    result = torch.library.opcheck(torch.ops.moe_comm.dispatch.default, args,
                                   test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}, result
    # FP8 rows, quantized and pre-quantized (torch's schema test cannot take a float8 input).
    for fp8 in (args[:-1] + (str(torch.float8_e4m3fn),), (*moe_comm.quantize_fp8(xb.detach()), *args[2:])):
        result = torch.library.opcheck(torch.ops.moe_comm.dispatch.default, fp8,
                                       test_utils=("test_autograd_registration", "test_faketensor"))
        assert set(result.values()) == {"SUCCESS"}, result
    recv_x, _, _, _, token, _ = library.dispatch_op(*args)
    expert_y = torch.randn_like(recv_x).requires_grad_(True)
    result = torch.library.opcheck(torch.ops.moe_comm.combine.default, (expert_y, token, w, x.shape[0], True))
    assert set(result.values()) == {"SUCCESS"}, result
    torch.cuda.synchronize()
    buf.close()
    return True


@pytest.mark.parametrize("static", [False, True])
def test_compiled_moe_layer_on_cuda(static):
    assert run_distributed(2, _worker, static, timeout=600) == [True, True]
