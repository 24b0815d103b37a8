#!/usr/bin/env bash
# One GPU session of the suite (benchmarks/gpu_suite.py), phase by phase, each phase one device call that fits the
# 10-minute limit; benchmarks/GPU_SETUP.md gives the call-by-call sequence with the payload chunks.
#   bash benchmarks/gpu_session.sh start     call 1 (carry .gpu/c1): install what arrived, then start the CPU-side
#                                            steps (tree 100x300, tree1k 1000x300 links, convert) detached
#   bash benchmarks/gpu_session.sh measure   after the payload: model, ceilings, decode, e2e (100 classes) -> $OUT/measure
#   bash benchmarks/gpu_session.sh scale     e2e1k with DALI, the GPU tests, e2e1k with torch                -> $OUT/scale*
#   bash benchmarks/gpu_session.sh students  the student side at ImageNet-1K IPC 10's shape (10,000 synthetic 224 px
#                                            images, ResNet-18 -> ResNet-18, batch 100): 1 and 5 seeds, each beside
#                                            its model-only loop (benchmarks/train_bench.py)             -> $OUT/students
# Each phase ends by printing the figures against the targets (plot_gpu_suite --summary); the JSON comes back
# under $OUT. STUDENT_ARGS: more train_bench options (a CPU dry run: "--device cpu --classes 4 --ipc 2 --size 32
# --student conv3 --teacher conv3 --batch-size 4"). Environment: OUT (default /tmp/gpu-session-out), GPU_SUITE_WORK (default /tmp/gsw), PYTHON,
# E2E (the e2e loaders, default the four and tvjpeg-shards), BUDGET (seconds a phase may run, default 570), SUITE_ARGS (more
# gpu_suite.py options for every call, e.g. a dry run on a CPU machine: "--device cpu --classes 2 ...").
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?usage: gpu_session.sh start|measure|scale|students}
OUT=${OUT:-/tmp/gpu-session-out}
WORK=${GPU_SUITE_WORK:-/tmp/gsw}
CPU_SIDE=${GPU_SUITE_CPU_SIDE:-/tmp/gs-cpu}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-570}
ENV_FILE=${GPU_SITE:-/tmp/site}.env
read -r -a EXTRA <<<"${SUITE_ARGS:-}"
SUITE=(-m rded_fast.benchmarks.gpu_suite)
export PYTHONUNBUFFERED=1
started=$SECONDS
mkdir -p "$OUT"

left() { echo $((BUDGET - (SECONDS - started))); }

suite() {  # suite OUT_SUBDIR ARGS...: the suite, bounded by what is left of the phase's budget
    local dir=$1
    shift
    local t
    t=$(left)
    if ((t < 30)); then
        echo "gpu_session: no time left for $dir ($t s)"
        return 1
    fi
    timeout --signal=TERM "$t" "$PY" "${SUITE[@]}" "$OUT/$dir" --work "$WORK" "${EXTRA[@]}" "$@" 2>&1 | tee "$OUT/$dir.log" | grep -E '^(==|   )' | cut -c1-400
}

cpu_side_done() {  # the detached job's JSON has its three steps
    "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1]))["steps"]; sys.exit(0 if {"tree","tree1k","convert"} <= set(s) else 1)' \
        "$CPU_SIDE/gpu_suite.json" 2>/dev/null
}

case $phase in
start)
    bash benchmarks/gpu_setup.sh --check || echo "gpu_session: the payload check failed (above); steps that need it will say so"
    [[ -f $ENV_FILE ]] && source "$ENV_FILE"
    mkdir -p "$CPU_SIDE"
    setsid nohup "$PY" "${SUITE[@]}" "$CPU_SIDE" --steps tree,tree1k,convert --work "$WORK" "${EXTRA[@]}" >"$CPU_SIDE/log" 2>&1 </dev/null &
    echo "gpu_session: CPU-side steps started (pid $!); log $CPU_SIDE/log; 'measure' waits for them"
    ;;
measure)
    [[ -f $ENV_FILE ]] && source "$ENV_FILE"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/nvidia_smi.csv"
    until cpu_side_done; do
        if (($(left) < 300)); then
            echo "gpu_session: the CPU-side steps are not done; tail of $CPU_SIDE/log:"
            tail -5 "$CPU_SIDE/log"
            exit 1
        fi
        sleep 5
    done
    echo "gpu_session: CPU-side steps done after waiting $((SECONDS - started)) s"
    cp "$CPU_SIDE/gpu_suite.json" "$OUT/cpu_side.json"
    suite measure --steps model,ceilings,decode,e2e --e2e "${E2E:-dali-folder,dali-shards,ffcv-beton,torch-folder,tvjpeg-shards}"
    "$PY" -m rded_fast.benchmarks.plot_gpu_suite "$OUT/cpu_side.json" "$OUT/measure/gpu_suite.json" --summary
    ;;
scale)
    [[ -f $ENV_FILE ]] && source "$ENV_FILE"
    suite scale-dali --steps e2e1k --e2e1k dali-folder
    suite scale-tests --steps tests
    suite scale-torch --steps e2e1k --e2e1k torch-folder
    "$PY" -m rded_fast.benchmarks.plot_gpu_suite "$OUT"/scale-*/gpu_suite.json --summary
    ;;
students)
    mkdir -p "$OUT/students"
    read -r -a STUDENT_EXTRA <<<"${STUDENT_ARGS:-}"
    for seeds in 1 5; do
        t=$(left)
        ((t < 60)) && { echo "gpu_session: no time left for $seeds seed(s) ($t s)"; break; }
        timeout --signal=TERM "$t" "$PY" -m rded_fast.benchmarks.train_bench --student resnet18 --teacher resnet18 \
            --classes 1000 --ipc 10 --size 224 --factor 2 --batch-size 100 --epochs 2 --seeds "$seeds" --compile on \
            "${STUDENT_EXTRA[@]}" --json "$OUT/students/train_seeds$seeds.json" 2>&1 | tee "$OUT/students/seeds$seeds.log" | tail -2
    done
    ;;
*)
    echo "gpu_session: unknown phase '$phase'; use start, measure, scale or students" >&2
    exit 2
    ;;
esac
