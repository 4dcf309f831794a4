#!/usr/bin/env bash
# The main job: sets everything up (scripts/env.sh), then runs the dispatch/combine benchmark
# with torchrun: one process per GPU over NCCL when torch sees GPUs, else 4 processes over gloo
# on CPU (MOE_COMM_NPROC overrides the count). Extra arguments go to
# bench/bench_dispatch_combine.py, e.g. scripts/bench.sh --preset tiny --json out.json
# -h/--help prints the benchmark's help once, from one plain process (no torchrun).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
for arg in "$@"; do
  case "$arg" in
    -h|--help) exec "$PY" bench/bench_dispatch_combine.py --help ;;
  esac
done
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
default_nproc=4
[ "${gpus:-0}" -gt 0 ] && default_nproc=$gpus
# Recorded in the JSON records (run.wrapper_command): what the user typed, not torchrun's argv.
export MOE_COMM_BENCH_COMMAND="bash scripts/bench.sh${1+$(printf ' %q' "$@")}"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PY" -m torch.distributed.run --standalone \
  --nproc-per-node "${MOE_COMM_NPROC:-$default_nproc}" bench/bench_dispatch_combine.py "$@"
