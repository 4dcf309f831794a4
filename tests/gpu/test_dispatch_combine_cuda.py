"""dispatch/combine on CUDA tensors (our kernels, our NCCL communicators) against the reference
and against the CPU path: world size 1; several ranks on ONE GPU, each with its own NCCL_HOSTID
so that NCCL treats it as a separate node (sockets: slow, but our grouped send/recv runs);
hierarchical forwarding with simulated nodes; gradients; a bad rank's input."""


import pytest
import torch

import moe_comm
from tests.cases import Case, all_inputs, grid
from tests.distributed import run_distributed
from tests.gpu.one_gpu import become_own_host
from tests.test_dispatch_combine import check_case
from tests.test_errors import BAD_COMBINE_INPUTS, _good, combine_one_bad_rank, combine_one_bad_rank_deferred
from tests.gpu import marks

pytestmark = marks.EXCHANGES


def _grid_worker(rank, world_size, ranks_per_node, hierarchical, every):
    become_own_host(rank)
    buffers = {}
    cases = grid(world_size)[::every]
    for case in cases:
        if case.num_experts not in buffers:
            buffers[case.num_experts] = moe_comm.Buffer(num_experts=case.num_experts, ranks_per_node=ranks_per_node,
                                                        hierarchical=hierarchical, device="cuda", timeout=120)
        buf = buffers[case.num_experts]
        assert buf.device.type == "cuda" and buf.hierarchical == hierarchical
        check_case(rank, case, buf)
    return len(cases)


@pytest.mark.parametrize("world_size,ranks_per_node,hierarchical,every", [
    (1, 1, False, 1), (2, 2, False, 1), (3, 3, False, 2), (4, 2, False, 3), (4, 2, True, 2), (4, 1, True, 3)])
def test_dispatch_combine_cuda_grid(world_size, ranks_per_node, hierarchical, every):
    counts = run_distributed(world_size, _grid_worker, ranks_per_node, hierarchical, every, timeout=900)
    assert counts == [len(grid(world_size)[::every])] * world_size


def _roundtrip(buf, case, rank, device):
    """Forward and backward of dispatch -> expert -> combine; -> everything, on the CPU."""
    xs, idxs, ws = all_inputs(case)
    x = xs[rank].to(device).requires_grad_()
    w = ws[rank].to(device).requires_grad_()
    recv_x, recv_w, counts, handle = moe_comm.dispatch(x, idxs[rank].to(device), w, buf)
    scale = torch.linspace(0.5, 1.5, recv_x.shape[0], device=device).unsqueeze(1)
    expert_y = recv_x * scale + recv_w.unsqueeze(1)
    y = moe_comm.combine(expert_y, handle, w)
    y_other = moe_comm.combine(expert_y, handle, w * 0.5)  # weights not the dispatched tensor
    gen = torch.Generator().manual_seed(rank)
    g = torch.randn(y.shape, generator=gen).to(device)
    ((y * g).sum() + (y_other * g).sum()).backward()
    grads = [g if g is not None else torch.zeros_like(t) for g, t in ((x.grad, x), (w.grad, w))]
    return [t.detach().cpu() for t in (recv_x, recv_w, y, y_other, *grads)] + [counts]


def _gradient_worker(rank, world_size, ranks_per_node):
    become_own_host(rank)
    case = Case(world_size=world_size, num_experts=4 * world_size, topk=3, hidden=33, pattern="masked",
                tokens=(40, 0, 17, 5))
    cpu = moe_comm.Buffer(num_experts=case.num_experts, ranks_per_node=ranks_per_node, device="cpu")
    gpu = moe_comm.Buffer(num_experts=case.num_experts, ranks_per_node=ranks_per_node, device="cuda", timeout=120)
    expected = _roundtrip(cpu, case, rank, torch.device("cpu"))
    got = _roundtrip(gpu, case, rank, gpu.device)
    names = ("recv_x", "recv_weights", "y", "y_other_weights", "x.grad", "w.grad", "tokens_per_expert")
    for name, g, e in zip(names, got, expected):
        if name in ("recv_x", "recv_weights", "tokens_per_expert"):
            assert torch.equal(g, e), name  # dispatch: bit for bit
        else:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)  # float32 sums, order may differ
    return True


@pytest.mark.parametrize("world_size,ranks_per_node", [(1, 1), (2, 2), (4, 2)])
def test_cuda_path_equals_cpu_path_with_gradients(world_size, ranks_per_node):
    assert run_distributed(world_size, _gradient_worker, ranks_per_node, timeout=600) == [True] * world_size


def _bad_rank_worker(rank, world_size):
    become_own_host(rank)
    buf = moe_comm.Buffer(num_experts=4, device="cuda", timeout=60)
    x = torch.randn(5, 8, device="cuda")
    idx = torch.randint(0, 4, (5, 1), device="cuda")
    if rank == 1:
        idx[3, 0] = 9  # out of range: found on the device, explained after the header
    with pytest.raises((ValueError, RuntimeError)) as info:
        moe_comm.dispatch(x, idx, None, buf)
    message = str(info.value)
    if rank == 1:
        assert message.startswith("topk_idx: topk_idx[3, 0] = 9 is out of range"), message
    else:
        assert "rank 1 rejected its argument 'topk_idx'" in message, message
    # The Buffer keeps working.
    good = torch.zeros(5, 1, dtype=torch.int64, device="cuda")
    recv_x, _, counts, handle = moe_comm.dispatch(x, good, None, buf)
    assert int(counts.sum()) == (5 * world_size if rank == 0 else 0)
    y = moe_comm.combine(recv_x, handle)
    assert torch.equal(y, x)
    return True


