#!/usr/bin/env bash
# The test suite: sets everything up (scripts/env.sh), runs the C++ core tests (ctest) and
# pytest. Extra arguments go to pytest, e.g. scripts/test.sh -k gradients
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if command -v nvcc > /dev/null 2>&1 && [ "${MOE_COMM_WITH_CUDA:-1}" != 0 ]; then
  export MOE_COMM_EXPECT_CUDA=1  # device code must then be compiled in
fi
if command -v cmake > /dev/null 2>&1; then
  cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
  cmake --build build/cmake -j "$(nproc)" >> build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
  ctest --test-dir build/cmake --output-on-failure
else
  echo "[moe_comm test] cmake not found: skipping the C++ core tests" >&2
fi
exec "$PY" -m pytest -q "$@" tests
