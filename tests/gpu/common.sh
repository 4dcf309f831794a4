# Sourced by the GPU scripts: one bounded step at a time, logs and a summary under $out.
# Uses python3 and `python3 -m pip` only (the lent GPU machine has no other guaranteed
# interpreter and no internet), and records NCCL warnings per process.
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
summary="$out/summary.md"
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_DEBUG_FILE=${NCCL_DEBUG_FILE:-$out/nccl.%h.%p.log}
STEP_TIMEOUT=${MOE_COMM_STEP_TIMEOUT:-240}
step() {  # step NAME COMMAND...: bounded by STEP_TIMEOUT, never stops the script
  local name=$1; shift
  local start=$(date +%s)
  timeout --kill-after=10 "$STEP_TIMEOUT" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "| $name | rc=$rc | $(( $(date +%s) - start ))s | $(tail -n 1 "$out/$name.log") |" >> "$summary"
  return $rc
}
header() {
  echo "# moe_comm GPU run: $1, $(date -u +%F' '%T) UTC" >> "$summary"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv,noheader >> "$summary" 2>/dev/null \
    || echo "(no nvidia-smi: a dry run)" >> "$summary"
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
  echo "| step | status | time | last line |" >> "$summary"
  echo "|---|---|---|---|" >> "$summary"
}
