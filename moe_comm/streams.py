"""Which CUDA stream our native ops run on: torch's current stream of the tensors' device, so
that they order with the caller's work exactly like torch's own ops."""

import torch


def stream_of(device: torch.device) -> int:
    """The cudaStream_t (as an int) of torch's current stream on `device`; 0 on the CPU."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
