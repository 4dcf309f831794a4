#!/usr/bin/env bash
# The main job: sets everything up (scripts/env.sh), then runs the dispatch/combine benchmark
# with torchrun on MOE_COMM_NPROC processes (default 4) over gloo on CPU. Extra arguments go
# to bench/bench_dispatch_combine.py, e.g. scripts/bench.sh --preset tiny --json out.json
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PY" -m torch.distributed.run --standalone \
  --nproc-per-node "${MOE_COMM_NPROC:-4}" bench/bench_dispatch_combine.py "$@"
