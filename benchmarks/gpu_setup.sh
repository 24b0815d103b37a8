#!/usr/bin/env bash
# Install the carried DALI/ffcv payload (.gpu/c*/, made by benchmarks/gpu_pack.sh) on the GPU machine.
#
# Why: that machine has no package index; the wheels arrive one chunk folder per call. Run this after
# each chunk arrives: it joins the pieces of every wheel whose pieces are all present (checking its
# sha256), installs all complete wheels into $GPU_SITE (default /tmp/site) when that set changed, and
# writes the environment to $GPU_SITE.env. Running it again with nothing new changes nothing.
#
# Usage, from the repository root:  bash benchmarks/gpu_setup.sh [--check] && source /tmp/site.env
#   --check: afterwards try DALI and ffcv (those installed) with that environment: see step 6.
# Environment: GPU_PAYLOAD (default .gpu, kept in GPU_KEEP, default /tmp/rded-gpu-payload), GPU_SITE
#   (default /tmp/site), PYTHON (default python3),
#   GPU_ALL_LIBS=1 (expose every carried library, not only those the system lacks).
set -euo pipefail

CHECK=0
case "${1:-}" in
    --check) CHECK=1 ;;
    "") ;;
    *) echo "gpu_setup: unknown argument '$1'; the only option is --check" >&2; exit 2 ;;
esac
PAYLOAD=${GPU_PAYLOAD:-.gpu}
# The device machine re-copies the repository at every call, and a carried folder is gone from it at the
# next call that does not carry it (seen on the H100, 2026-11-24). So every chunk that arrives is copied
# to a folder outside the repository first, and the payload is read from there.
KEEP=${GPU_KEEP:-/tmp/rded-gpu-payload}
if [[ "$PAYLOAD" == ".gpu" ]] && compgen -G ".gpu/c*/" >/dev/null; then
    mkdir -p "$KEEP"
    cp -r .gpu/c*/ "$KEEP"/
fi
[[ "$PAYLOAD" == ".gpu" ]] && [[ -d "$KEEP" ]] && PAYLOAD=$KEEP
SITE=${GPU_SITE:-/tmp/site}
PY=${PYTHON:-python3}
JOINED=$SITE.joined          # joined big wheels live outside the repository
STAMP=$SITE/.gpu_setup_installed
ENVFILE=$SITE.env

