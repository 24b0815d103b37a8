"""Decode + crop throughput of several loaders on the same planned images, in one run.

`decode_rates(sources)` takes (loader name, data source) pairs (e.g. ("torch", tree), ("ffcv",
"train.beton"), ("dali", shards)), plans every image of each source with the same seed, checks that
the plans are the same images and boxes (a converted source carries its tree's index), and times each
loader through `make_loader` over that plan: the best of `repeat` passes, in images/s. One loader per
source is iterated `repeat + 1` times; the rates exclude its first pass (building it, compiling, page
cache), reported apart as `first_pass_s`. `crop_differences` compares the crops with the first
source's. Nothing here knows a loader by name.

`main()` builds an ImageNet-shaped JPEG tree (benchmarks/make_imagenet_like.py: about 500x375, q90),
converts it to .beton (jpg mode q90, and raw) and to DALI shards and times the conversions (indexing
included; importing ffcv, once per process, timed apart), compares torch, ffcv and DALI (ImageFolder and
shards) in one run, prints the ratios and writes benchmarks/results/decode_<device>.json.

Run: python -m rded_fast.benchmarks.decode_bench --device-name cpu-2core
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from rded_fast.benchmarks.make_imagenet_like import make_tree
from rded_fast.device import worker_count
from rded_fast.loaders import make_loader, open_source
from rded_fast.plan import CropPlan, make_plan

RESULTS = Path(__file__).parent / "results"
DALI_OWN_SPLIT = {"hw_decoder_load": None}  # as these rates were measured: DALI's own decoder split


def _plan(name: str, data: str, num_crop: int, seed: int, rows: int | None = None):
    source = open_source(name, data, show_progress=False)
    index = source.index
    plan = make_plan(index, seed=seed, mipc=max(int(index.class_counts().max()), 1), num_crop=num_crop)
    if rows is not None:
        plan = CropPlan(
            plan.image_ids[:rows],
            plan.labels[:rows],
            plan.boxes[:rows],
            plan.seed,
            plan.mipc,
            plan.num_crop,
            plan.scale,
            plan.ratio,
        )
    return source, plan


def decode_rates(
    sources: list[tuple[str, str]],
    num_crop: int = 5,
    crop_size: int = 112,
    batch_size: int = 64,
    workers: int = 2,
    repeat: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Images/s (decode + `num_crop` crops resized to `crop_size`) of each (loader, data) over the same plan.

    Raises ValueError when the sources do not plan the same images and boxes (not the same data)."""
    results, reference = [], None
    for name, data in sources:
        source, plan = _plan(name, str(data), num_crop, seed)
        planned = ([source.index.paths[i] for i in plan.image_ids], plan.boxes)
        if reference is None:
            reference = planned
        elif planned[0] != reference[0] or not np.array_equal(planned[1], reference[1]):
            raise ValueError(f"{name} on {data} plans other images or boxes than {sources[0]}: not the same data")
        t0 = time.perf_counter()
        loader = make_loader(name, source, plan, crop_size, batch_size=batch_size, workers=workers, options=DALI_OWN_SPLIT)
        rates, first, failures = [], 0.0, 0
        for attempt in range(repeat + 1):
            t = time.perf_counter()
            n, failed = 0, 0
            for batch in loader:
                n, failed = n + len(batch.rows), failed + len(batch.reasons)
            if attempt:
                rates.append(n / (time.perf_counter() - t))
            else:  # the first pass builds and compiles (numba, DALI) and warms the page cache
                first, failures = time.perf_counter() - t0, failed
        results.append(
            {
                "loader": name,
                "data": str(data),
                "images": len(plan),
                "failures": failures,
                "img_per_s": round(max(rates), 1),
                "all_img_per_s": [round(r, 1) for r in rates],
                "first_pass_s": round(first, 2),
            }
        )
    return results


