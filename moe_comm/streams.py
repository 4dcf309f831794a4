"""Which CUDA stream our native ops run on: torch's current stream of the tensors' device, so
that they order with the caller's work exactly like torch's own ops."""

import torch


def stream_of(device: torch.device) -> int:
    """The cudaStream_t (as an int) of torch's current stream on `device`; 0 on the CPU."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without a host synchronisation: a plain copy from
    pageable memory waits for the stream; from pinned memory it is queued like a kernel."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)
