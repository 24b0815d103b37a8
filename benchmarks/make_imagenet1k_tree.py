"""Write an ImageNet-1K-shaped tree for scale benchmarks: the 1000 real WNID folders (torchvision's order),
~1,300 small JPEGs each (1,281,167 files in all, as in ImageNet's train split), with its odd files planted.

Not for tests, nor for quality: it exists to measure what grows with the number of files (listing,
indexing, planning, journals, manifests, resume). The pixels are natural-image-like noise
(benchmarks/make_imagenet_like.py) at small sizes (48-160 px, varied aspect ratios) so that the tree
fits in a few GB; a pool of distinct JPEGs is encoded once and written under every name, so 1.28 M
files take a few minutes on 2 cores. Planted like ImageNet's: one PNG named .JPEG (n02105855_2933.JPEG),
22 CMYK JPEGs, some grayscale JPEGs, and one truncated JPEG.

`link_tree` makes the other ImageNet-1K shape, for throughput at full image size: the 1000 WNID folders with
`per_class` hard links each to the JPEGs of a smaller tree (e.g. 30k ImageNet-like ~500x375 files from
benchmarks/make_imagenet_like.py). Decoding costs per file, not per distinct content, so 1000 x 300 links to
30k files decode like 300k files, and the tree takes seconds to make.

Run: python -m rded_fast.benchmarks.make_imagenet1k_tree --out /work/scale-data/imagenet1k
     python -m rded_fast.benchmarks.make_imagenet1k_tree --out /tmp/in1k --link-from /tmp/inlike --per-class 300
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from rded_fast.benchmarks.make_imagenet_like import natural_image
from rded_fast.device import worker_count

TRAIN_IMAGES = 1_281_167
SHORT_CLASSES = 100  # ImageNet's train split: most classes have 1,300 images, some down to 732
POOL = 2048
PNG_AS_JPEG = ("n02105855", 2933)
CMYK_FILES = 22
GRAY_FILES = 300


def wnids() -> list[str]:
    """The 1000 WNIDs in torchvision's output order, from the table the observer heads use."""
    table = Path(__file__).resolve().parents[1] / "rded_fast" / "models" / "imagenet_wnids.txt"
    return [line.split("\t")[0] for line in table.read_text().splitlines() if line and not line.startswith("#")]


def class_counts(seed: int = 0) -> np.ndarray:
    """1,300 per class but for SHORT_CLASSES classes with fewer, summing to ImageNet's 1,281,167."""
    counts = np.full(1000, 1300, np.int64)
    rng = np.random.default_rng(seed)
    short = rng.choice(1000, SHORT_CLASSES, replace=False)
    deficit = 1300 * 1000 - TRAIN_IMAGES
    cut = rng.multinomial(deficit, np.full(SHORT_CLASSES, 1 / SHORT_CLASSES))
    counts[short] -= np.minimum(cut, 1300 - 732)
    counts[short[0]] -= counts.sum() - TRAIN_IMAGES  # exact total
    return counts


