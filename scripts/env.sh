# Sourced by scripts/bench.sh and scripts/test.sh: makes a Python with everything moe_comm
# needs and builds moe_comm in place when its sources changed. Sets $PY.
#   MOE_COMM_PYTHON  use this interpreter as it is (it must have torch), no virtualenv
#   MOE_COMM_VENV    virtualenv folder (default: .venv in the repository)
#   MOE_COMM_TORCH   pip requirement for torch (default: torch==2.13.0)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { printf '[moe_comm setup] %s\n' "$*" >&2; }

nccl_wheel() {  # the NCCL wheel matching nvcc's CUDA major version
  local major=13
  if command -v nvcc > /dev/null 2>&1; then
    major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  fi
  [ "$major" -ge 13 ] 2>/dev/null && echo nvidia-nccl-cu13 || echo nvidia-nccl-cu12
}

if [ -n "${MOE_COMM_PYTHON:-}" ]; then
  PY=$MOE_COMM_PYTHON
else
  VENV=${MOE_COMM_VENV:-$ROOT/.venv}
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  PY=$VENV/bin/python
  if ! "$PY" -c "import torch, pytest, ninja, setuptools, wheel, nvidia.nccl, matplotlib, hypothesis" > /dev/null 2>&1; then
    log "installing ${MOE_COMM_TORCH:-torch==2.13.0}, $(nccl_wheel) and the build/test tools"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "${MOE_COMM_TORCH:-torch==2.13.0}" "$(nccl_wheel)" ninja pytest setuptools wheel numpy matplotlib hypothesis
  fi
fi

# Rebuild when anything the build reads changed (or the extension is missing).
stamp_file=$ROOT/build/.moe_comm_build_stamp
stamp=$( (cat setup.py; find csrc -type f | sort | xargs cat; "$PY" -c "import torch; print(torch.__version__)") | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! "$PY" -c "import moe_comm" > /dev/null 2>&1; then
  log "building moe_comm (pip install --no-build-isolation -e .)"
  mkdir -p "$ROOT/build"
  "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$ROOT/build/build.log" 2>&1 || { tail -n 60 "$ROOT/build/build.log"; exit 1; }
  grep "\[moe_comm build\]" "$ROOT/build/build.log" >&2 || true
  mkdir -p "$(dirname "$stamp_file")"
  echo "$stamp" > "$stamp_file"
fi
"$PY" -c "import moe_comm; print('[moe_comm setup] build_info:', moe_comm.build_info())" >&2
