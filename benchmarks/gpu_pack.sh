#!/usr/bin/env bash
# Build the offline payload that brings DALI (CUDA 13) and ffcv to the lent GPU machine.
#
# Why: that machine has Python 3.12, torch 2.11+cu130 and no package index, and each call to it carries
# at most 64 MiB of files. This script downloads/builds every wheel it lacks, copies the shared libraries
# ffcv's C extension links, splits big wheels into pieces and packs everything into chunk folders
# (<out>/c1, <out>/c2, ...) that are each small enough to carry in one call. benchmarks/gpu_setup.sh
# joins and installs them on the GPU machine. See benchmarks/GPU_SETUP.md.
#
# Usage (on the CPU machine, from the repository the device calls carry):
#   bash benchmarks/gpu_pack.sh [OUT_DIR]        # OUT_DIR defaults to <repo root>/.gpu (git-ignored)
# Environment: PY312 (a Python 3.12 to build ffcv with; default: pyenv's 3.12.x or python3.12),
#   PART_MIB (piece size, default 55), CHUNK_MIB (chunk limit, default 56).
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel)
OUT=${1:-$ROOT/.gpu}
PART_MIB=${PART_MIB:-55}
CHUNK_MIB=${CHUNK_MIB:-56}
if [[ -z "${PY312:-}" ]]; then
    PY312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | tail -1 || true)
    [[ -n "$PY312" ]] || PY312=$(command -v python3.12 || true)
fi
[[ -x "$PY312" ]] || { echo "gpu_pack: no Python 3.12 found; set PY312=/path/to/python3.12" >&2; exit 2; }

# Wheels pip can fetch ready-made for cp312 manylinux x86-64 (versions match the CPU machine's cuda120 set).
DALI_WHEELS=(
    nvidia-dali-cuda130==2.4.0
    nvidia-nvimgcodec-cu13==0.9.0.20      # DALI: nvidia-nvimgcodec-cu13[all]>=0.9,<0.10
    nvidia-libnvcomp-cu13==5.3.0.16       # DALI and nvimgcodec[all]
    nvidia-nvjpeg==13.0.4.44              # nvimgcodec[all]; CUDA 13.0 matches the machine's driver
    nvidia-nvjpeg2k-cu13==0.11.0.51       # nvimgcodec[all]
    nvidia-nvtiff-cu13==0.8.0.82          # nvimgcodec[all]
    astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
)
# six, packaging, numpy, wheel, pyyaml, typing-extensions are already on the GPU machine.
FFCV_WHEELS=(terminaltables==3.1.10 pytorch-pfn-extras==0.9.0)
FFCV_BUILD=(ffcv==1.0.2 fastargs==1.2.0 assertpy==1.1)   # sdists only: built here with Python 3.12
# Libraries every Linux with a C++ toolchain runtime has; everything else ffcv links is carried.
BASIC_LIBS='^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|libz)\.so'

mkdir -p "$OUT"
if git -C "$ROOT" check-ignore -q --no-index "$OUT/c1/x" 2>/dev/null; then :; elif [[ "$(realpath "$OUT")" == "$(realpath "$ROOT")"/* ]]; then
    echo "gpu_pack: $OUT is not git-ignored; run: echo /.gpu/ >> $(git -C "$ROOT" rev-parse --git-path info/exclude)" >&2
    exit 2
fi

WORK=$(mktemp -d /tmp/gpu_pack.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/whl" "$WORK/lib" "$WORK/stage"

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
echo "gpu_pack: downloading wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$WORK/whl" "${DALI_WHEELS[@]}" "${FFCV_WHEELS[@]}"
echo "gpu_pack: building ffcv wheels with $("$PY312" --version)"
"$PY312" -m pip wheel -q --no-deps -w "$WORK/whl" "${FFCV_BUILD[@]}"

echo "gpu_pack: collecting the shared libraries ffcv's extension links"
unzip -q -o "$WORK/whl"/ffcv-*.whl 'ffcv/_libffcv*.so' -d "$WORK/ffcv"
so=$(ls "$WORK"/ffcv/ffcv/_libffcv*.so)
if ldd "$so" | grep 'not found' >&2; then
    echo "gpu_pack: $so has unresolved libraries here; install libopencv-dev libturbojpeg0-dev first" >&2
    exit 2
fi
ldd "$so" | awk '$2 == "=>" {print $1, $3}' | while read -r soname path; do
    [[ "$soname" =~ $BASIC_LIBS ]] && continue
    cp -L "$path" "$WORK/lib/$soname"      # saved under its soname: the name the loader asks for
done

# Items to place, in carry order: ffcv first (usable after one chunk), then DALI's pieces.
# Each line: "<bytes> <path>"; a path is a file or the lib folder.
items=()
add() { items+=("$(du -sb "$1" | cut -f1) $1"); }
add "$WORK/lib"
part_bytes=$((PART_MIB * 1024 * 1024))
chunk_bytes=$((CHUNK_MIB * 1024 * 1024))
for w in $(ls -S -r "$WORK"/whl/*.whl); do    # smallest first
    name=$(basename "$w")
    if (($(stat -c %s "$w") > part_bytes)); then
        (cd "$WORK/stage" && split -b "$part_bytes" -d -a 2 "$w" "$name.part")
        n=$(ls "$WORK/stage/$name".part?? | wc -l)
        printf '%s  %s\nparts %s\n' "$(sha256sum "$w" | cut -d' ' -f1)" "$name" "$n" > "$WORK/stage/$name.sha256"
        for p in "$WORK/stage/$name".part??; do add "$p"; done
    else
        add "$w"
    fi
done
(cd "$WORK/whl" && ls *.whl) > "$WORK/EXPECTED"

# First-fit into chunks of at most CHUNK_MIB each.
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
sizes=()
for it in "${items[@]}"; do
    size=${it%% *}
    path=${it#* }
    placed=0
    for i in "${!sizes[@]}"; do
        if ((sizes[i] + size <= chunk_bytes)); then placed=1; break; fi
    done
    if ((placed == 0)); then i=${#sizes[@]}; sizes+=(0); fi
    sizes[i]=$((sizes[i] + size))
    dir="$OUT.tmp/c$((i + 1))"
    mkdir -p "$dir"
    cp -r "$path" "$dir/"
    case $path in *.part??) cp "${path%.part??}.sha256" "$dir/" ;; esac
done
for d in "$OUT.tmp"/c*; do cp "$WORK/EXPECTED" "$d/EXPECTED"; done
rm -rf "$OUT.old"
[[ -e "$OUT" ]] && mv "$OUT" "$OUT.old"
mv "$OUT.tmp" "$OUT"
rm -rf "$OUT.old"

echo "gpu_pack: payload in $OUT (carry the chunk folders in this order):"
for d in $(ls -d "$OUT"/c* | sort -V); do
    printf '  %-6s %6.1f MiB  %s\n' "$(basename "$d")" "$(du -sb "$d" | awk '{print $1 / 1048576}')" \
        "$(cd "$d" && ls -d -- * | grep -v -e '\.sha256$' -e '^EXPECTED$' | tr '\n' ' ')"
done
