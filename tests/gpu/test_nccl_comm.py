"""Our NCCL communicator with several ranks on ONE GPU: each rank gets its own NCCL_HOSTID, so
NCCL treats it as a separate node and uses sockets (slow, but it runs our grouped send/recv)."""

import time

import pytest
import torch

from moe_comm.nccl_comm import create_nccl_communicator
from tests.distributed import run_distributed
from tests.gpu.one_gpu import become_own_host
from tests.gpu import marks

pytestmark = marks.NCCL_ONLY


def _exchange_worker(rank, world_size):
    become_own_host(rank)
    import torch.distributed as dist
    comm = create_nccl_communicator(dist.group.WORLD, torch.device("cuda", 0), timeout_s=60)
    # Rank r sends (r + 1) * (p + 1) bytes of value 10 * r + p to peer p; nothing to itself when r == 1.
    send_bytes = [0 if (rank == 1 and p == 1) else (rank + 1) * (p + 1) for p in range(world_size)]
    recv_bytes = [0 if (rank == 1 and s == 1) else (s + 1) * (rank + 1) for s in range(world_size)]
    send_off = [sum(send_bytes[:p]) for p in range(world_size)]
    recv_off = [sum(recv_bytes[:s]) for s in range(world_size)]
    send = torch.cat([torch.full((n,), 10 * rank + p, dtype=torch.uint8) for p, n in enumerate(send_bytes)]).cuda()
    recv = torch.full((sum(recv_bytes),), 255, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    comm.all_to_all(send, send_bytes, send_off, recv, recv_bytes, recv_off, stream, "test/rows")
    comm.wait(stream, "test/rows")
    expected = torch.cat([torch.full((n,), 10 * s + rank, dtype=torch.uint8) for s, n in enumerate(recv_bytes)])
    assert torch.equal(recv.cpu(), expected)
    return True


def test_grouped_send_recv_between_ranks_on_one_gpu():
    assert run_distributed(3, _exchange_worker, timeout=240) == [True] * 3


def _timeout_worker(rank, world_size):
    become_own_host(rank)
    import torch.distributed as dist
    comm = create_nccl_communicator(dist.group.WORLD, torch.device("cuda", 0), timeout_s=3)
    if rank == 1:
        time.sleep(10)  # never joins the exchange
        return "absent"
    buf = torch.zeros(16, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 of 2 failed in stage 'test/stuck'"):
        comm.all_to_all(buf, [0, 8], [0, 0], buf, [0, 8], [0, 8], stream, "test/stuck")
        comm.wait(stream, "test/stuck")
    return time.monotonic() - start


def test_missing_peer_ends_in_timeout_naming_rank_and_stage():
    waited, _ = run_distributed(2, _timeout_worker, timeout=120)
    assert waited < 9


def _watchdog_worker(rank, world_size):
    become_own_host(rank)
    import torch.distributed as dist
    comm = create_nccl_communicator(dist.group.WORLD, torch.device("cuda", 0), timeout_s=3)
    buf = torch.zeros(16, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    peer = 1 - rank
    sizes = [8 if p == peer else 0 for p in range(2)]
    comm.all_to_all(buf, sizes, [0, 0], buf, sizes, [8, 8], stream, "test/warm")  # connects the pair
    comm.wait(stream, "test/warm")
    if rank == 1:
        time.sleep(12)  # alive, but never joins the next exchange
        return "absent"
    start = time.monotonic()
    # Enqueued at once and never waited for on the host (as combine does): the watchdog must
    # abort it, so the caller's stream drains instead of hanging ...
    comm.all_to_all(buf, sizes, [0, 0], buf, sizes, [8, 8], stream, "test/unwatched")
    torch.cuda.synchronize()
    drained = time.monotonic() - start
    # ... and the next call raises why.
    with pytest.raises(RuntimeError, match=r"rank 0 of 2 failed in stage 'test/unwatched'.*not done within 3"):
        comm.all_to_all(buf, sizes, [0, 0], buf, sizes, [8, 8], stream, "test/next")
    return drained


def test_watchdog_ends_an_exchange_nobody_waits_for():
    drained, _ = run_distributed(2, _watchdog_worker, timeout=120)
    assert drained < 9
