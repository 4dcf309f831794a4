"""Our own NCCL communicator over a torch.distributed group (never torch's): rank 0 of the
group makes an ncclUniqueId, the group shares it over its existing backend, every rank joins.
Used by the CUDA path; every wait on it is bounded by `timeout_s`."""

import torch
import torch.distributed as dist

from ._native import C


def nccl_available() -> bool:
    return hasattr(C, "NcclCommunicator")


def create_nccl_communicator(group, device: torch.device, timeout_s: float):
    """Collective over `group`. -> C.NcclCommunicator for this rank on `device`."""
    if not nccl_available():
        raise RuntimeError("moe_comm was built without NCCL (pip install nvidia-nccl-cu13, then rebuild)")
    if device.type != "cuda":
        raise ValueError(f"device: the NCCL communicator needs a CUDA device, got {device}")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    box = [C.nccl_unique_id() if rank == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return C.NcclCommunicator(box[0], size, rank, index, float(timeout_s))
