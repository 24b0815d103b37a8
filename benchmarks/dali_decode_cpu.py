"""Decode + crop throughput of the DALI loader (ImageFolder and shards) beside the torch loader, on the CPU.

Every loader runs the same plan (all images, `--num-crop` boxes each, p = `--crop-size`) through
`make_loader`, so the numbers compare loaders only. The tree is an ImageNet-shaped synthetic JPEG tree
(benchmarks/make_imagenet_like.py: about 500x375, q90); it and its shards are made once under `--work`.
Writes a JSON under benchmarks/results/ named by `--device-name`.

Run: python -m benchmarks.dali_decode_cpu --device-name cpu-2core
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from benchmarks.make_imagenet_like import make_tree
from converters.dali_shards import convert_dali
from rded_fast.loaders import make_loader, open_index
from rded_fast.plan import make_plan

RESULTS = Path(__file__).parent / "results"


def images_per_second(loader_name: str, data: str, num_crop: int, crop_size: int, batch_size: int, workers: int,
                      repeat: int) -> dict:
    """Best-of-`repeat` decode + crop rate (images/s) of one loader over one source, after a warm-up pass."""
    index = open_index(loader_name, data, show_progress=False)
    plan = make_plan(index, seed=0, mipc=len(index), num_crop=num_crop)
    rates = []
    for attempt in range(repeat + 1):
        loader = make_loader(loader_name, index, plan, crop_size, batch_size=batch_size, workers=workers)
        t0 = time.perf_counter()
        n = sum(len(batch.rows) for batch in loader)
        if attempt:  # the first pass warms the page cache and the pipeline
            rates.append(n / (time.perf_counter() - t0))
    return {"loader": loader_name, "data": data, "images": len(plan), "img_per_s": max(rates),
            "all_img_per_s": [round(r, 1) for r in rates]}


def crop_agreement(tree: str, shards: str, num_crop: int, crop_size: int, images: int = 128) -> dict:
    """Per-pixel |DALI - torch| over the same planned crops of the first `images` plan rows (uint8 levels)."""
    import numpy as np
    import torch

    out = {}
    for name, data in (("torch", tree), ("dali_imagefolder", tree), ("dali_shards", shards)):
        index = open_index(name.split("_")[0], data, show_progress=False)
        plan = make_plan(index, seed=0, mipc=len(index), num_crop=num_crop)
        plan = type(plan)(plan.image_ids[:images], plan.labels[:images], plan.boxes[:images], plan.seed, plan.mipc,
                          plan.num_crop, plan.scale, plan.ratio)
        out[name] = torch.cat([b.crops.cpu() for b in make_loader(name.split("_")[0], index, plan, crop_size, workers=2)])
    result = {}
    for name in ("dali_imagefolder", "dali_shards"):
        d = (out[name].int() - out["torch"].int()).abs().numpy()
        result[name] = {"max": int(d.max()), "mean": round(float(d.mean()), 4), "p99": float(np.percentile(d, 99)),
                        "frac_gt_2": round(float((d > 2).mean()), 5)}
    return {"images": images, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/rded-dali-bench")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--num-crop", type=int, default=5)
    p.add_argument("--crop-size", type=int, default=112, help="p = input_size // factor (224 // 2 by default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device-name", default="cpu-2core")
    args = p.parse_args(argv)

    tree, shards = Path(args.work) / "tree", Path(args.work) / "shards"
    made = make_tree(tree, args.classes, args.per_class, workers=args.workers)
    convert_dali(str(tree), str(shards), workers=args.workers, show_progress=False)
    runs = [images_per_second(name, str(data), args.num_crop, args.crop_size, args.batch_size, args.workers, args.repeat)
            for name, data in (("torch", tree), ("dali", tree), ("dali", shards))]
    result = {
        "device": args.device_name,
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "tree": {"images": made["images"], "mean_kb": round(made["mean_kb"], 1), "sizes": "about 500x375, q90"},
        "num_crop": args.num_crop, "crop_size": args.crop_size, "batch_size": args.batch_size, "workers": args.workers,
        "crop_diff_vs_torch": crop_agreement(str(tree), str(shards), args.num_crop, args.crop_size),
        "runs": [{**r, "source": "shards" if r["data"] == str(shards) else "imagefolder"} for r in runs],
    }
    for r in result["runs"]:
        del r["data"]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"dali_decode_{args.device_name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["runs"]:
        print(f"{r['loader']:6s} {r['source']:12s} {r['img_per_s']:7.1f} img/s (decode + {args.num_crop} crops at {args.crop_size} px)")
    print("crop |DALI - torch|:", json.dumps(result["crop_diff_vs_torch"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
