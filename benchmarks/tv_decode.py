"""torchvision's JPEG path (nvJPEG on CUDA) measured against its own ceilings and beside DALI, on one tree, in one process.

`tv_decode(work)` (the GPU suite's `tvjpeg` step) plans every image of `work/tree` (an ImageNet-like tree from
benchmarks/make_imagenet_like.py; mipc = the largest class, 5 crops at 112 px, seed 0) and times, in img/s over
the whole plan:
  decode_only    `torchvision.io.decode_jpeg(list, device=...)` in batches, bytes already in memory: the ceiling
                 of the loader's decoder;
  decode_crop    the same plus the loader's crop arithmetic (`resize_boxes`) per batch: its compute ceiling;
  tvjpeg_folder  the tvjpeg loader over the ImageFolder (also at batch 64, distill's default: tvjpeg_folder_batch64),
                 and tvjpeg_shards over `work/shards` when converted;
  dali_folder    the DALI loader (GPU decoding, hw_decoder_load 1) over the same tree, when DALI is installed;
each loader with its fraction of decode_only and its peak memory on the device; tvjpeg's also with its rows by
decode path and where its threads' seconds went (reading, waiting for readers, decode, cut, waiting for the consumer).

Run alone: python -m rded_fast.benchmarks.tv_decode WORK [--make-tree 100x100] [--shards] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rded_fast.device import available_cores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ceilings(index, plan, crop_size: int, batch_size: int, device: torch.device) -> dict:
    """decode_only and decode_crop over the plan's files, read into memory first (not timed)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from rded_fast.loaders.box_resize import resize_boxes
    from rded_fast.loaders.tvjpeg_loader import read_bytes

    encoded = [torch.frombuffer(read_bytes(f"{index.root}/{index.paths[i]}"), dtype=torch.uint8) for i in plan.image_ids]
    batches = [range(s, min(s + batch_size, len(encoded))) for s in range(0, len(encoded), batch_size)]
    result = {}
    for name, crop in (("decode_only", False), ("decode_crop", True)):
        decode_jpeg(encoded[:batch_size], mode=ImageReadMode.RGB, device=device)  # the decoder's set-up, untimed
        _sync(device)
        t = time.perf_counter()
        for rows in batches:
            _sync(device)  # as the loader does before every call (nvJPEG's hardware engine ignores stream order)
            images = decode_jpeg([encoded[r] for r in rows], mode=ImageReadMode.RGB, device=device)
            if crop:
                resize_boxes(images, plan.boxes[rows.start : rows.stop], crop_size)
        _sync(device)
        seconds = time.perf_counter() - t
        result[name] = {"img_per_s": len(encoded) / seconds, "seconds": seconds, "batch_size": batch_size}
    return result


def _loader_pass(loader, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = time.perf_counter()
    images = failed = 0
    for batch in loader:
        images, failed = images + len(batch.rows), failed + len(batch.reasons)
    _sync(device)
    seconds = time.perf_counter() - t
    result = {"img_per_s": images / seconds, "seconds": seconds, "images": images, "failures": failed}
    if device.type == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def tv_decode(
    work: str | Path,
    device: str = "cuda",
    crop_size: int = 112,
    num_crop: int = 5,
    batch_size: int = 256,
    workers: int | None = None,
    prefetch: int = 4,
) -> dict:
    """The rows described in the module docstring, as a dict (a row that cannot run says why instead)."""
    from rded_fast.loaders import open_source
    from rded_fast.loaders.tvjpeg_loader import TvJpegCropLoader
    from rded_fast.plan import make_plan

    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
    work, target = Path(work), torch.device(device)
    workers = workers or available_cores()
    tree = open_source("tvjpeg", str(work / "tree"), show_progress=False)
    index = tree.index
    plan = make_plan(index, seed=0, mipc=int(index.class_counts().max()), num_crop=num_crop)
    result = {"images": len(plan), "crop_size": crop_size, "num_crop": num_crop, "batch_size": batch_size, "workers": workers}
    result.update(_ceilings(index, plan, crop_size, batch_size, target))
    runs = [("tvjpeg_folder", str(work / "tree"), batch_size), ("tvjpeg_folder_batch64", str(work / "tree"), 64)]
    if (work / "shards" / "dataset.json").is_file():
        runs.append(("tvjpeg_shards", str(work / "shards"), batch_size))
    for name, data, size in runs:  # batch 64: distill's default --batch-size
        opened = open_source("tvjpeg", data, show_progress=False)
        source_index = opened.index
        source_plan = make_plan(source_index, seed=0, mipc=int(source_index.class_counts().max()), num_crop=num_crop)
        assert np.array_equal(source_plan.boxes, plan.boxes), "the shards plan other boxes than their tree"
        loader = TvJpegCropLoader(
            opened, source_plan, crop_size, batch_size=size, workers=workers, device=target, prefetch=prefetch
        )
        result[name] = {**_loader_pass(loader, target), "counts": dict(loader.counts), "thread_seconds": loader.watch.seconds}
    result["dali_folder"] = _dali_pass(tree, plan, crop_size, batch_size, workers, target)
    for name in ("decode_crop", "tvjpeg_folder", "tvjpeg_folder_batch64", "tvjpeg_shards", "dali_folder"):
        if "img_per_s" in result.get(name, {}):
            result[name]["of_decode_only"] = result[name]["img_per_s"] / result["decode_only"]["img_per_s"]
    return result


def _dali_pass(source, plan, crop_size: int, batch_size: int, workers: int, device: torch.device) -> dict:
    """The DALI loader over the same plan (GPU decoding on CUDA, pinned to the hardware decoder), if installed."""
    try:
        from rded_fast.loaders.dali_loader import DaliCropLoader
    except ImportError as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}
    cuda = device.type == "cuda"
    loader = DaliCropLoader(
        source,
        plan,
        crop_size,
        batch_size=batch_size,
        workers=workers,
        device="mixed" if cuda else "cpu",
        hw_decoder_load=1.0 if cuda else None,
        device_id=(device.index or 0) if cuda else None,
    )
    return _loader_pass(loader, device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", help="folder holding tree/ (and shards/); made there with --make-tree / --shards")
    p.add_argument("--make-tree", help="CLASSESxPER_CLASS: write an ImageNet-like tree to WORK/tree first (kept)")
    p.add_argument("--shards", action="store_true", help="convert WORK/tree to WORK/shards first (kept)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--crop-size", type=int, default=112)
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    work = Path(args.work)
    if args.make_tree:
        from rded_fast.benchmarks.make_imagenet_like import make_tree

        classes, per_class = (int(v) for v in args.make_tree.lower().split("x"))
        print(json.dumps({"tree": make_tree(work / "tree", classes, per_class)}), flush=True)
    if args.shards and not (work / "shards" / "dataset.json").is_file():
        from rded_fast.converters import convert

        print(json.dumps({"shards": convert("dali", str(work / "tree"), str(work / "shards"), show_progress=False)})[:500])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"device": device_name, **tv_decode(work, args.device, args.crop_size, batch_size=args.batch_size)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
