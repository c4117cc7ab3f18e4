#!/usr/bin/env bash
# Every GPU-only check in one go, ending with one table (see bench/gpu_check.py for what runs).
#   bench/gpu_check.sh          # one CUDA GPU (estimated 6 minutes, not yet timed); log in bench/gpu_check.log
#   bench/gpu_check.sh --cpu    # the same code paths at toy sizes on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
exec "$PYTHON" bench/gpu_check.py "$@"