def test_bad_rank_on_cuda_makes_every_rank_raise():
    assert run_distributed(2, _bad_rank_worker, timeout=300) == [True, True]


def _timeout_worker(rank, world_size):
    become_own_host(rank)
    import time
    buf = moe_comm.Buffer(num_experts=2, device="cuda", timeout=3)
    if rank == 1:
        time.sleep(12)  # never dispatches
        return None
    start = time.monotonic()
    with pytest.raises(moe_comm.CommError, match=r"rank 0 of 2 failed in stage 'dispatch/flat/header' "
                                                  r"\(rank 1 did not arrive within 3s\)"):
        moe_comm.dispatch(torch.randn(4, 8, device="cuda"), torch.zeros(4, 1, dtype=torch.int64, device="cuda"),
                          None, buf)
    return time.monotonic() - start


def test_missing_peer_on_cuda_ends_in_timeout_naming_stage():
    waited, _ = run_distributed(2, _timeout_worker, timeout=120)
    assert waited < 10


def _bad_combine_worker(rank, world_size, mode):
    become_own_host(rank)
    buf = moe_comm.Buffer(num_experts=6, device="cuda", timeout=60, combine_status=mode)

    def good_inputs(r):
        return tuple(t.cuda() for t in _good(r, E=6))
    if mode == "immediate":
        return combine_one_bad_rank(rank, buf, 1, good_inputs)
    return combine_one_bad_rank_deferred(rank, buf, 1, good_inputs)


@pytest.mark.parametrize("mode", ["immediate", "deferred"])
def test_bad_combine_on_one_rank_on_cuda_makes_every_rank_raise(mode):
    assert run_distributed(3, _bad_combine_worker, mode, timeout=300) == [len(BAD_COMBINE_INPUTS)] * 3


def _peer_missing_from_combine_worker(rank, world_size, combine_status):
    become_own_host(rank)
    import time
    buf = moe_comm.Buffer(num_experts=2, device="cuda", timeout=3, combine_status=combine_status)
    x = torch.randn(4, 8, device="cuda")
    idx = torch.tensor([[0], [1], [0], [1]], device="cuda")
    recv_x, _, _, handle = moe_comm.dispatch(x, idx, None, buf)
    if rank == 1:
        time.sleep(12)  # never combines
        return None
    start = time.monotonic()
    if combine_status == "immediate":  # the status read back waits, bounded, naming the stage
        with pytest.raises(moe_comm.CommError, match=r"failed in stage 'combine/flat'"):
            moe_comm.combine(recv_x, handle)
        return time.monotonic() - start
    # No status exchange: the stuck NCCL exchange itself must end (the communicator's watchdog).
    moe_comm.combine(recv_x, handle)  # enqueued; nobody waits on the host
    torch.cuda.synchronize()  # drains once the watchdog aborts the stuck exchange
    drained = time.monotonic() - start
    with pytest.raises(moe_comm.CommError, match=r"failed in stage 'combine/flat'"):
        moe_comm.dispatch(x, idx, None, buf)
    return drained


@pytest.mark.parametrize("combine_status", ["immediate", "deferred", False])
def test_peer_missing_from_combine_ends_in_error_not_hang(combine_status):
    waited, _ = run_distributed(2, _peer_missing_from_combine_worker, combine_status, timeout=120)
    assert waited < 9


def _capacity_worker(rank, world_size, ranks_per_node):
    """Capacity, alignment and pad_to_capacity on CUDA: the same bytes as the CPU path."""
    become_own_host(rank)
    kwargs = [dict(capacity_factor=0.75), dict(capacity_factor=0.75, drop_policy="position", expert_alignment=8),
              dict(capacity_factor=1.0, pad_to_capacity=True, expert_alignment=4)]
    case = Case(world_size, 8, topk=3, hidden=40, pattern="skewed", tokens=(33, 0, 17, 9), seed=8)
    xs, idxs, ws = all_inputs(case)
    gpu = moe_comm.Buffer(num_experts=8, ranks_per_node=ranks_per_node, device="cuda", timeout=120,
                          max_tokens_per_rank=40)
    cpu = moe_comm.Buffer(num_experts=8, ranks_per_node=ranks_per_node, device="cpu", timeout=120,
                          max_tokens_per_rank=40)
    for kw in kwargs:
        on_cpu = moe_comm.dispatch(xs[rank], idxs[rank], ws[rank], cpu, **kw)
        on_gpu = moe_comm.dispatch(xs[rank].cuda(), idxs[rank].cuda(), ws[rank].cuda(), gpu, **kw)
        for c, g in zip(on_cpu[:3], on_gpu[:3]):
            assert torch.equal(c, g.cpu()), kw
        assert on_cpu[3].stats["pairs_dropped"] == on_gpu[3].stats["pairs_dropped"]
        y_cpu = moe_comm.combine(on_cpu[0] * 2, on_cpu[3], ws[rank])
        y_gpu = moe_comm.combine(on_gpu[0] * 2, on_gpu[3], ws[rank].cuda())
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    return len(kwargs)


@pytest.mark.parametrize("world_size,ranks_per_node", [(1, 1), (4, 2)])
def test_capacity_and_padding_on_cuda_match_the_cpu(world_size, ranks_per_node):
    assert run_distributed(world_size, _capacity_worker, ranks_per_node, timeout=600) == [3] * world_size
