#!/usr/bin/env bash
# GPU check, command 1 of 2 (<= 5 minutes on a 16-core H200): build moe_comm from source, then
# tests/gpu with a bounded time per step, stopping at the first failure.
#   bash tests/gpu/run_build_and_tests.sh OUT_DIR [pytest arguments]
# On a machine without a GPU it is a dry run: it builds and the GPU tests skip.
source "$(dirname "$0")/common.sh"
shift || true
header "build + tests/gpu"
STEP_TIMEOUT=150 step build env MOE_COMM_CUDA_ARCHS="${MOE_COMM_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install --no-build-isolation --no-deps -e .
step build_info python3 -c "import moe_comm; print(moe_comm.build_info())"
STEP_TIMEOUT=${MOE_COMM_TEST_TIMEOUT:-150} step gpu_tests python3 -m pytest -x -q tests/gpu "$@"
cat "$summary"
