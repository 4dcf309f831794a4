#!/usr/bin/env bash
# Both GPU check commands in a row (a machine of your own; on a lent one run them as two calls).
#   bash tests/gpu/run_all.sh OUT_DIR [pytest arguments for tests/gpu]
dir=$(dirname "$0")
bash "$dir/run_build_and_tests.sh" "$@"
bash "$dir/run_benchmarks.sh" "${1:-gpu-results}"