def crop_differences(
    sources: list[tuple[str, str]], num_crop: int = 5, crop_size: int = 112, rows: int = 128, seed: int = 0
) -> dict:
    """Per-pixel |crop - first source's crop| (grey levels) over the first `rows` plan rows, per other source."""
    crops = []
    for name, data in sources:
        source, plan = _plan(name, str(data), num_crop, seed, rows)
        crops.append(
            torch.cat([b.crops.cpu() for b in make_loader(name, source, plan, crop_size, workers=2, options=DALI_OWN_SPLIT)])
        )
    out = {}
    for (name, data), c in zip(sources[1:], crops[1:]):
        d = (c.int() - crops[0].int()).abs().numpy()
        out[f"{name}:{Path(data).name}"] = {
            "mean": round(float(d.mean()), 4),
            "max": int(d.max()),
            "p99": float(np.percentile(d, 99)),
        }
    return {"reference": f"{sources[0][0]}:{Path(sources[0][1]).name}", "rows": rows, **out}


def convert_all(tree: Path, work: Path, workers: int) -> dict:
    """`tree` converted to a .beton of each write mode and to DALI shards under `work`: the rates of each."""
    from rded_fast.converters.beton import convert as convert_beton
    from rded_fast.converters.shards import convert as convert_shards

    converts = {}
    for mode in ("jpg", "raw"):
        summary = convert_beton(str(tree), str(work / f"{mode}.beton"), workers=workers, write_mode=mode, show_progress=False)
        converts[mode] = {
            "img_per_s": summary["images_per_second"],
            "seconds": summary["seconds"],
            "bytes": summary["bytes"],
            "images": summary["written"],
        }
    summary = convert_shards(str(tree), str(work / "shards"), workers=workers, show_progress=False)
    converts["dali"] = {
        "img_per_s": round(summary["written"] / summary["seconds"], 1),
        "seconds": summary["seconds"],
        "images": summary["written"],
    }
    return converts


def print_rates(runs: list[dict], converts: dict, result: dict, num_crop: int, crop_size: int) -> None:
    """The decode rates against torch's, the conversion rates and the crops' differences, one line each."""
    for r in runs:
        print(
            f"{r['loader']:6s} {r['source']:10s} {r['img_per_s']:7.1f} img/s  x{r['vs_torch']:.2f} vs torch "
            f"(decode + {num_crop} crops at {crop_size} px)"
        )
    for mode, c in converts.items():
        print(f"convert {mode}: {c['img_per_s']:.1f} img/s ({c['images']} images)")
    print("crop |loader - torch|:", json.dumps(result["crop_diff_vs_torch"]))


def main(argv: list[str] | None = None) -> int:
    from rded_fast.formats.beton import keep_torch_threads

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/rded-decode-bench")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--num-crop", type=int, default=5)
    p.add_argument("--crop-size", type=int, default=112, help="p = input_size // factor (224 // 2 by default)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=worker_count, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device-name", default="cpu-2core")
    args = p.parse_args(argv)

    work = Path(args.work)
    tree = work / "tree"
    made = make_tree(tree, args.classes, args.per_class, workers=args.workers)
    t0 = time.perf_counter()
    with keep_torch_threads():  # once per process; kept out of the conversion rates below
        import ffcv  # noqa: F401
    ffcv_import_s = round(time.perf_counter() - t0, 2)
    converts = convert_all(tree, work, args.workers)
    sources = [
        ("torch", str(tree)),
        ("ffcv", str(work / "jpg.beton")),
        ("ffcv", str(work / "raw.beton")),
        ("dali", str(tree)),
        ("dali", str(work / "shards")),
    ]
    runs = decode_rates(sources, args.num_crop, args.crop_size, args.batch_size, args.workers, args.repeat)
    torch_rate = runs[0]["img_per_s"]
    for r in runs:
        r["vs_torch"] = round(r["img_per_s"] / torch_rate, 2)
        r["source"] = Path(r.pop("data")).name
    result = {
        "device": args.device_name,
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "tree": {"images": made["images"], "mean_kb": round(made["mean_kb"], 1), "sizes": "about 500x375, q90"},
        "num_crop": args.num_crop,
        "crop_size": args.crop_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "ffcv_convert": converts,
        "ffcv_import_s": ffcv_import_s,
        "crop_diff_vs_torch": crop_differences(sources, args.num_crop, args.crop_size),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"decode_{args.device_name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_rates(runs, converts, result, args.num_crop, args.crop_size)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
