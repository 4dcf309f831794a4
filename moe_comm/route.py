"""One dispatch's path through the stages, and the moves that reuse it.

StagePlan: where each input row of a stage goes (C.plan_send over the stage's destinations).
The input of stage 0 is this rank's tokens; the input of stage j > 0 is what stage j - 1
delivered, in arrival order.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch

from ._native import C
from .stages import Stage
from .streams import stream_of
from .transport import exchange_rows

SLOT_META_BYTES = 8   # core/row_format.h SlotMeta: int32 local expert + float32 weight
SCALAR_BYTES = 4      # one float32 per slot on the return wire


def row_format(hidden: int, dtype: torch.dtype, topk: int, meta_bytes_per_slot: int):
    """-> (payload_bytes, meta_offset, meta_bytes, row_bytes), computed in csrc/core."""
    return C.row_format(hidden, dtype.itemsize, topk, meta_bytes_per_slot)


def payload(rows: torch.Tensor, dtype: torch.dtype, hidden: int) -> torch.Tensor:
    """The [N, hidden] dtype view of packed uint8 rows."""
    return rows.view(dtype)[:, :hidden]


def scalars(rows: torch.Tensor, meta_offset: int, topk: int) -> torch.Tensor:
    """The [N, topk] float32 view of the scalar block of packed uint8 rows."""
    start = meta_offset // SCALAR_BYTES
    return rows.view(torch.float32)[:, start:start + topk]


def slot_meta(rows: torch.Tensor, meta_offset: int, topk: int):
    """The SlotMeta block of dispatch rows -> (expert ids [N, K] int64, weights [N, K] float32)."""
    meta = rows[:, meta_offset:meta_offset + topk * SLOT_META_BYTES].contiguous().view(torch.int32)
    meta = meta.view(rows.shape[0], topk, 2)  # explicit rows: with topk = 0, -1 is ambiguous
    return meta[:, :, 0].to(torch.int64), meta[:, :, 1].contiguous().view(torch.float32)


def gather_masked(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[index] with 0 where index < 0."""
    if values.shape[0] == 0:
        return torch.zeros(index.shape, dtype=values.dtype, device=index.device)
    return values[index.clamp(min=0)].masked_fill(index < 0, 0.0)


def collect_pairs(per_slot: torch.Tensor, pair_slot: torch.Tensor) -> torch.Tensor:
    """[n_send, K] per send slot -> [n_in, K]: out[i, k] = per_slot[pair_slot[i, k], k], 0 if masked."""
    if per_slot.shape[0] == 0:
        return torch.zeros(pair_slot.shape, dtype=torch.float32, device=pair_slot.device)
    k = torch.arange(pair_slot.shape[1], device=pair_slot.device).expand_as(pair_slot)
    return per_slot[pair_slot.clamp(min=0), k].masked_fill(pair_slot < 0, 0.0)


@dataclass
class StagePlan:
    stage: Stage
    send_token: torch.Tensor   # [n_send] input row of each send slot, destination-major
    send_offsets: torch.Tensor  # [size + 1]
    pair_slot: torch.Tensor    # [n_in, K] send slot of (input row, k); -1 masked
    first_slot: torch.Tensor   # [n_in, K] the same, on each destination's first slot only
    pairs_per_expert: torch.Tensor  # [stage.num_experts] valid (row, expert) pairs
    rows_per_dest: torch.Tensor     # [size] rows sent to each destination
    send_splits: Optional[List[int]] = None  # known on the host after the stage's header exchange
    recv_splits: Optional[List[int]] = None

    @property
    def num_recv(self) -> int:
        return sum(self.recv_splits)

    def set_splits(self, send_splits: List[int], recv_splits: List[int]):
        """From the header exchange. On CUDA send_token was sized for every (row, destination)
        pair so that planning needed no host round trip: keep the slots in use."""
        if self.rows_per_dest.device.type == "cpu" and self.rows_per_dest.tolist() != send_splits:
            # What the headers announced must be what the plan sends (free to check on the CPU).
            raise RuntimeError(f"moe_comm: stage '{self.stage.name}' announced {send_splits} rows per "
                               f"destination but its plan sends {self.rows_per_dest.tolist()}")
        self.send_splits, self.recv_splits = send_splits, recv_splits
        self.send_token = self.send_token[:sum(send_splits)]


def plan_stage(stage: Stage, topk_idx: torch.Tensor) -> StagePlan:
    rows_per_dest, pairs, offsets, send_token, pair_slot, first_slot = C.plan_send(
        topk_idx, stage.num_experts, stage.size, stream_of(topk_idx.device))
    return StagePlan(stage, send_token, offsets, pair_slot, first_slot, pairs, rows_per_dest)


