"""Each loader against its own ceiling: the same decode graph or library call alone, same data, same process.

  dali_graph   the DALI loader's own graph (rded_fast.loaders.dali_loader.crop_pipeline: file reader or fed bytes,
               one decode, K x slice + antialiased resize of fed boxes), run by `pipe.run()` with a feed that only
               slices precomputed arrays: no check, no iterator, no torch. The DALI loader's ceiling.
  dali_rrc     DALI's fastest graph for the same work: file reader, decode, K x `random_resized_crop` (DALI draws
               the boxes itself), no feed at all.
  tv_decode    `torchvision.io.decode_jpeg(list of bytes, device=...)`, decode only, bytes already in memory: the
               ceiling of a torchvision nvJPEG path.
  pil_processes  the torch loader's work alone: PIL decode + the planned crops (rded_fast.loaders.torch_loader)
               in a pool of worker processes, no DataLoader, no batching. The torch loader's ceiling.
  ffcv_stock   ffcv's Loader with its stock RandomResizedCropRGBImageDecoder over the .beton's samples (decode + one
               crop): what ffcv itself does at best. The ffcv loader's ceiling.
  loader       a CropLoader (any of rded-fast's) over the same plan: img/s, first batch, failures.

On a CPU (`device="cpu"`) the DALI graphs run the same operators on libjpeg-turbo; decoding dominates there, so
the loader/graph ratio shows the loader's own overhead only as a few percent. On CUDA DALI decodes "mixed".

Run: python -m rded_fast.benchmarks.ceilings --data TREE [--shards DIR] [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from rded_fast.device import available_cores, cpu_description


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _pipe_rate(pipe, images_per_run: int, device: str, warm: int) -> dict:
    """Rates of `pipe.run()` until its source ends: `img_per_s` in steady state (after `warm` runs) and
    `whole_img_per_s` from before the pipeline's build to its last batch (what a loader's pass includes)."""
    t0, c0 = time.perf_counter(), time.process_time()
    pipe.build()
    runs = done = 0
    try:
        for _ in range(warm):
            pipe.run()
            done += 1
        _sync(device)
        t = time.perf_counter()
        while True:
            pipe.run()
            runs += 1
    except StopIteration:
        pass
    _sync(device)
    end = time.perf_counter()
    steady = runs * images_per_run / (end - t) if runs else None
    total = (done + runs) * images_per_run
    cpu = time.process_time() - c0
    return {
        "img_per_s": steady,
        "whole_img_per_s": total / (end - t0),
        "images": total,
        "seconds": end - t0,
        "cpu_ms_per_img": 1000 * cpu / total,
    }


def dali_graph(source, plan, crop_size: int, device: str, batch_size: int, threads: int, prefetch: int, **decoder) -> dict:
    """The DALI loader's graph alone over `plan` (folder, or shards when `source` is a shard folder)."""
    from rded_fast.formats.shards import ShardBytes
    from rded_fast.loaders.dali_loader import crop_pipeline, decoder_options

    runs = len(plan) // batch_size
    rows = np.arange(runs * batch_size).reshape(runs, batch_size)
    boxes = np.ascontiguousarray(plan.boxes, dtype=np.int32)
    positions = np.arange(runs * batch_size, dtype=np.int32).reshape(runs, batch_size, 1)
    index = source.index
    reader = ShardBytes(source.table) if source.table is not None else None
    files = None if reader is not None else [index.paths[i] for i in plan.image_ids[: runs * batch_size].tolist()]

    def feed(info):
        j = info.iteration
        if j >= runs:
            raise StopIteration
        if reader is None:
            return positions[j], boxes[rows[j]]
        return [reader.get(int(plan.image_ids[r])) for r in rows[j].tolist()], positions[j], boxes[rows[j]]

    mixed = "mixed" if device != "cpu" else "cpu"
    sizes = index.sizes[plan.image_ids]
    options = decoder_options(mixed, decoder.get("hw_decoder_load"), tuple(int(v) for v in np.percentile(sizes, 90, axis=0)))
    pipe = crop_pipeline(
        feed,
        files,
        index.root if files is not None else None,
        plan.num_crop,
        crop_size,
        mixed,
        options,
        batch_size=batch_size,
        num_threads=threads,
        device_id=0 if device != "cpu" else None,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,
    )
    try:
        return {
            **_pipe_rate(pipe, batch_size, device, min(2, runs // 2)),
            "source": "shards" if reader else "folder",
            "options": options,
        }
    finally:
        del pipe
        if reader is not None:
            reader.close()


def dali_rrc(files: list[str], crop_size: int, num_crop: int, device: str, batch_size: int, threads: int, prefetch: int) -> dict:
    """File reader, decode, `num_crop` x random_resized_crop: DALI's own fastest graph for RDED's per-image work."""
    from nvidia.dali import fn, pipeline_def, types

    runs = len(files) // batch_size
    mixed = "mixed" if device != "cpu" else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=0 if device != "cpu" else None, seed=0)
    def graph():
        jpegs, _ = fn.readers.file(files=files[: runs * batch_size], random_shuffle=False, name="r")
        options = {"hw_decoder_load": 1.0} if mixed == "mixed" else {}
        image = fn.decoders.image(jpegs, device=mixed, output_type=types.RGB, **options)
        crops = [fn.random_resized_crop(image, size=[crop_size, crop_size], random_area=[0.08, 1.0]) for _ in range(num_crop)]
        return fn.transpose(fn.stack(*crops), perm=[0, 3, 1, 2])

    pipe = graph(prefetch_queue_depth=prefetch, exec_dynamic=True)
    try:
        return _pipe_rate(_Runs(pipe, runs), batch_size, device, min(2, runs // 2))
    finally:
        del pipe


class _Runs:
    """A pipeline whose `run()` raises StopIteration after `runs` runs (a file reader alone never ends)."""

    def __init__(self, pipe, runs: int):
        self.pipe, self.left = pipe, runs

    def build(self) -> None:
        self.pipe.build()

    def run(self):
        if self.left <= 0:
            raise StopIteration
        self.left -= 1
        return self.pipe.run()


def tv_decode(files: list[str], device: str, batch_size: int) -> dict:
    """torchvision's batched `decode_jpeg` of JPEG bytes already in memory (CUDA: nvJPEG), decode only."""
    from torchvision.io import decode_jpeg, read_file

    t0 = time.perf_counter()
    data = [read_file(f) for f in files]
    target = "cuda" if device != "cpu" else "cpu"
    decode_jpeg(data[:batch_size], device=target)
    _sync(device)
    t = time.perf_counter()
    for i in range(0, len(data), batch_size):
        decode_jpeg(data[i : i + batch_size], device=target)
    _sync(device)
    end = time.perf_counter()
    return {
        "img_per_s": len(data) / (end - t),
        "whole_img_per_s": len(data) / (end - t0),  # with reading the files and a first (warm-up) batch
        "images": len(data),
        "seconds": end - t,
        "batch": batch_size,
    }


def _pil_rows(args: tuple) -> int:
    from rded_fast.loaders.torch_loader import cut_crops, decode_rgb

    root, paths, boxes, crop_size = args
    for path, box in zip(paths, boxes):
        cut_crops(decode_rgb(os.path.join(root, path)), box, crop_size)
    return len(paths)


def _one_thread() -> None:
    torch.set_num_threads(1)  # as in DataLoader workers


def pil_processes(index, plan, crop_size: int, workers: int, limit: int | None = None, chunk: int = 32) -> dict:
    """PIL decode + the planned crops of the first `limit` rows in `workers` processes (started and warmed first)."""
    rows = np.arange(len(plan) if limit is None else min(limit, len(plan)))
    paths = [index.paths[i] for i in plan.image_ids[rows].tolist()]
    jobs = [(index.root, paths[i : i + chunk], plan.boxes[rows[i : i + chunk]], crop_size) for i in range(0, len(rows), chunk)]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
        list(pool.map(_pil_rows, [(index.root, paths[:1], plan.boxes[:1], crop_size)] * workers))
        t = time.perf_counter()
        images = sum(pool.map(_pil_rows, jobs))
        seconds = time.perf_counter() - t
    return {"img_per_s": images / seconds, "whole_img_per_s": images / seconds, "images": images, "processes": workers}


def ffcv_stock(beton: str, crop_size: int, batch_size: int, workers: int) -> dict:
    """ffcv's own decode + random resized crop over every sample of `beton`, one epoch after a warm one."""
    from rded_fast.formats.beton import IMAGE_FIELD, LABEL_FIELD, keep_torch_threads

    with keep_torch_threads():
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption

        loader = Loader(
            beton,
            batch_size=batch_size,
            num_workers=workers,
            os_cache=True,
            order=OrderOption.SEQUENTIAL,
            pipelines={IMAGE_FIELD: [RandomResizedCropRGBImageDecoder((crop_size, crop_size))], LABEL_FIELD: None},
        )
        t0 = time.perf_counter()
        for _ in loader:  # compiles, fills the OS cache
            pass
        t = time.perf_counter()
        images = sum(len(batch[0]) for batch in loader)
        seconds = time.perf_counter() - t
    return {
        "img_per_s": images / seconds,
        "whole_img_per_s": images / (time.perf_counter() - t0) * 2,
        "images": images,
        "crops_per_image": 1,
    }


def loader_rate(name: str, source, plan, crop_size: int, device: str, batch_size: int, workers: int, **options) -> dict:
    """One pass of loader `name` over `plan`: img/s from its first call to its last batch, time to the first
    batch, failed rows, and its timings() (the DALI loader's JPEG check)."""
    from rded_fast.loaders import make_loader

    prefetch = options.pop("prefetch", None)
    loader = make_loader(
        name, source, plan, crop_size, batch_size=batch_size, workers=workers, device=device, prefetch=prefetch, options=options
    )
    _sync(device)
    t, c0 = time.perf_counter(), time.process_time()
    first, images, failed = None, 0, 0
    for batch in loader:
        if first is None:
            _sync(device)
            first, first_images = time.perf_counter() - t, len(batch.rows)
        images, failed = images + len(batch.rows), failed + len(batch.reasons)
    _sync(device)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c0
    steady = (images - first_images) / (seconds - first) if first is not None and images > first_images else None
    timings = {f"timings_{k}": v for k, v in loader.timings().items()}
    return {
        "img_per_s": steady,
        "whole_img_per_s": images / seconds,
        "images": images,
        "seconds": seconds,
        "first_batch_s": first,
        "failed": failed,
        "cpu_ms_per_img": 1000 * cpu / max(images, 1),
        **timings,
    }


def compare(source, plan, crop_size: int, device: str, batch_size: int, workers: int, prefetch: int, repeats: int = 1) -> dict:
    """The DALI loader and its graph over the same plan, alternated `repeats` times; ratio of the medians."""
    graph, loader = [], []
    for _ in range(repeats):
        graph.append(dali_graph(source, plan, crop_size, device, batch_size, workers, prefetch, hw_decoder_load=1.0))
        loader.append(
            loader_rate("dali", source, plan, crop_size, device, batch_size, workers, prefetch=prefetch, hw_decoder_load=1.0)
        )
    result = {"graph": graph, "loader": loader}
    for key in ("img_per_s", "whole_img_per_s", "cpu_ms_per_img"):
        g = float(np.median([r[key] for r in graph]))
        lo = float(np.median([r[key] for r in loader]))
        result[f"graph_{key}"], result[f"loader_{key}"], result[f"loader_over_graph_{key}"] = g, lo, lo / g
    return result


def main(argv: list[str] | None = None) -> int:
    from rded_fast.loaders import open_source
    from rded_fast.plan import make_plan

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ImageFolder of JPEGs")
    p.add_argument("--shards", help="the same tree converted with `rded-fast convert --format shards`")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mipc", type=int, default=300)
    p.add_argument("--num-crop", type=int, default=5)
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=available_cores())
    p.add_argument("--prefetch", type=int)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    prefetch = args.prefetch or (4 if args.device != "cpu" else 2)
    result = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0), "cpu": cpu_description()}
    for source, data in (("folder", args.data), ("shards", args.shards)):
        if data is None:
            continue
        opened = open_source("dali", data, show_progress=False)
        plan = make_plan(opened.index, 0, args.mipc, args.num_crop)
        result[source] = {
            "images": len(plan),
            **compare(opened, plan, args.crop, args.device, args.batch_size, args.workers, prefetch, args.repeats),
        }
        r = result[source]
        print(
            f"{source}: steady loader {r['loader_img_per_s']:.0f} img/s / graph {r['graph_img_per_s']:.0f} = "
            f"{r['loader_over_graph_img_per_s']:.3f}; whole pass {r['loader_whole_img_per_s']:.0f} / "
            f"{r['graph_whole_img_per_s']:.0f} = {r['loader_over_graph_whole_img_per_s']:.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
