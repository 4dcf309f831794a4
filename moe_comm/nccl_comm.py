"""Our own NCCL communicator over a torch.distributed group (never torch's): rank 0 of the
group makes an ncclUniqueId, the group (one of the Buffer's gloo groups) shares it, every rank joins.
Used by the CUDA path; every wait on it is bounded by `timeout_s`."""

import torch

from ._native import C
from .groups import broadcast_bytes

NCCL_UNIQUE_ID_BYTES = 128  # sizeof(ncclUniqueId)


def nccl_available() -> bool:
    return hasattr(C, "NcclCommunicator")


def create_nccl_communicator(group, device: torch.device, timeout_s: float):
    """Collective over `group`. -> C.NcclCommunicator for this rank on `device`."""
    if not nccl_available():
        raise RuntimeError("moe_comm was built without NCCL (pip install nvidia-nccl-cu13, then rebuild)")
    if device.type != "cuda":
        raise ValueError(f"device: the NCCL communicator needs a CUDA device, got {device}")
    rank, size = group.rank(), group.size()
    unique_id = broadcast_bytes(group, C.nccl_unique_id() if rank == 0 else b"", NCCL_UNIQUE_ID_BYTES)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return C.NcclCommunicator(unique_id, size, rank, index, float(timeout_s))
