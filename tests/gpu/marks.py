"""The marks of the GPU test files: `gpu`, and a skip with its reason where there is no CUDA
device, the build has no CUDA kernels or, for the exchanges, no NCCL."""

import pytest
import torch

import moe_comm
from moe_comm.nccl_comm import nccl_available

_DEVICE = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
_NCCL = pytest.mark.skipif(not nccl_available(), reason="built without NCCL")

KERNELS = _DEVICE + [pytest.mark.skipif(not moe_comm.build_info()["cuda"], reason="built without CUDA")]
EXCHANGES = KERNELS + [_NCCL]  # kernels and NCCL: dispatch and combine on the device
NCCL_ONLY = _DEVICE + [_NCCL]
