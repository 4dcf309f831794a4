#!/usr/bin/env bash
# On a GPU machine: build moe_comm from source, run tests/gpu, the kernel benchmark (vs a D2D
# copy) and the dispatch/combine benchmark (vs the torch-native path, world size 1), and write
# logs plus a summary to the folder given (default: ./gpu-results).
#   bash tests/gpu/run_all.sh OUT_DIR [pytest arguments for tests/gpu, e.g. -k kernel]
# Each step is bounded (MOE_COMM_STEP_TIMEOUT seconds, default 900); a failing step does not
# stop the others.
set -uo pipefail
out=${1:-gpu-results}
shift || true
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.."
summary="$out/summary.md"
echo "# moe_comm GPU run $(date -u +%F' '%T) UTC" > "$summary"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$summary" 2>&1
step() {  # step NAME COMMAND...
  local name=$1; shift
  local start=$(date +%s)
  timeout "${MOE_COMM_STEP_TIMEOUT:-900}" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "| $name | rc=$rc | $(( $(date +%s) - start ))s | $(tail -n 1 "$out/$name.log") |" >> "$summary"
  return $rc
}
echo "| step | status | time | last line |" >> "$summary"
echo "|---|---|---|---|" >> "$summary"
step build env MOE_COMM_CUDA_ARCHS="${MOE_COMM_CUDA_ARCHS:-90}" pip install --no-build-isolation --no-deps -e .
step build_info python -c "import moe_comm; print(moe_comm.build_info())"
step gpu_tests python -m pytest -q tests/gpu "$@"
step kernels python bench/bench_kernels.py --json "$out/kernels.json"
step bench_deepseek torchrun --standalone --nproc-per-node 1 bench/bench_dispatch_combine.py --preset deepseek-v3 \
  --json "$out/bench_deepseek.json"
step example torchrun --standalone --nproc-per-node 1 examples/train_tiny_moe.py --steps 30
step bench_tiny torchrun --standalone --nproc-per-node 1 bench/bench_dispatch_combine.py --json "$out/bench_tiny.json"
{ echo; echo '```'; cat "$out/kernels.log" "$out/bench_deepseek.log"; echo '```'; } >> "$summary"
cat "$summary"
