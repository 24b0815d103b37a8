"""Write an ImageNet-shaped JPEG tree for throughput work: N classes x M images, about 500x375, q90.

Content is natural-image-like (1/f^alpha colour noise, the power spectrum of natural photographs,
plus a few soft-edged shapes), so JPEG sizes and decode costs are realistic (about 110 KB at q90).
Synthetic images are for throughput only, never for quality numbers. Parallel over processes.

Run: python -m rded_fast.benchmarks.make_imagenet_like --out /data/imagenet-like --classes 100 --per-class 300
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from rded_fast.device import worker_count

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (480, 360)]


@lru_cache(maxsize=16)
def _amplitude(width: int, height: int, alpha: float) -> np.ndarray:
    """1/f^alpha amplitude over the rfft2 frequency grid of a height x width image (DC removed)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    amplitude = (radius**-alpha).astype(np.float32)
    amplitude[0, 0] = 0.0
    return amplitude


def _complex_noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)


def natural_image(rng: np.random.Generator, width: int, height: int, alpha: float = 0.93) -> np.ndarray:
    """[H, W, 3] uint8 with a 1/f^alpha spectrum per channel (correlated colours) and a few shapes."""
    amplitude = _amplitude(width, height, alpha)
    base = _complex_noise(rng, amplitude.shape)
    mix = rng.uniform(0.6, 1.0)
    channels = []
    for _ in range(3):
        field = np.fft.irfft2((mix * base + (1 - mix) * _complex_noise(rng, amplitude.shape)) * amplitude, s=(height, width))
        channels.append((field / (field.std() + 1e-8)).astype(np.float32))
    img = np.stack(channels, -1) * np.float32(rng.uniform(40, 62)) + rng.uniform(60, 190, size=3).astype(np.float32)
    for _ in range(rng.integers(2, 6)):  # soft-edged discs, computed on their bounding boxes only
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        y0, y1 = max(0, int(cy - r - 1)), min(height, int(cy + r + 2))
        x0, x1 = max(0, int(cx - r - 1)), min(width, int(cx + r + 2))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask = np.clip((r - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)) / 3.0, 0, 1).astype(np.float32)[..., None]
        box = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = box * (1 - mask) + (box * 0.4 + colour * 0.6) * mask
    return np.clip(img, 0, 255).astype(np.uint8)


def variant(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Another image of the same size and statistics, cheaply: `image` rolled by a random offset, maybe mirrored
    (a different JPEG that costs the same to decode; generating a new image costs ~8x its encoding)."""
    out = np.roll(image, (int(rng.integers(image.shape[0])), int(rng.integers(image.shape[1]))), axis=(0, 1))
    return out[:, ::-1] if rng.random() < 0.5 else out


def _write_class(args: tuple[Path, int, int, int, int, int]) -> int:
    out, label, per_class, seed, quality, variants = args
    folder = out / f"n{label:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, label])
    total = 0
    base = None
    for i in range(per_class):
        path = folder / f"n{label:08d}_{i:05d}.JPEG"
        if not path.exists():
            if i % variants == 0 or base is None:
                w, h = SIZES[int(rng.integers(len(SIZES)))]
                base = image = natural_image(rng, w, h)
            else:
                image = variant(rng, base)
            tmp = path.with_suffix(".tmp")
            Image.fromarray(image).save(tmp, format="JPEG", quality=quality)
            os.replace(tmp, path)
        total += path.stat().st_size
    return total


def make_tree(
    out: str | Path, classes: int, per_class: int, seed: int = 0, quality: int = 90, workers: int | None = None, variants: int = 1
) -> dict:
    """Write the tree (skipping images already there); returns counts, mean JPEG size and seconds. With `variants`
    k > 1 each generated image is followed by k - 1 `variant`s of it: about 4x faster at k = 4, every file still
    a distinct JPEG of the same decode cost."""
    out = Path(out)
    t0 = time.perf_counter()
    jobs = [(out, c, per_class, seed, quality, max(1, int(variants))) for c in range(classes)]
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        sizes = list(pool.map(_write_class, jobs))
    n = classes * per_class
    return {"out": str(out), "images": n, "mean_kb": sum(sizes) / n / 1024, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workers", type=worker_count)
    p.add_argument("--variants", type=int, default=1, help="images per generated one (the rest are shifted copies)")
    args = p.parse_args(argv)
    r = make_tree(args.out, args.classes, args.per_class, args.seed, args.quality, args.workers, args.variants)
    print(f"wrote {r['images']} JPEGs to {r['out']}: mean {r['mean_kb']:.0f} KB, {r['images'] / r['seconds']:.0f} img/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
