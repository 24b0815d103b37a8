"""`rded-fast bench`: throughput of every stage, measured in one run on one device, reported as a JSON-able dict.

Stages: `decode` (loader decode + crop, img/s), `score` (the scoring engine on pre-made uint8 crops,
crops/s), `model` (the observer alone on pre-made normalised, padded tensors in the same dtype and
layout: the ceiling), `e2e` (a whole `distill`, seconds, and its crops/s as a fraction of the model-only
rate), `host` (the host critical path per class at ImageNet output shape, benchmarks/host_stage.py), and with
`reference` the RDED reference's way of doing the same job and the speedup over it. Compile seconds are
reported apart from every rate.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rded_fast.benchmarks.host_stage import bench_host
from rded_fast.benchmarks.reference import reference_distill
from rded_fast.class_stage import loader_for
from rded_fast.compile_rule import compile_step, resolve_compile
from rded_fast.device import autocast, available_cores, cpu_description, device_name, resolve_amp, resolve_device
from rded_fast.distill import DistillConfig, distill
from rded_fast.errors import UserError
from rded_fast.loaders import open_source, resolve_loader
from rded_fast.memory_check import check_memory
from rded_fast.models import build
from rded_fast.plan import make_plan
from rded_fast.score import Scorer, center_pad, normalize_uint8

STAGES = ("decode", "score", "model", "e2e", "host")


@dataclass
class BenchConfig:
    """What to measure (`stage`, repetitions, the reference run) around the distill job it measures."""

    job: DistillConfig  # data, observer, recipe, loader, device, amp, compile: as `distill` would run them
    stage: str = "all"
    model_crops: int = 4096
    host_classes: int = 24
    reference: bool = False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int = 1, repeat: int = 3) -> float:
    """Best-of-`repeat` seconds of fn() after `warmup` calls (compilation and caches excluded)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_decode(job: DistillConfig, source, plan, crop_size: int, device: torch.device) -> dict:
    """Decode + cut every planned crop with the loader; img/s and crops/s over the whole plan."""
    as_measured = replace(job, loader_options={"hw_decoder_load": None})  # as these rates were measured: DALI's own split
    loader = loader_for(as_measured, source, plan, crop_size, device, reuse_buffers=True)
    t = time.perf_counter()
    images = sum(len(batch.rows) for batch in loader)
    seconds = time.perf_counter() - t
    return {"images": images, "seconds": seconds, "img_per_s": images / seconds, "crops_per_s": images * plan.num_crop / seconds}


