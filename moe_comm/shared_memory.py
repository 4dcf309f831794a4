"""Whether a CPU Buffer's ranks can exchange rows through shared memory (csrc/cpu/shm_transport):
they can when every rank sees rank 0's /dev/shm (one host, one IPC namespace). Rank 0 makes a
probe segment holding a random token, every rank tries to read it back, and a MIN all-reduce
over the Buffer's gloo group makes the answer the same everywhere. The token then names the
Buffer's segments, so nothing collides with another job or a stale run."""

import os
import secrets
from typing import List, Optional

import _posixshmem  # CPython's shm_open/shm_unlink (what multiprocessing.shared_memory uses)
import torch
import torch.distributed as dist

from .groups import broadcast_bytes

TOKEN_BYTES = 16  # hex characters


def _probe_name(token: str) -> str:
    return f"/moe_comm_{token}_probe"


def shared_memory_token(group) -> Optional[str]:
    """Collective over `group` (a Buffer's gloo group of size > 1). -> the token, or None when
    some rank cannot see rank 0's shared memory."""
    rank = group.rank()
    token = secrets.token_hex(TOKEN_BYTES // 2) if rank == 0 else ""
    if rank == 0:
        fd = _posixshmem.shm_open(_probe_name(token), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.write(fd, token.encode())
        finally:
            os.close(fd)
    token = broadcast_bytes(group, token.encode(), TOKEN_BYTES).decode()
    seen = 1
    if rank != 0:
        try:
            fd = _posixshmem.shm_open(_probe_name(token), os.O_RDONLY, 0o600)
            try:
                seen = int(os.read(fd, TOKEN_BYTES).decode() == token)
            finally:
                os.close(fd)
        except OSError:
            seen = 0
    flag = torch.tensor([seen], dtype=torch.int64)
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.MIN
    group.allreduce([flag], options).wait()
    if rank == 0:
        _posixshmem.shm_unlink(_probe_name(token))
    return token if int(flag) == 1 else None


def network_namespaces(group) -> List[int]:
    """Collective over `group` (a Buffer's gloo group): every rank's network namespace (its inode
    in /proc), by group rank. Ranks in different ones are on different nodes, emulated ones
    included (bench/cluster.py), whatever memory they share."""
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
    except OSError:  # no /proc: one namespace as far as we can tell
        mine = 0
    spaces = [torch.zeros(1, dtype=torch.int64) for _ in range(group.size())]
    group.allgather([spaces], [torch.tensor([mine], dtype=torch.int64)]).wait()
    return [int(s) for s in spaces]
