"""run_distributed: runs a function on N gloo processes and returns every rank's result.

Rendezvous is a fresh file per run (no ports to collide). A rank's exception comes back with
its traceback; a rank that hangs or dies is reported by rank after `timeout` seconds.
"""

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from typing import Any, Callable, List, TypeVar

import pytest

R = TypeVar("R")


def _worker(fn, rank: int, world_size: int, init_file: str, results, args, kwargs) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=120))
        try:
            value = fn(rank, world_size, *args, **kwargs)
            results.put((rank, "ok", _packed(value)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        # Skips interpreter teardown, which takes torch seconds per process (test time, not
        # correctness: tests/test_exit.py runs real scripts to their normal exit).
        os._exit(0)


def _packed(value) -> bytes:
    """The result as bytes: a tensor put on a queue as it is travels as a file descriptor that
    this process serves until it exits, and it exits (os._exit) right after putting it."""
    import io

    import torch

    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()


def _unpacked(data: bytes):
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


class DistributedFailure(AssertionError):
    pass


def run_distributed(world_size: int, fn: Callable[..., R], *args: Any, timeout: float = 300,
                    **kwargs: Any) -> List[R]:
    """Runs fn(rank, world_size, *args, **kwargs) on world_size gloo ranks (spawned, so fn
    must be importable). -> results ordered by rank. Raises DistributedFailure with every
    failing rank's traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, init_file, results, args, kwargs),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        outcome = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        try:
            while len(outcome) < world_size:
                left = (deadline - datetime.datetime.now()).total_seconds()
                if left <= 0:
                    break
                try:
                    rank, status, value = results.get(timeout=min(left, 1.0))
                    outcome[rank] = (status, value)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcome]
                    if dead and all(not p.is_alive() for p in procs):
                        break
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    missing = [r for r in range(world_size) if r not in outcome]
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(outcome.items()) if s == "error"]
    if missing:
        errors.append(f"ranks {missing} returned nothing within {timeout}s (hung or died)")
    if errors:
        raise DistributedFailure(f"{fn.__name__} on {world_size} ranks failed:\n" + "\n".join(errors))
    return [_unpacked(outcome[r][1]) for r in range(world_size)]


def _shared_memory_works() -> bool:
    """Whether this machine gives processes POSIX shared memory (a container may not)."""
    import _posixshmem
    import secrets

    name = f"/moe_comm_test_{secrets.token_hex(4)}"
    try:
        fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.close(fd)
        _posixshmem.shm_unlink(name)
        return True
    except OSError:
        return False


# Cases that force Buffer(cpu_transport="shm"); "auto" falls back to gloo by itself.
requires_shared_memory = pytest.mark.skipif(not _shared_memory_works(), reason="no POSIX shared memory here")
SHM = pytest.param("shm", marks=requires_shared_memory)
