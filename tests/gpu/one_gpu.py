"""Several ranks on ONE GPU: each rank claims its own NCCL_HOSTID, so NCCL treats it as a
separate node and connects the ranks over sockets (slow, but it runs our grouped send/recv).
Loopback and no InfiniBand, so the test machine needs no network of its own (a variable the
caller already set wins)."""

import os

import torch


def become_own_host(rank: int) -> None:
    """Call first thing in a test worker, before any NCCL communicator exists."""
    os.environ["NCCL_HOSTID"] = f"moe-comm-test-host-{rank}"
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_IB_DISABLE", "1")
    torch.cuda.set_device(0)
