"""The installed extension reports what it was built with."""

import os

import pytest
import torch

import moe_comm


def test_build_info_fields():
    info = moe_comm.build_info()
    assert set(info) >= {"cuda", "cuda_archs", "nccl", "torch"}
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_archs"], list)
    if info["cuda"]:
        assert info["cuda_archs"] and all(a.startswith("sm_") for a in info["cuda_archs"])
    if info["nccl"] is not None:
        assert info["nccl"].count(".") == 2 and info["nccl"].startswith("2.")


def test_ci_builds_device_code():
    """CI (and scripts/test.sh where nvcc exists) sets MOE_COMM_EXPECT_CUDA=1: the CUDA kernels
    and NCCL must then be compiled in, GPU or not."""
    if os.environ.get("MOE_COMM_EXPECT_CUDA") != "1":
        pytest.skip("MOE_COMM_EXPECT_CUDA is not 1 (no nvcc expected here)")
    info = moe_comm.build_info()
    assert info["cuda"], info
    assert info["nccl"], info