def bench_score_and_model(
    cfg: BenchConfig, model: torch.nn.Module, crop_size: int, device: torch.device, num_classes: int, planned_crops: int
) -> dict:
    """The engine on uint8 crops, and the bare observer on ready tensors (same dtype, layout, compile)."""
    job = cfg.job
    n = job.batch_size * job.num_crop
    generator = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (n, 3, crop_size, crop_size), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (n,), generator=generator).to(device)
    amp = resolve_amp(job.amp, device)
    compile_on = resolve_compile(job.compile, device, "distill", planned_crops)
    scorer = Scorer(model, job.input_size, device, amp_dtype=amp, compile=compile_on, batch_size=n)
    reps = max(1, cfg.model_crops // n)
    score_compile_s = scorer.warm(crop_size)
    score_s = _timed(lambda: [scorer(crops, labels) for _ in range(reps)], device)

    x = center_pad(normalize_uint8(crops), job.input_size).contiguous(memory_format=torch.channels_last)
    net = model.to(device, memory_format=torch.channels_last).eval()
    forward = compile_step(net, device) if compile_on else net

    def run_model():
        with torch.inference_mode(), autocast(device, amp):
            for _ in range(reps):
                forward(x)

    t = time.perf_counter()
    if compile_on:
        run_model()
    model_compile_s = time.perf_counter() - t
    model_s = _timed(run_model, device)
    return {
        "score": {
            "crops": n * reps,
            "seconds": score_s,
            "crops_per_s": n * reps / score_s,
            "compile_seconds": score_compile_s,
            "cudagraph_skips": scorer.cudagraph_skips,
        },
        "model": {"crops": n * reps, "seconds": model_s, "crops_per_s": n * reps / model_s, "compile_seconds": model_compile_s},
        "amp": str(amp),
        "compile": compile_on,
        "batch_crops": n,
    }


def bench_e2e(job: DistillConfig, out: Path, result: dict) -> dict:
    """A whole `distill` of the job into `out` (observer check skipped): seconds by stage, crops/s of the class
    stage, and that rate as a fraction of the model-only rate when `result` has one."""
    t = time.perf_counter()
    run = distill(replace(job, out=str(out), overwrite=True, skip_observer_check=True))
    seconds = time.perf_counter() - t
    crops_per_s = result["planned_crops"] / run.seconds["classes"]
    e2e = {
        "seconds": seconds,
        "stage_seconds": run.seconds,
        "crops_per_s": crops_per_s,
        "compile_seconds": run.seconds.get("compile", 0.0),
    }
    if "model" in result:
        e2e["fraction_of_model_only"] = crops_per_s / result["model"]["crops_per_s"]
    return e2e


def run_bench(cfg: BenchConfig) -> dict:
    """Run the chosen stages (all: decode, score, model, e2e, host) and, with `reference`, the reference run."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    if any(s not in STAGES for s in stages):
        raise UserError(f"--stage {cfg.stage}: choose one of all, {', '.join(STAGES)}, quality")
    device = resolve_device(cfg.job.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if stages == ("host",):  # synthetic ImageNet-shaped classes: needs no data
        return {
            "device": device_name(device),
            "cpu": cpu_description(),
            "torch": torch.__version__,
            "host": [bench_host(fmt, device, classes=cfg.host_classes) for fmt in ("png", "jpg")],
        }
    job = cfg.job = replace(
        cfg.job,
        loader=resolve_loader(cfg.job.loader, cfg.job.data, device),
        workers=available_cores() if cfg.job.workers is None else cfg.job.workers,
    )
    crop_size = job.input_size // job.factor
    source = open_source(job.loader, job.data, show_progress=job.show_progress)
    index = source.index
    plan = make_plan(index, job.seed, job.mipc, job.num_crop)
    check_memory(job, plan, index.num_classes, device)
    observer = build(job.observer, index.num_classes, job.weights, job.input_size)
    result: dict = {
        "device": device_name(device),
        "cpu": cpu_description(),
        "config": asdict(cfg),
        "torch": torch.__version__,
        "planned_images": len(plan),
        "planned_crops": len(plan) * job.num_crop,
        "classes": index.num_classes,
    }
    if "decode" in stages:
        result["decode"] = bench_decode(job, source, plan, crop_size, device)
    if "score" in stages or "model" in stages:
        result.update(bench_score_and_model(cfg, observer.model, crop_size, device, index.num_classes, result["planned_crops"]))
    if "host" in stages:
        result["host"] = [bench_host(fmt, device, classes=cfg.host_classes) for fmt in ("png", "jpg")]
    work = Path(tempfile.mkdtemp(prefix="rded-bench-"))
    try:
        if "e2e" in stages:
            result["e2e"] = bench_e2e(job, work / "ours", result)
        if cfg.reference:
            ref_model = build(job.observer, index.num_classes, job.weights, job.input_size).model
            ref = reference_distill(
                index, plan, ref_model, job.input_size, job.factor, job.ipc, work / "reference", device, workers=4
            )
            result["reference"] = ref
            if "e2e" in result:  # same work on both sides: planned images in, written images out
                result["speedup"] = ref["seconds"] / result["e2e"]["stage_seconds"]["classes"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["peak_memory"] = {
        "host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "host_children_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "device_mib": torch.cuda.max_memory_allocated(device) / 1024**2 if device.type == "cuda" else None,
    }
    return result
