"""The wire on CPU/gloo: per stage, one fixed-size header exchange, then variable-size row
exchanges (torch.distributed all_to_all_single with split sizes).

Every collective runs inside `stage_errors(...)`, so a failure or a timeout names this rank and
the stage it was in.
"""

import contextlib
from typing import List

import torch
import torch.distributed as dist

from .stages import Stage


class CommError(RuntimeError):
    """A collective of moe_comm failed or timed out; the message names rank and stage."""


@contextlib.contextmanager
def stage_errors(buffer, name: str):
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as exc:
        if isinstance(exc, CommError):
            raise
        timeout = f"{buffer.timeout}s" if buffer.timeout else "the group's timeout"
        raise CommError(f"moe_comm: rank {buffer.rank} of {buffer.world_size} failed in stage "
                        f"'{name}' (a peer may have died or not arrived within {timeout}): {exc}") from exc


def exchange_header(buffer, stage: Stage, header: torch.Tensor, name: str) -> torch.Tensor:
    """header: [stage.size, F] int64, row d = what this rank tells destination d.
    -> [stage.size, F], row s = what sender s told this rank."""
    if stage.size == 1:
        return header.clone()
    received = torch.empty_like(header)
    with stage_errors(buffer, name):
        dist.all_to_all_single(received, header, group=stage.group)
    return received


def exchange_rows(buffer, stage: Stage, send: torch.Tensor, send_splits: List[int], recv_splits: List[int],
                  name: str) -> torch.Tensor:
    """Packed uint8 rows [sum(send_splits), row_bytes] out, [sum(recv_splits), row_bytes] in,
    destination-major. What arrives lives in the Buffer's workspace for `name`: valid until
    that stage runs again (callers copy out before returning)."""
    if stage.size == 1:
        return send
    recv = buffer.workspace(name + "/recv", sum(recv_splits), send.shape[1])
    with stage_errors(buffer, name):
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=stage.group)
    return recv
