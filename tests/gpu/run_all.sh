#!/usr/bin/env bash
# On a GPU machine: build moe_comm from source, run tests/gpu and the GPU benchmark, and write
# logs plus a summary to the folder given (default: ./gpu-results).
#   bash tests/gpu/run_all.sh OUT_DIR
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
cd "$(dirname "$0")/../.."
summary="$out/summary.md"
echo "# moe_comm GPU run $(date -u +%F' '%T) UTC" > "$summary"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$summary" 2>&1
step() {  # step NAME COMMAND...
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "| $name | rc=$rc | $(( $(date +%s) - start ))s | $(tail -n 1 "$out/$name.log") |" >> "$summary"
  return $rc
}
echo "| step | status | time | last line |" >> "$summary"
echo "|---|---|---|---|" >> "$summary"
step build env MOE_COMM_CUDA_ARCHS="${MOE_COMM_CUDA_ARCHS:-90}" pip install --no-build-isolation --no-deps -e .
step build_info python -c "import moe_comm; print(moe_comm.build_info())"
step gpu_tests python -m pytest -q tests/gpu
step bench torchrun --standalone --nproc-per-node 1 bench/bench_dispatch_combine.py --json "$out/bench.json"
cat "$summary"