def _encode(image: np.ndarray, mode: str = "RGB", quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def jpeg_pool(seed: int, size: int = POOL) -> list[bytes]:
    """`size` distinct small JPEGs (48-160 px a side, aspect 3:4 to 4:3)."""
    rng = np.random.default_rng([seed, 1])
    pool = []
    for _ in range(size):
        w = int(rng.integers(48, 161))
        h = int(np.clip(w * rng.uniform(0.75, 1.333), 48, 160))
        pool.append(_encode(natural_image(rng, w, h)))
    return pool


def _odd_files(seed: int, names: list[str], counts: np.ndarray) -> dict[tuple[int, int], bytes]:
    """(class, image number) -> bytes of the planted odd files."""
    rng = np.random.default_rng([seed, 2])
    odd: dict[tuple[int, int], bytes] = {}
    image = natural_image(rng, 120, 90)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    c = names.index(PNG_AS_JPEG[0])
    odd[(c, min(PNG_AS_JPEG[1], int(counts[c]) - 1))] = png.getvalue()
    picks = rng.choice(1000, CMYK_FILES + GRAY_FILES + 1, replace=False)
    for k, c in enumerate(picks.tolist()):
        key = (c, int(rng.integers(int(counts[c]))))
        if key in odd:
            continue
        if k < CMYK_FILES:
            odd[key] = _encode(image, "CMYK")
        elif k < CMYK_FILES + GRAY_FILES:
            odd[key] = _encode(image, "L")
        else:
            whole = _encode(image)
            odd[key] = whole[: len(whole) // 2]  # truncated
    return odd


def _write_class(job: tuple[str, int, str, int, int]) -> tuple[int, int]:
    out, label, wnid, count, seed = job
    folder = Path(out) / wnid
    folder.mkdir(parents=True, exist_ok=True)
    pool, odd = _STATE["pool"], _STATE["odd"]
    rng = np.random.default_rng([seed, 3, label])
    picks = rng.integers(len(pool), size=count)
    written = 0
    for i in range(count):
        data = odd.get((label, i), pool[int(picks[i])])
        path = folder / f"{wnid}_{i}.JPEG"
        with open(path, "wb") as f:
            f.write(data)
        written += len(data)
    return count, written


_STATE: dict = {}


def _init(pool: list[bytes], odd: dict) -> None:
    _STATE["pool"], _STATE["odd"] = pool, odd


def make_tree(out: str | os.PathLike, seed: int = 0, workers: int | None = None, classes: int = 1000) -> dict:
    """Write the tree under `out` (a new or empty folder); returns counts, bytes and seconds."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out}: exists and is not empty; choose a new folder")
    t0 = time.perf_counter()
    names, counts = wnids(), class_counts(seed)
    pool = jpeg_pool(seed)
    odd = _odd_files(seed, names, counts)
    jobs = [(str(out), c, names[c], int(counts[c]), seed) for c in range(classes)]
    with ProcessPoolExecutor(workers or os.cpu_count(), initializer=_init, initargs=(pool, odd)) as pool_exec:
        done = list(pool_exec.map(_write_class, jobs, chunksize=8))
    files, size = sum(d[0] for d in done), sum(d[1] for d in done)
    return {
        "out": str(out),
        "classes": classes,
        "files": files,
        "bytes": size,
        "odd_files": {"png_as_jpeg": 1, "cmyk": CMYK_FILES, "gray": GRAY_FILES, "truncated": 1},
        "seconds": time.perf_counter() - t0,
    }


def link_tree(pool: str | os.PathLike, out: str | os.PathLike, per_class: int = 300, classes: int = 1000) -> dict:
    """`classes` WNID folders under `out`, each with `per_class` hard links (copies where the file system cannot
    link) to the files of the ImageFolder `pool`, taken in turn in sorted order; files already there are kept,
    so a second call finishes an interrupted one. Returns counts, distinct files and seconds."""
    t0 = time.perf_counter()
    sources = sorted(str(p) for p in Path(pool).glob("*/*") if p.is_file())
    if not sources:
        raise SystemExit(f"--link-from {pool}: no files in its class folders")
    linked = 0
    for c, wnid in enumerate(wnids()[:classes]):
        folder = os.path.join(out, wnid)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            source = sources[(c * per_class + i) % len(sources)]
            target = os.path.join(folder, f"{wnid}_{i}{os.path.splitext(source)[1]}")
            try:
                os.link(source, target)
            except FileExistsError:
                continue
            except OSError:
                shutil.copyfile(source, target)
            linked += 1
    files = classes * per_class
    return {
        "out": str(out),
        "classes": classes,
        "files": files,
        "distinct": min(files, len(sources)),
        "new": linked,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=worker_count)
    p.add_argument("--classes", type=int, default=1000, help="first N classes only (for a quick look)")
    p.add_argument("--link-from", help="an ImageFolder whose files the classes link to (see link_tree)")
    p.add_argument("--per-class", type=int, default=300, help="with --link-from: files per class")
    args = p.parse_args(argv)
    if args.link_from:
        r = link_tree(args.link_from, args.out, args.per_class, args.classes)
        print(
            f"linked {r['files']} files ({r['distinct']} distinct) in {r['classes']} classes under {r['out']} in {r['seconds']:.1f} s"
        )
        return 0
    r = make_tree(args.out, args.seed, args.workers, args.classes)
    print(f"wrote {r['files']} files ({r['bytes'] / 1e9:.2f} GB) in {r['classes']} classes to {r['out']} in {r['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
