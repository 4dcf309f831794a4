"""FP8 on the wire on CUDA (API.md): the quantizing pack (a warp per 128-element block) and the
dequantizing expand give the reference's rows bit for bit over NCCL, flat and hierarchical,
and pre-quantized rows move bit for bit. Several ranks on one GPU (tests/gpu/one_gpu.py)."""

import pytest
import torch

import moe_comm
from moe_comm import reference
from tests.cases import Case, all_inputs
from tests.distributed import run_distributed
from tests.gpu.one_gpu import become_own_host
from tests.gpu import marks

pytestmark = marks.EXCHANGES

FP8 = torch.float8_e4m3fn
CASES = [
    Case(4, 8, topk=3, hidden=7168, dtype="bfloat16", pattern="skewed", tokens=(64, 0, 33, 17), seed=1),
    Case(4, 8, topk=1, hidden=129, dtype="float32", pattern="one_expert", tokens=(9,), seed=2),
    Case(4, 8, topk=2, hidden=300, dtype="float16", pattern="masked", tokens=(20, 5), seed=3),
]


def _worker(rank, world_size, ranks_per_node, hierarchical):
    become_own_host(rank)
    buf = moe_comm.Buffer(num_experts=8, ranks_per_node=ranks_per_node, hierarchical=hierarchical, device="cuda",
                          timeout=120)
    rows = 0
    for case in CASES:
        xs, idxs, ws = all_inputs(case)
        x = xs[rank].cuda().requires_grad_(True)
        recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idxs[rank].cuda(), ws[rank].cuda(), buf,
                                                           wire_dtype=FP8)
        want_x, want_w, want_counts = reference.dispatch_all(reference.over_fp8_wire(xs), idxs, ws, 8)[rank]
        assert torch.equal(counts.cpu(), want_counts) and torch.equal(recv_w.cpu(), want_w)
        assert torch.equal(recv_x.detach().cpu(), want_x), case
        recv_x.float().sum().backward()  # straight through: each expert row of a token adds 1
        slots = (idxs[rank] >= 0).sum(dim=1, keepdim=True).expand(-1, case.hidden)
        assert torch.equal(x.grad.cpu(), slots.to(x.dtype))
        q, s = moe_comm.quantize_fp8(xs[rank])
        (recv_q, recv_s), _, _, _ = moe_comm.dispatch((q.cuda(), s.cuda()), idxs[rank].cuda(), ws[rank].cuda(), buf)
        assert torch.equal(moe_comm.dequantize_fp8(recv_q.cpu(), recv_s.cpu(), x.dtype), want_x)
        rows += recv_x.shape[0]
    torch.cuda.synchronize()
    buf.close()
    return rows


@pytest.mark.parametrize("ranks_per_node,hierarchical", [(4, False), (2, True)])
def test_fp8_dispatch_cuda_equals_the_reference(ranks_per_node, hierarchical):
    assert sum(run_distributed(4, _worker, ranks_per_node, hierarchical, timeout=900)) > 0
