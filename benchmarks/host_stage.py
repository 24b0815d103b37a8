"""`bench --stage host`: the host critical path per class at ImageNet output shape.

After a class is scored, its host work (copy scores to the host, select, stitch, encode, write durably,
journal) runs on the host stage (rded_fast.host) while the next class is scored. What the scorer still
pays per class is the hand-off (`to_host` + `submit`) plus any wait when the stage falls behind. This
measures, on synthetic photo-like crops (smoothed noise, so PNG compresses like a photo) and a synthetic
index of 500x375 images:

- `serial_ms`: the whole host work of one class on the calling thread (what the scorer paid per class
  before the host stage; also the CPU cost the stage must absorb);
- `critical_path_ms`: the scorer's mean time per class in the hand-off and waits, with scoring simulated
  by a GIL-free sleep of `score_ms` per class (default: 1,500 crops at the GPU target of 60k crops/s = 25
  ms), `critical_path_median_ms` its median;
- `keeps_up`: whether the stage, with its thread count here, kept that mean under 10 % of `score_ms`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rded_fast.host import HostStage


def _synthetic(classes: int, mipc: int, num_crop: int, crop_size: int, seed: int = 0):
    from rded_fast.index import DatasetIndex
    from rded_fast.plan import make_plan

    labels = np.repeat(np.arange(classes), mipc)
    index = DatasetIndex(
        root="/synthetic",
        classes=[f"n{c:08d}" for c in range(classes)],
        paths=[f"n{c:08d}/img_{i:05d}.JPEG" for c in range(classes) for i in range(mipc)],
        labels=labels.astype(np.int64),
        sizes=np.tile(np.array([[500, 375]], np.int64), (len(labels), 1)),
    )
    plan = make_plan(index, seed, mipc, num_crop)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (mipc * num_crop, 3, crop_size, crop_size), dtype=torch.uint8, generator=g)
    crops = torch.nn.functional.avg_pool2d(noise.float(), 5, 1, 2).to(torch.uint8).view(mipc, num_crop, 3, crop_size, crop_size)
    return index, plan, crops


def _serial_seconds(cfg, out: Path, prepare, classes: int) -> list[float]:
    """Each class prepared and committed in turn on this thread: its seconds."""
    from rded_fast.class_stage import commit_classes

    (out / ".rded-journal").mkdir(parents=True)
    seconds = []
    for label in range(classes):
        t = time.perf_counter()
        commit_classes(cfg, out, [prepare(label)()])
        seconds.append(time.perf_counter() - t)
    return seconds


def _staged_handoffs(cfg, out: Path, prepare, classes: int, workers: int, score_ms: float) -> tuple[list[float], float]:
    """The classes handed to the host stage while a simulated scorer is busy `score_ms` per class: each hand-off's
    seconds, and the seconds of all of it."""
    from rded_fast.class_stage import commit_classes

    (out / ".rded-journal").mkdir(parents=True)
    handoff = []
    t_all = time.perf_counter()
    with HostStage(lambda prepared: commit_classes(cfg, out, prepared), workers) as host:
        for label in range(classes):
            time.sleep(score_ms / 1000)  # the scorer busy with this class (GIL released, as on a GPU)
            t = time.perf_counter()
            host.submit(prepare(label))
            handoff.append(time.perf_counter() - t)
    return handoff, time.perf_counter() - t_all


def bench_host(
    fmt: str,
    device: torch.device,
    classes: int = 24,
    input_size: int = 224,
    factor: int = 2,
    ipc: int = 10,
    mipc: int = 300,
    num_crop: int = 5,
    score_ms: float = 25.0,
    workers: int | None = None,
) -> dict:
    """Host critical path per class for output format `fmt` (png or jpg); see the module docstring."""
    from rded_fast.class_stage import prepare_class, to_host
    from rded_fast.distill import DistillConfig
    from rded_fast.host import default_host_workers

    crop_size = input_size // factor
    index, plan, crops = _synthetic(classes, mipc, num_crop, crop_size)
    crops = crops.to(device)
    ok = torch.ones(mipc, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    all_scores = [torch.rand(mipc, num_crop, generator=g).to(device) for _ in range(classes)]
    workers = workers or default_host_workers(torch.device("cuda"))  # scoring is simulated as on a GPU
    work = Path(tempfile.mkdtemp(prefix="rded-bench-host-"))
    try:
        cfg = DistillConfig("/synthetic", str(work), "none", ipc=ipc, factor=factor, mipc=mipc, num_crop=num_crop,
                            input_size=input_size, format=fmt)  # fmt: skip

        def prepare(label: int):
            return lambda: prepare_class(cfg, index, plan, label, crops, ok, to_host({"scores": all_scores[label]}), {})

        serial = _serial_seconds(cfg, work / "serial", prepare, classes)
        handoff, staged_s = _staged_handoffs(cfg, work / "staged", prepare, classes, workers, score_ms)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warm = slice(2, None)  # first classes pay one-off costs (allocations, folder creation)
    critical = float(np.mean(handoff[warm])) * 1000
    return {
        "format": fmt,
        "classes": classes,
        "input_size": input_size,
        "factor": factor,
        "ipc": ipc,
        "mipc": mipc,
        "num_crop": num_crop,
        "host_workers": workers,
        "score_ms": score_ms,
        "serial_ms": float(np.median(serial[warm])) * 1000,
        "critical_path_ms": critical,
        "critical_path_median_ms": float(np.median(handoff[warm])) * 1000,
        "seconds_per_class_overlapped": staged_s / classes,
        "keeps_up": bool(critical <= 0.1 * score_ms),
    }
