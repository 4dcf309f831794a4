"""The Buffer's own gloo groups, made without `dist.new_group`.

`new_group` is collective over the default group (every rank of the job must enter every call
with the same rank list), and its `use_local_synchronization=True` names a group by a hash of
the ranks *and of how many groups this rank already holds*, which differs between ranks that
belong to different data-parallel or pipeline groups. Neither holds for the standard DP x EP
layout, where each rank builds Buffers only on its own EP group. So the Buffer connects its
groups itself: a gloo ProcessGroup over a key prefix of the default store that only the
members of the Buffer's group compute alike (their global ranks, how many Buffers they made
on that same rank list before, and the group's purpose). Building one needs the members of
that group and nobody else.

These groups are not registered with torch.distributed (nothing else can see or destroy
them): the Buffer owns them, and `Buffer.close()` (or the exit hook) releases them.
"""

import collections
import datetime
from typing import List

import torch
import torch.distributed as dist

# Buffers made so far on each rank list: members of one group number theirs alike as long as
# they construct the Buffers of that group in the same order.
_BUFFERS_PER_RANK_LIST = collections.Counter()


def buffer_key(global_ranks: List[int]) -> str:
    """A name for a new Buffer over these default-group ranks, the same on each member."""
    ranks = tuple(global_ranks)
    number = _BUFFERS_PER_RANK_LIST[ranks]
    _BUFFERS_PER_RANK_LIST[ranks] += 1
    return f"{'-'.join(map(str, ranks))}#{number}"


def default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API; without it no roll call and no own groups
        return None


_ROLL_STORE = (None, None)  # (the default store it was cloned from, the clone): swapped whole


def roll_call_store():
    """A client of the default store on its own connection, for the roll call (roll_call.py),
    so that an operation of it stuck on a dead network wedges that client only, never the
    default store torch itself and the engine's signing use. None without a default store, or
    where it cannot be cloned (no roll call then: a stuck operation on torch's own client could
    hang the engine). forget_roll_call_store() drops a wedged one (the next call connects anew)."""
    global _ROLL_STORE
    store = default_store()
    if store is None:
        return None
    source, clone = _ROLL_STORE
    if source is not store:
        try:
            clone = store.clone()
        except Exception:  # noqa: BLE001 - a store type without clone()
            clone = None
        _ROLL_STORE = (store, clone)
    return clone


def forget_roll_call_store() -> None:
    global _ROLL_STORE
    _ROLL_STORE = (None, None)


def connect_gloo_group(buffer_name: str, purpose: str, global_ranks: List[int], timeout_s: float):
    """-> a gloo ProcessGroup over `global_ranks` (this rank among them) whose collectives
    time out after `timeout_s`. Collective over those ranks only."""
    me = dist.get_rank()
    store = default_store()
    if store is None:
        raise RuntimeError("moe_comm.Buffer needs torch.distributed's default store to connect its groups")
    rank, size = global_ranks.index(me), len(global_ranks)
    prefix = dist.PrefixStore(f"moe_comm/group/{buffer_name}/{purpose}/", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        backend = dist.ProcessGroupGloo(prefix, rank, size, timeout)
    except (RuntimeError, dist.DistError) as exc:
        raise RuntimeError(
            f"moe_comm.Buffer: rank {me} could not connect its {purpose!r} group of ranks {global_ranks} "
            f"within {timeout_s:g}s: every rank of the Buffer's group must construct it (Buffers of one group "
            f"in the same order on each of its ranks): {exc}") from exc
    group = dist.ProcessGroup(prefix, rank, size)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
    return group


def broadcast_bytes(group, payload: bytes, size: int) -> bytes:
    """Group rank 0's `payload` (exactly `size` bytes there) on every rank of `group`."""
    data = torch.zeros(size, dtype=torch.uint8)
    if group.rank() == 0:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([data], options).wait()
    return bytes(data.tolist())
