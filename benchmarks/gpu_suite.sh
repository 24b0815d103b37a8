#!/usr/bin/env bash
# The GPU suite in one command (see benchmarks/gpu_suite.py for what it measures).
#   bash benchmarks/gpu_suite.sh OUT_DIR [gpu_suite.py options, e.g. --classes 10 --per-class 30]
# On a machine without a package index, first bring DALI and ffcv as described in benchmarks/GPU_SETUP.md;
# this script installs whatever of that payload is present under .gpu/ (benchmarks/gpu_setup.sh) and uses it.
# Without CUDA it runs only the CPU-side parts (tree generation, conversion).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: gpu_suite.sh OUT_DIR [options]}"
shift
mkdir -p "$out"
if [ -d .gpu ]; then
    if bash benchmarks/gpu_setup.sh; then
        source "${GPU_SITE:-/tmp/site}.env"
    else
        echo "warning: the .gpu payload did not install; the DALI/ffcv steps will say so"
    fi
fi
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv > "$out/nvidia_smi.csv"
time "$PY" -m rded_fast.benchmarks.gpu_suite "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
