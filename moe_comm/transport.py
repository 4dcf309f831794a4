"""The wire on CPU/gloo: one fixed-size header exchange, then variable-size row exchanges.

Every collective runs inside `stage(...)`, so a failure or a timeout names this rank and the
stage it was in.
"""

import contextlib
from typing import List

import torch
import torch.distributed as dist

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# One header row per peer: what this rank sends that peer, and how it sees the call.
HEADER_FIELDS = ("count", "hidden", "dtype", "topk", "num_experts", "status")
H = {name: i for i, name in enumerate(HEADER_FIELDS)}


class CommError(RuntimeError):
    """A collective of moe_comm failed or timed out; the message names rank and stage."""


@contextlib.contextmanager
def stage(buffer, name: str):
    try:
        yield
    except (RuntimeError, dist.DistBackendError) as exc:
        if isinstance(exc, CommError):
            raise
        timeout = f"{buffer.timeout}s" if buffer.timeout else "the group's timeout"
        raise CommError(f"moe_comm: rank {buffer.rank} of {buffer.world_size} failed in stage "
                        f"'{name}' (a peer may have died or not arrived within {timeout}): {exc}") from exc


def exchange_header(buffer, header: torch.Tensor, stage_name: str) -> torch.Tensor:
    """header: [W, len(HEADER_FIELDS)] int64, row d = what this rank tells rank d.
    -> [W, len(HEADER_FIELDS)], row s = what rank s told this rank."""
    if buffer.world_size == 1:
        return header.clone()
    received = torch.empty_like(header)
    with stage(buffer, stage_name):
        dist.all_to_all_single(received, header, group=buffer.group)
    return received


def exchange_rows(buffer, send: torch.Tensor, send_splits: List[int], recv_splits: List[int],
                  stage_name: str) -> torch.Tensor:
    """Rows [sum(send_splits), ...] out, rows [sum(recv_splits), ...] in, rank-major. Packed
    uint8 rows land in the Buffer's workspace for this stage (valid until the stage runs again)."""
    if buffer.world_size == 1:
        return send
    shape = (sum(recv_splits),) + tuple(send.shape[1:])
    if send.dtype == torch.uint8 and send.dim() == 2:
        recv = buffer.workspace(stage_name + "/recv", shape[0], shape[1])
    else:
        recv = send.new_empty(shape)
    with stage(buffer, stage_name):
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=buffer.group)
    return recv