def through_own_slot(plan: StagePlan, row_map: torch.Tensor, weights: Optional[torch.Tensor]):
    """A stage with one destination sends each input row to one slot at most (the row's only
    first slot): re-index the [n_slots, K] map and weights of its slots by input row, -1 / 0
    where a row sent nothing."""
    slot = plan.first_slot.max(dim=1).values  # [n_in]
    sent = (slot >= 0).unsqueeze(1)
    if row_map.shape[0] == 0:
        composed = torch.full((slot.shape[0], row_map.shape[1]), -1, dtype=row_map.dtype, device=row_map.device)
        return composed, (None if weights is None else torch.zeros(composed.shape, device=composed.device))
    index = slot.clamp(min=0)
    composed = row_map[index].masked_fill(~sent, -1)
    if weights is not None:
        weights = weights[index].masked_fill(~sent, 0.0)
    return composed, weights


def source_order(counts: torch.Tensor, source_rank: torch.Tensor) -> Optional[torch.Tensor]:
    """Arrival order is (sender, block); the API wants source-rank order. counts and source_rank
    are [senders, blocks]. -> permutation of arrival rows, or None when already in order."""
    flat_counts, flat_source = counts.flatten(), source_rank.flatten()
    order = torch.argsort(flat_source, stable=True)
    if torch.equal(order, torch.arange(order.numel())):
        return None
    starts = flat_counts.cumsum(0) - flat_counts
    picked_counts, picked_starts = flat_counts[order], starts[order]
    total = int(flat_counts.sum())
    shift = picked_starts - (picked_counts.cumsum(0) - picked_counts)
    return torch.repeat_interleave(shift, picked_counts) + torch.arange(total)


def send_along(buffer, plans: List[StagePlan], rows: torch.Tensor, name: str) -> torch.Tensor:
    """Sends each input row [T, H'] along the dispatch's cached path, no metadata.
    -> [n_last, H'] view in the final stage's arrival order."""
    dtype, width = rows.dtype, rows.shape[1]
    row_bytes = row_format(width, dtype, 0, 0)[3]
    for plan in plans:
        stage_name = f"{name}/{plan.stage.name}"
        send = buffer.workspace(stage_name + "/send", len(plan.send_token), row_bytes)
        C.pack_rows(rows, plan.send_token, plan.send_offsets, None, None, 1, send, stream_of(send.device))
        rows = payload(exchange_rows(buffer, plan.stage, send, plan.send_splits, plan.recv_splits, stage_name),
                       dtype, width)
    return rows


def reduce_back(buffer, plans: List[StagePlan], num_tokens: int, rows: torch.Tensor, row_map: torch.Tensor,
                weights: Optional[torch.Tensor], slot_scalars: Optional[torch.Tensor], name: str,
                before_wire=None):
    """The reverse path. At the final receiver: partial[i] = sum_k weights[i, k] * rows[row_map[i, k]]
    (float32); every forwarding rank sums the partials of each row it forwarded; the source sums
    one partial per destination of each token. Per-slot scalars [n_last, K] ride along and come
    back per (token, k).
    before_wire: called once before the first exchange (combine's status check: what comes
    before it is local work that hides the status exchange's latency).
    -> (y [num_tokens, H] in rows' dtype, scalars [num_tokens, K] or None)"""
    dtype, hidden = rows.dtype, rows.shape[1]
    topk = row_map.shape[1]
    _, meta_offset, _, row_bytes = row_format(hidden, dtype, topk if slot_scalars is not None else 0, SCALAR_BYTES)
    src, src_map, src_weights = rows, row_map, weights
    for plan in reversed(plans):
        if plan.stage.size == 1:
            # No wire (world size 1, or one rank per node): compose the maps instead of
            # materialising partials that would only be summed once more.
            src_map, src_weights = through_own_slot(plan, src_map, src_weights)
            if slot_scalars is not None:
                slot_scalars = collect_pairs(slot_scalars, plan.pair_slot)
            continue
        stage_name = f"{name}/{plan.stage.name}"
        packed = buffer.workspace(stage_name + "/send", plan.num_recv, row_bytes)
        C.reduce_rows(src, src_map, src_weights, payload(packed, dtype, hidden), stream_of(packed.device))
        if slot_scalars is not None:
            scalars(packed, meta_offset, topk).copy_(slot_scalars)
        if before_wire is not None:
            before_wire()
            before_wire = None
        back = exchange_rows(buffer, plan.stage, packed, plan.recv_splits, plan.send_splits, stage_name)
        src, src_map, src_weights = payload(back, dtype, hidden), plan.first_slot, None
        if slot_scalars is not None:
            slot_scalars = collect_pairs(scalars(back, meta_offset, topk), plan.pair_slot)
    if before_wire is not None:  # no stage had a wire
        before_wire()
    y = torch.empty((num_tokens, hidden), dtype=dtype, device=rows.device)
    C.reduce_rows(src, src_map, src_weights, y, stream_of(y.device))
    return y, slot_scalars
