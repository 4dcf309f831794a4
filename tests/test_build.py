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
    for name in ("NcclCommunicator", "nccl_unique_id"):
        assert hasattr(moe_comm.C, name), name


def test_nccl_communicator_fails_cleanly_without_a_gpu():
    """Where NCCL is built in: the unique id is 128 bytes, and joining a communicator on a
    machine without a usable GPU raises (no crash, no hang)."""
    from moe_comm.nccl_comm import nccl_available
    if not nccl_available() or torch.cuda.is_available():
        pytest.skip("needs a build with NCCL on a machine without a GPU")
    uid = moe_comm.C.nccl_unique_id()
    assert isinstance(uid, bytes) and len(uid) == 128
    with pytest.raises(RuntimeError, match="cuda"):
        moe_comm.C.NcclCommunicator(uid, 1, 0, 0, 2.0)
    with pytest.raises(RuntimeError, match="unique_id must be 128 bytes"):
        moe_comm.C.NcclCommunicator(b"short", 1, 0, 0, 2.0)
