#!/usr/bin/env bash
# GPU check, command 2 of 2 (<= 5 minutes; after run_build_and_tests.sh in the same tree): the
# kernel benchmark (vs a D2D copy), the dispatch/combine benchmark at DeepSeek-V3 shape and at
# the fixed-overhead shape of 1 token per rank (vs the torch-native path, world size 1), and
# the tiny example. JSON records land in OUT_DIR.
#   bash tests/gpu/run_benchmarks.sh OUT_DIR
# Without a GPU it is a dry run: every step runs on the CPU instead, so the commands are proven.
source "$(dirname "$0")/common.sh"
header "benchmarks"
RUN1=(python3 -m torch.distributed.run --standalone --nproc-per-node 1)
STEP_TIMEOUT=60 step kernels python3 bench/bench_kernels.py --iters 20 --json "$out/kernels.json"
STEP_TIMEOUT=90 step bench_deepseek "${RUN1[@]}" bench/bench_dispatch_combine.py --preset deepseek-v3 --tokens 1024 \
  --iters 20 --json "$out/bench_deepseek.json"
STEP_TIMEOUT=60 step bench_overhead "${RUN1[@]}" bench/bench_dispatch_combine.py --tokens 1 --hidden 128 --experts 16 \
  --topk 4 --iters 50 --json "$out/bench_overhead.json"
STEP_TIMEOUT=60 step example "${RUN1[@]}" examples/train_tiny_moe.py --steps 20
{ echo; echo '```'; cat "$out/kernels.log" "$out/bench_deepseek.log" "$out/bench_overhead.log"; echo '```'; } >> "$summary"
cat "$summary"
