#!/usr/bin/env bash
# GPU readiness check in one command: scripts/gpu_check.py (its docstring lists the steps) with the project's .venv.
#
#   bash scripts/gpu_check.sh                                  # CUDA -> runs/gpu_check/summary.txt, under 8 minutes
#   bash scripts/gpu_check.sh runs/gpu_check_h100              # another output folder (same as --out DIR)
#   bash scripts/gpu_check.sh --device cpu --quick --out /tmp/gpu_check_dry     # CPU dry run, SKIP for CUDA-only
#
# The interpreter is <repository>/.venv/bin/python (what `make venv` builds); PYTHON=/path/to/python overrides it.
# Every step has its own time limit and all share a 440 s budget (gpu_check.py STEPS, --budget); `timeout` below is
# only a last resort that keeps the whole command under 8 minutes (GPU_CHECK_TIMEOUT=seconds changes it, e.g. with a
# larger --budget). summary.txt is rewritten after each step.
# Exit status: 0 every check passed, 1 a check failed, 2 bad flags, 3 no CUDA device (one line, nothing run),
# 124 the last-resort timeout, 127 no interpreter.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "gpu_check.sh: no Python interpreter at $PY: run 'make venv' in $ROOT, or set PYTHON=/path/to/python" >&2
    exit 127
fi
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument without a dash is the output folder
    OUT="$1"
    shift
    set -- --out "$OUT" "$@"
fi
# --foreground: Ctrl-C still reaches the check, which stops its steps' processes itself.
exec timeout --foreground --kill-after=5 "${GPU_CHECK_TIMEOUT:-470}" "$PY" "$HERE/gpu_check.py" "$@"
