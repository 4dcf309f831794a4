"""The wire. Per stage: one fixed-size header exchange, then variable-size row exchanges.

CPU/gloo: torch.distributed all_to_all_single with split sizes.
CUDA:     our NCCL communicator of the stage (csrc/comm, grouped ncclSend/ncclRecv). Rows move
          on the Buffer's communication stream, ordered with the caller's stream by events and
          never waited for on the host; the header is the one place that waits (bounded by the
          Buffer's timeout) because its counts size what follows.

Every collective runs inside `stage_errors(...)`, so a failure or a timeout names this rank,
the stage it was in and, from a roll call in the process group's store, the ranks that never
arrived.
"""

import contextlib
import datetime
from typing import List, Tuple

import torch
import torch.distributed as dist

from .roll_call import missing_ranks, posted_reason, sign_roll
from .stages import Stage


class CommError(RuntimeError):
    """A collective of moe_comm failed or timed out; the message names rank and stage."""


# A host collective still running after this long makes its rank sign the roll call as
# arrived, so a peer that arrived late but is stuck like everyone else is never named as
# missing. Quick collectives (the happy path) write nothing to the store.
SIGN_AFTER_S = 1.0


class _Collective:
    """One numbered collective of a stage: waits on its gloo work, signing the roll when slow."""

    def __init__(self, buffer, name: str):
        self.buffer, self.name = buffer, name
        self.seq = buffer.next_collective(name)

    def wait(self, work) -> None:
        first = datetime.timedelta(seconds=min(SIGN_AFTER_S, self.buffer.timeout / 4))
        try:
            work.wait(first)
            return
        except RuntimeError:
            if work.is_completed():  # it failed on its own: the second wait raises that error
                work.wait()
                return
        sign_roll(self.buffer, self.name, self.seq)
        work.wait()  # bounded by the group's timeout, the Buffer's


def comm_error(buffer, members: List[int], name: str, seq: int, exc: Exception) -> "CommError":
    """The error of collective `seq` of stage `name` that failed with `exc`: names this rank, the
    stage and, from the roll call, the members (Buffer-group ranks) that never arrived."""
    timeout = f"{buffer.timeout:g}s"
    missing = missing_ranks(buffer, members, name, seq)
    if missing:
        ranks = ", ".join(map(str, missing))
        who = f"rank{'s' if len(missing) > 1 else ''} {ranks} did not arrive within {timeout}"
        reasons = [(r, posted_reason(buffer, r)) for r in missing]
        who += "".join(f"; rank {r} reported: {why}" for r, why in reasons if why)
    elif missing == []:
        who = "every peer arrived; the collective itself failed"
    else:
        who = f"a peer may have died or not arrived within {timeout}"
    return CommError(f"moe_comm: rank {buffer.rank} of {buffer.world_size} failed in stage '{name}' "
                     f"({who}): {exc}")


@contextlib.contextmanager
def stage_errors(buffer, members: List[int], name: str):
    """members: the Buffer-group ranks taking part (for the roll call of a failure). Yields the
    collective, whose `wait(work)` waits for an async gloo work."""
    collective = _Collective(buffer, name)
    try:
        yield collective
    except (RuntimeError, dist.DistBackendError) as exc:
        if isinstance(exc, CommError):
            raise
        raise comm_error(buffer, members, name, collective.seq, exc) from exc


def _byte_ranges(rows: List[int], row_bytes: int) -> Tuple[List[int], List[int]]:
    sizes = [n * row_bytes for n in rows]
    offsets = [sum(sizes[:p]) for p in range(len(sizes))]
    return sizes, offsets


def _nccl_all_to_all(stage: Stage, send: torch.Tensor, send_rows: List[int], recv: torch.Tensor,
                     recv_rows: List[int], stream: int, name: str):
    """Row-major byte tensors [rows, row_bytes]; rows per peer, destination-major."""
    row_bytes = send.shape[1] if send.dim() == 2 else 1
    send_bytes, send_offsets = _byte_ranges(send_rows, row_bytes)
    recv_bytes, recv_offsets = _byte_ranges(recv_rows, row_bytes)
    stage.comm.all_to_all(send.reshape(-1), send_bytes, send_offsets, recv.reshape(-1), recv_bytes, recv_offsets,
                          stream, name)


def exchange_header(buffer, stage: Stage, header: torch.Tensor, name: str) -> torch.Tensor:
    """header: [stage.size, F] int64 on the Buffer's device, row d = what this rank tells
    destination d. -> [stage.size, F] on the same device, row s = what sender s told this rank.
    On CUDA it is only enqueued (on the caller's stream): headers_to_host waits once for all."""
    if stage.size == 1:
        return header.clone()
    received = torch.empty_like(header)
    with stage_errors(buffer, stage.global_ranks, name) as collective:
        if header.device.type == "cpu":
            collective.wait(dist.all_to_all_single(received, header, group=stage.group, async_op=True))
        else:
            rows = [1] * stage.size
            _nccl_all_to_all(stage, header.view(torch.uint8), rows, received.view(torch.uint8), rows,
                             torch.cuda.current_stream(header.device).cuda_stream, name)
    return received


def headers_to_host(buffer, headers: List[torch.Tensor], name: str) -> List[torch.Tensor]:
    """The headers of one dispatch on the host: on CUDA one copy and one wait, bounded by the
    Buffer's timeout through the communicators of its stages (the dispatch's one host
    synchronisation)."""
    if not headers or headers[0].device.type == "cpu":
        return headers
    device = headers[0].device
    flat = torch.cat([h.flatten() for h in headers])
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    stream = torch.cuda.current_stream(device)
    with stage_errors(buffer, list(range(buffer.world_size)), name):
        host.copy_(flat, non_blocking=True)
        comms = [stage.comm for stage in buffer.stages if stage.comm is not None]
        if comms:
            comms[-1].wait(stream.cuda_stream, name)
        else:
            stream.synchronize()
    out, offset = [], 0
    for h in headers:
        out.append(host[offset:offset + h.numel()].view(h.shape))
        offset += h.numel()
    return out


def exchange_rows(buffer, stage: Stage, send: torch.Tensor, send_splits: List[int], recv_splits: List[int],
                  name: str) -> torch.Tensor:
    """Packed uint8 rows [sum(send_splits), row_bytes] out, [sum(recv_splits), row_bytes] in,
    destination-major. What arrives lives in the Buffer's workspace for `name`: valid until
    that stage runs again (callers copy out before returning)."""
    if stage.size == 1:
        return send
    recv = buffer.workspace(name + "/recv", sum(recv_splits), send.shape[1])
    if send.device.type == "cpu":
        with stage_errors(buffer, stage.global_ranks, name) as collective:
            collective.wait(dist.all_to_all_single(recv, send, recv_splits, send_splits, group=stage.group,
                                                   async_op=True))
        return recv
    caller = torch.cuda.current_stream(send.device)
    comm_stream = buffer.comm_stream
    comm_stream.wait_stream(caller)  # the packed rows are ready
    with stage_errors(buffer, stage.global_ranks, name):
        _nccl_all_to_all(stage, send, send_splits, recv, recv_splits, comm_stream.cuda_stream, name)
    caller.wait_stream(comm_stream)  # what follows on the caller's stream sees the rows
    return recv