shopt -s nullglob
chunks=("$PAYLOAD"/c*/)
((${#chunks[@]})) || { echo "gpu_setup: no chunk folders under $PAYLOAD/ (carry .gpu/c1 first)" >&2; exit 2; }
mkdir -p "$JOINED"

# 1. Join split wheels whose pieces are all here (each chunk with a piece holds the same sidecar).
declare -A seen=()
for sidecar in "$PAYLOAD"/c*/*.whl.sha256; do
    name=$(basename "$sidecar" .sha256)
    [[ -z "${seen[$name]:-}" ]] || continue
    seen[$name]=1
    want=$(awk 'NR == 1 {print $1}' "$sidecar")
    n=$(awk '$1 == "parts" {print $2}' "$sidecar")
    if [[ -f "$JOINED/$name" ]] && [[ "$(sha256sum "$JOINED/$name" | cut -d' ' -f1)" == "$want" ]]; then
        continue
    fi
    parts=()
    for ((i = 0; i < n; i++)); do
        found=("$PAYLOAD"/c*/"$(printf '%s.part%02d' "$name" "$i")")
        ((${#found[@]})) && parts+=("${found[0]}")
    done
    if ((${#parts[@]} < n)); then
        echo "gpu_setup: $name: ${#parts[@]}/$n pieces here, waiting for the rest"
        continue
    fi
    cat "${parts[@]}" > "$JOINED/$name.tmp"
    if [[ "$(sha256sum "$JOINED/$name.tmp" | cut -d' ' -f1)" != "$want" ]]; then
        rm -f "$JOINED/$name.tmp"
        echo "gpu_setup: $name: joined pieces do not match its sha256; carry its chunks again" >&2
        exit 1
    fi
    mv "$JOINED/$name.tmp" "$JOINED/$name"
    echo "gpu_setup: joined $name from $n pieces"
done

# 2. The complete wheels (one per file name) and the carried libraries.
declare -A wheel_of=()
for w in "$PAYLOAD"/c*/*.whl "$JOINED"/*.whl; do
    wheel_of[$(basename "$w")]=$w
done
declare -A lib_of=()
for l in "$PAYLOAD"/c*/lib/*; do
    lib_of[$(basename "$l")]=$l
done
expected=("$PAYLOAD"/c*/EXPECTED)
wanted=$( ((${#expected[@]})) && sort -u "${expected[@]}" || true)
missing=$(comm -23 <(echo "$wanted") <(printf '%s\n' "${!wheel_of[@]}" | sort) | grep . || true)
signature=$(printf '%s\n' "${!wheel_of[@]}" "${!lib_of[@]}" "GPU_ALL_LIBS=${GPU_ALL_LIBS:-0}" | sort)

# 3. Install everything afresh when the set changed: pip --target cannot add to a shared
#    namespace folder (nvidia/) piecemeal, so a new set replaces the old folder whole.
if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$signature" ]]; then
    echo "gpu_setup: ${#wheel_of[@]} wheels already installed in $SITE"
else
    rm -rf "$SITE.new"
    if ((${#wheel_of[@]})); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE.new" \
            "${wheel_of[@]}"
    fi
    mkdir -p "$SITE.new/_libs"
    # Expose a carried library only where this system lacks that soname: its own copies win.
    # GPU_ALL_LIBS=1 exposes all of them (to test the carried set on a system that has them).
    system_libs=$( (/sbin/ldconfig -p 2>/dev/null || true) | awk '/x86-64/ {print $1}')
    for soname in "${!lib_of[@]}"; do
        if [[ "${GPU_ALL_LIBS:-0}" == 1 ]] || ! grep -qxF "$soname" <<<"$system_libs"; then
            cp "${lib_of[$soname]}" "$SITE.new/_libs/$soname"
        fi
    done
    echo "$signature" > "$SITE.new/.gpu_setup_installed"
    rm -rf "$SITE.old"
    [[ -e "$SITE" ]] && mv "$SITE" "$SITE.old"
    mv "$SITE.new" "$SITE"
    rm -rf "$SITE.old"
    echo "gpu_setup: installed ${#wheel_of[@]} wheels into $SITE ($(ls "$SITE/_libs" | wc -l) libraries in $SITE/_libs)"
fi

# 4. The environment, written to a file to source and printed.
cat > "$ENVFILE.tmp" <<EOF
export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}
export LD_LIBRARY_PATH=$SITE/_libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
mv "$ENVFILE.tmp" "$ENVFILE"
cat "$ENVFILE"

# 5. What works now.
if [[ -n "$missing" ]]; then
    echo "gpu_setup: not yet here (carry the remaining chunks):" $missing
else
    echo "gpu_setup: all $(echo "$wanted" | wc -l) wheels installed"
fi
so=$(ls "$SITE"/ffcv/_libffcv*.so 2>/dev/null | head -1 || true)
if [[ -n "$so" ]]; then
    unresolved=$(LD_LIBRARY_PATH=$SITE/_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ldd "$so" | grep 'not found' || true)
    [[ -z "$unresolved" ]] || echo "gpu_setup: ffcv's extension cannot find:" $unresolved >&2
fi

# 6. --check: use what is installed: ffcv writes and reads a tiny JPEG .beton; DALI decodes a JPEG on
#    the CPU and, where torch sees a GPU, with device="mixed" (nvJPEG). Fails loudly on any error.
if ((CHECK)); then
    (
        source "$ENVFILE"
        "$PY" - "$SITE" <<'PY'
import os, shutil, sys, tempfile
import numpy as np

site, tmp = sys.argv[1], tempfile.mkdtemp()
yy, xx = np.mgrid[0:96, 0:128]
img = np.stack([xx * 2, yy * 2, xx + yy], -1).astype(np.uint8)  # smooth RGB test image
if os.path.isdir(os.path.join(site, "ffcv")):
    import importlib.metadata
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from ffcv.writer import DatasetWriter

    class Tiny:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return img, i

    path = os.path.join(tmp, "tiny.beton")
    fields = {"image": RGBImageField(write_mode="jpg"), "label": IntField()}
    DatasetWriter(path, fields, num_workers=1).from_indexed_dataset(Tiny())
    pipelines = {"image": [RandomResizedCropRGBImageDecoder((32, 32)), ToTensor()],
                 "label": [IntDecoder(), ToTensor()]}
    loader = Loader(path, batch_size=4, num_workers=1, order=OrderOption.SEQUENTIAL, pipelines=pipelines)
    n = sum(x.shape[0] for x, _ in loader)
    assert n == 8, n
    print(f"gpu_setup: ffcv {importlib.metadata.version('ffcv')} wrote and read a JPEG .beton ({n} images)")
if os.path.isdir(os.path.join(site, "nvidia", "dali")):
    import cv2
    import torch
    import nvidia.dali as dali
    import nvidia.dali.fn as fn
    import nvidia.dali.plugin.pytorch  # noqa: F401  (the iterator rded-fast uses)

    os.makedirs(os.path.join(tmp, "jpg", "a"))
    cv2.imwrite(os.path.join(tmp, "jpg", "a", "x.jpg"), img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    for device in ["cpu"] + (["mixed"] if torch.cuda.is_available() else []):
        @dali.pipeline_def(batch_size=1, num_threads=1, device_id=0 if device == "mixed" else None)
        def decode():
            jpegs, _ = fn.readers.file(file_root=os.path.join(tmp, "jpg"))
            return fn.decoders.image(jpegs, device=device)

        pipe = decode()
        pipe.build()
        (out,) = pipe.run()
        got = np.array((out.as_cpu() if device == "mixed" else out).at(0))
        err = float(np.abs(got.astype(int) - img.astype(int)).mean())
        assert got.shape == img.shape and err < 3, (got.shape, err)
        print(f"gpu_setup: DALI {dali.__version__} decoded a JPEG with device={device} (mean abs error {err:.2f})")
shutil.rmtree(tmp)
PY
    )
fi
