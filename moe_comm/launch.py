"""init_distributed: the process group a torchrun-launched script wants, by device."""

import os

import torch
import torch.distributed as dist


def init_distributed(device: str = "auto") -> torch.device:
    """Joins torchrun's rendezvous. "cuda" (or "auto" where torch sees a GPU): GPU LOCAL_RANK
    becomes the current device and the group is NCCL; "cpu": gloo. -> the device to put
    tensors on (a Buffer on this group picks the same one)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
