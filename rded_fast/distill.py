"""The distill pipeline: the one place that knows the order of the stages.

index -> plan -> observer check -> (load -> score -> select -> stitch -> write) per class -> manifest.

Classes stream through: the loader runs over the whole plan in batches, crops are buffered per class,
and when a class is complete it is scored in fixed-size chunks of its own crops, selected, stitched
from the buffered winners and written, then journaled. Because scoring never mixes classes, any
split of classes (over torchrun ranks, or before and after a crash) gives the same bytes.
"""
from __future__ import annotations

import math
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import PIL
import torch
import torchvision

import rded_fast
from rded_fast import journal
from rded_fast.device import resolve_device
from rded_fast.distributed import World, all_ok, assign_classes, barrier, init_world
from rded_fast.errors import UserError
from rded_fast.index import DatasetIndex, load_index, read_class_map, save_index
from rded_fast.loaders import LOADER_NAMES, CropLoader, make_loader, open_index
from rded_fast.models import BuiltModel, build
from rded_fast.models.classes import restrict_class_map
from rded_fast.plan import CropPlan, make_center_plan, make_plan, short_classes
from rded_fast.progress import progress
from rded_fast.score import make_scorer
from rded_fast.select import ClassSelection, select_class, select_random
from rded_fast.stitch import cell_boxes, rank_of_cell, stitch
from rded_fast.write import prepare_out_dir, read_image, write_class_images, write_contact_sheet, write_manifest

CHECK_IMAGES = 300
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)
# Parameters that do not change the output: they may differ between an interrupted run and its resume.
NOT_OUTPUT_RELEVANT = ("out", "overwrite", "resume", "show_progress", "workers", "index")


@dataclass
class DistillConfig:
    """Every knob of a distill run; defaults are the reference's ImageNet-1K settings."""

    data: str
    out: str
    observer: str
    weights: str | None = None
    ipc: int = 10
    factor: int = 2
    mipc: int = 300
    num_crop: int = 5
    input_size: int = 224
    seed: int = 0
    batch_size: int = 64
    workers: int = 4
    device: str = "auto"
    loader: str = "torch"
    format: str = "png"
    jpeg_quality: int = 90
    class_map: str | None = None
    index: str | None = None
    select: str = "rded"
    amp: str = "auto"
    compile: str = "auto"
    score_mode: str = "faithful"
    overwrite: bool = False
    resume: bool = False
    skip_observer_check: bool = False
    show_progress: bool = True


@dataclass
class DistillResult:
    out: Path
    manifest: Path
    contact_sheet: Path
    num_images: int
    observer_accuracy: float | None
    decode_failures: int
    seconds: dict = field(default_factory=dict)
    is_main: bool = True  # False on torchrun ranks other than 0, which write no manifest


def validate(cfg: DistillConfig) -> None:
    """One-line errors for impossible arguments, before any work."""
    checks = [
        (cfg.ipc >= 1, f"--ipc {cfg.ipc}: must be >= 1"),
        (cfg.factor >= 1, f"--factor {cfg.factor}: must be >= 1"),
        (cfg.mipc >= 1, f"--mipc {cfg.mipc}: must be >= 1"),
        (cfg.num_crop >= 1, f"--num-crop {cfg.num_crop}: must be >= 1"),
        (cfg.input_size >= 1, f"--input-size {cfg.input_size}: must be >= 1"),
        (cfg.input_size // max(cfg.factor, 1) >= 1, f"--factor {cfg.factor}: larger than --input-size {cfg.input_size}"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be >= 1"),
        (cfg.workers >= 0, f"--workers {cfg.workers}: must be >= 0"),
        (cfg.loader in LOADER_NAMES, f"--loader {cfg.loader}: choose one of {', '.join(LOADER_NAMES)}"),
        (cfg.format in ("png", "jpg"), f"--format {cfg.format}: choose png or jpg"),
        (1 <= cfg.jpeg_quality <= 100, f"--jpeg-quality {cfg.jpeg_quality}: must be in 1..100"),
        (cfg.select in ("rded", "random"), f"--select {cfg.select}: choose rded or random"),
        (cfg.amp in AMP_CHOICES, f"--amp {cfg.amp}: choose one of {', '.join(AMP_CHOICES)}"),
        (cfg.compile in ("auto", "on", "off"), f"--compile {cfg.compile}: choose auto, on or off"),
        (cfg.score_mode in ("faithful", "native"), f"--score-mode {cfg.score_mode}: choose faithful or native"),
        (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), f"--device {cfg.device}: choose auto, cpu or cuda"),
        (not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if cfg.ipc * cfg.factor**2 > cfg.mipc * cfg.num_crop:
        raise UserError(
            f"--ipc {cfg.ipc} --factor {cfg.factor} needs {cfg.ipc * cfg.factor ** 2} cells per class but "
            f"--mipc {cfg.mipc} x --num-crop {cfg.num_crop} gives at most {cfg.mipc * cfg.num_crop}"
        )


def resolve_amp(name: str) -> torch.dtype | None:
    """`auto` is bf16 on CUDA and CPU (measured on Fashion-MNIST/conv3, CPU: 1.8x faster than fp32,
    99 % (factor 1) and 95.5 % (factor 2) of cells equal to the fp32 selection); `none` is fp32."""
    return torch.bfloat16 if name == "auto" else AMP_DTYPES[name]


def near_chance_threshold(num_classes: int, n: int) -> float:
    """Accuracy below which an observer is taken to be guessing: 2x chance plus 3 binomial std."""
    chance = 1.0 / num_classes
    return 2 * chance + 3 * math.sqrt(chance * (1 - chance) / max(n, 1))


def iter_classes(loader: CropLoader, plan: CropPlan) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Regroup the loader's batches by class: yields (label, crops [m, K, 3, p, p], ok [m]) in plan order,
    each as soon as all of the class's planned rows have arrived."""
    labels = plan.labels
    total = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    pending: dict[int, list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    seen: dict[int, int] = defaultdict(int)
    for batch in loader:
        rows = batch.rows.cpu().numpy()
        batch_labels = labels[rows]
        for label in np.unique(batch_labels):
            pick = np.flatnonzero(batch_labels == label)
            index = torch.from_numpy(pick).to(batch.crops.device)
            pending[int(label)].append((rows[pick], batch.crops[index], batch.ok.cpu()[torch.from_numpy(pick)]))
            seen[int(label)] += len(pick)
            if seen[int(label)] == total[label]:
                parts = sorted(pending.pop(int(label)), key=lambda part: part[0][0])
                yield int(label), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def check_observer(index: DatasetIndex, cfg: DistillConfig, scorer, device: torch.device) -> dict:
    """Top-1 of the observer on centred crops of a sample of training images; refuse when near chance."""
    per_class = max(1, math.ceil(CHECK_IMAGES / index.num_classes))
    plan = make_center_plan(index, cfg.seed, per_class)
    loader = make_loader(cfg.loader, index, plan, cfg.input_size, batch_size=cfg.batch_size, workers=cfg.workers,
                         device=str(device))
    correct = decoded = 0
    for label, crops, ok in progress(iter_classes(loader, plan), total=index.num_classes, desc="observer check",
                                     disable=not cfg.show_progress):
        if not ok.any():
            continue
        _, preds = scorer(crops[ok.to(crops.device)][:, 0], torch.full((int(ok.sum()),), label))
        correct += int((preds == label).sum())
        decoded += int(ok.sum())
    accuracy = correct / decoded if decoded else 0.0
    chance = 1.0 / index.num_classes
    threshold = near_chance_threshold(index.num_classes, decoded)
    report = {"accuracy": accuracy, "chance": chance, "threshold": threshold, "images": decoded}
    if not cfg.skip_observer_check and accuracy < threshold:
        raise UserError(
            f"observer {cfg.observer} gets {accuracy:.1%} top-1 on {decoded} training images, near chance "
            f"({chance:.1%}; refusing below {threshold:.1%}). Likely cause: class order. The folders are "
            "taken in sorted order unless --class-map FILE lists them in the observer's output order; also "
            "check --weights and --input-size. --skip-observer-check overrides."
        )
    return report


def check_native_input(observer: BuiltModel, crop_size: int, device: torch.device) -> None:
    """--score-mode native feeds p x p crops; observers with a fixed-size head (ConvNets) cannot take them."""
    try:
        with torch.inference_mode():
            observer.model.to(device)(torch.zeros(1, 3, crop_size, crop_size, device=device))
    except RuntimeError as exc:
        raise UserError(f"--score-mode native: observer {observer.name} cannot take {crop_size}x{crop_size} inputs "
                        f"({str(exc).splitlines()[0]}); use --score-mode faithful") from exc


def select_cells(cfg: DistillConfig, label: int, crops: torch.Tensor, ok: torch.Tensor, scorer, name: str) -> ClassSelection:
    """Rank one class's crops (by the observer, or randomly for the baseline); rows are class-local."""
    m, k = crops.shape[:2]
    n = cfg.ipc * cfg.factor**2
    if cfg.select == "random":
        return select_random(ok.numpy(), label, k, n, cfg.seed, name)
    scores, _ = scorer(crops.reshape(m * k, *crops.shape[2:]), torch.full((m * k,), label, dtype=torch.int64))
    scores = torch.where(ok.to(scores.device)[:, None], scores.view(m, k), float("inf"))
    return select_class(scores.cpu().numpy(), np.arange(m), label, n, name)


def distill_class(cfg: DistillConfig, index: DatasetIndex, plan: CropPlan, label: int, crops: torch.Tensor,
                  ok: torch.Tensor, scorer, out: Path, reasons: dict[int, str], source_extra=None) -> dict:
    """Select, stitch and write one class; returns its journal record. `reasons`: plan row -> decode error;
    `source_extra(image_id) -> dict`: the loader's extra per-source facts for each cell (e.g. ffcv's stored size)."""
    name = index.classes[label]
    rows = plan.class_rows(label)
    failures = [{"path": index.paths[int(plan.image_ids[r])], "reason": reasons.get(int(r), "could not be decoded")}
                for r, good in zip(rows, ok.tolist()) if not good]
    record = {"label": label, "class": name, "planned": len(rows), "decoded": int(ok.sum()), "failures": failures}
    try:
        sel = select_cells(cfg, label, crops, ok, scorer, name)
    except UserError as exc:  # too few usable images: this class gets no output, the run goes on
        return {**record, "images": [], "fallback": 0, "skipped": str(exc)}
    device_rows = torch.from_numpy(sel.rows).to(crops.device)
    cells = crops[device_rows, torch.from_numpy(sel.crops).to(crops.device)]
    images = stitch(cells, cfg.ipc, cfg.factor, cfg.input_size).cpu()
    files = write_class_images(out, name, label, images, cfg.format, cfg.jpeg_quality)
    boxes_out = cell_boxes(cfg.input_size, cfg.factor)
    images_meta = []
    for j, rel in enumerate(files):
        cells_meta = []
        for c, box_out in enumerate(boxes_out):
            rank = rank_of_cell(j, c, cfg.ipc)
            row, crop = int(rows[sel.rows[rank]]), int(sel.crops[rank])
            image_id = int(plan.image_ids[row])
            cells_meta.append({
                "cell": c, "cell_box": list(box_out), "rank": rank, "source": index.paths[image_id],
                "source_size": index.sizes[image_id].tolist(), "box": plan.boxes[row, crop].tolist(), "crop": crop,
                "score": None if np.isnan(sel.scores[rank]) else float(sel.scores[rank]),
                **(source_extra(image_id) if source_extra else {}),
            })
        images_meta.append({"file": rel, "class": name, "label": label, "cells": cells_meta})
    return {**record, "images": images_meta, "fallback": sel.fallback}


def _versions() -> dict:
    return {"rded_fast": rded_fast.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def _run_parameters(cfg: DistillConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in NOT_OUTPUT_RELEVANT}


def _prologue(cfg: DistillConfig, out: Path, device: torch.device) -> tuple[DatasetIndex, BuiltModel, object, dict | None]:
    """Rank 0's work before any class: index, observer, its check, then the output folder and journal.

    The folder is created only after the checks pass, so a refused run leaves nothing behind."""
    prepare_out_dir(out, cfg.overwrite, cfg.resume, create=False)
    class_map = restrict_class_map(read_class_map(cfg.class_map), cfg.data) if cfg.class_map else None
    index = open_index(cfg.loader, cfg.data, class_map=class_map, cache=cfg.index, show_progress=cfg.show_progress)
    if len(index) == 0:
        raise UserError(f"--data {cfg.data}: no readable images found")
    observer, scorer = _observer(cfg, index, device)
    check = check_observer(index, cfg, scorer, device) if cfg.select == "rded" else None
    prepare_out_dir(out, cfg.overwrite, cfg.resume)
    if cfg.resume and (journal.journal_dir(out) / "run.json").is_file():
        journal.check_run(out, _run_parameters(cfg))
    else:
        journal.write_run(out, _run_parameters(cfg))
    save_index(index, out / "index.json")
    return index, observer, scorer, check


def _observer(cfg: DistillConfig, index: DatasetIndex, device: torch.device):
    class_map = read_class_map(cfg.class_map) if cfg.class_map else None  # may name classes the data lacks
    observer = build(cfg.observer, index.num_classes, cfg.weights, cfg.input_size, classes=index.classes,
                     class_map=class_map)
    if cfg.score_mode == "native":
        check_native_input(observer, cfg.input_size // cfg.factor, device)
    compile_on = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    scorer = make_scorer(observer.model, cfg.input_size, device, amp_dtype=resolve_amp(cfg.amp),
                         compile=compile_on, batch_size=cfg.batch_size * cfg.num_crop, native=cfg.score_mode == "native",
                         mean=observer.mean, std=observer.std)
    return observer, scorer


def _collective(world: World, fn, message: str):
    """Run fn() (None on failure); if any rank failed, every rank stops: the failing one with its error."""
    error, value = None, None
    try:
        value = fn()
    except BaseException as exc:
        error = exc
    if not all_ok(world, error is None):
        if error is not None:
            raise error
        raise UserError(message)
    return value


def distill(cfg: DistillConfig) -> DistillResult:
    """Distill `cfg.data` into `cfg.ipc` images per class under `cfg.out`; see the module docstring."""
    validate(cfg)
    t0 = time.perf_counter()
    world = init_world(resolve_device(cfg.device).type)
    device = resolve_device(cfg.device, world.local_rank if world.size > 1 else None)
    out = Path(cfg.out).resolve()
    seconds: dict[str, float] = {}
    index = observer = scorer = check = None
    if world.is_main:
        index, observer, scorer, check = _collective(world, lambda: _prologue(cfg, out, device), "")
    else:
        _collective(world, lambda: None, "rank 0 stopped before distilling; see its message")
        index = load_index(out / "index.json")
        observer, scorer = _observer(cfg, index, device)
    seconds["prologue"] = time.perf_counter() - t0

    t = time.perf_counter()
    done = journal.read_classes(out) if cfg.resume else {}
    counts = np.minimum(index.class_counts(), cfg.mipc)
    todo = [c for c in assign_classes(counts, world.size)[world.rank] if c not in done]

    def run_classes() -> None:
        plan = make_plan(index, cfg.seed, cfg.mipc, cfg.num_crop, classes=todo)
        loader = make_loader(cfg.loader, index, plan, cfg.input_size // cfg.factor, batch_size=cfg.batch_size,
                             workers=cfg.workers, device=str(device))
        for label, crops, ok in progress(iter_classes(loader, plan), total=len(np.unique(plan.labels)),
                                         desc="distill classes", disable=not cfg.show_progress):
            reasons = {f["row"]: f["reason"] for f in loader.failures}
            journal.write_class(out, label, distill_class(cfg, index, plan, label, crops, ok, scorer, out, reasons,
                                                           getattr(loader, "source_extra", None)))
        for label in todo:  # classes with no planned image (empty folders) are journaled too
            if label not in plan.labels:
                journal.write_class(out, label, {"label": label, "class": index.classes[label], "planned": 0,
                                                 "decoded": 0, "failures": [], "images": [], "fallback": 0,
                                                 "skipped": "no usable images"})

    _collective(world, run_classes, "another rank failed; finished classes are journaled: rerun with --resume")
    seconds["classes"] = time.perf_counter() - t
    barrier(world)
    if not world.is_main:
        return DistillResult(out, out / "manifest.json", out / "contact_sheet.png", 0, None, 0, seconds, is_main=False)
    return _finish(cfg, index, observer, check, out, seconds, t0, world, resumed=sorted(done))


def _finish(cfg: DistillConfig, index: DatasetIndex, observer: BuiltModel, check: dict | None, out: Path,
            seconds: dict, t0: float, world: World, resumed: list[int]) -> DistillResult:
    """Rank 0: merge the class records into manifest.json and draw the contact sheet."""
    records = journal.read_classes(out)
    missing = [index.classes[c] for c in range(index.num_classes) if c not in records]
    if missing:
        raise UserError(f"classes {missing[:3]} have no journal record; rerun with --resume")
    ordered = [records[c] for c in range(index.num_classes)]
    images_meta = [m for r in ordered for m in r["images"]]
    sheet_rows = []
    for r in ordered:
        if r["images"] and len(sheet_rows) < 20:
            sheet_rows.append((r["class"], torch.stack([read_image(out / m["file"]) for m in r["images"]])))
    if sheet_rows:
        write_contact_sheet(out / "contact_sheet.png", sheet_rows)
    failures = [f for r in ordered for f in r["failures"]]
    short = short_classes(index, cfg.mipc)
    seconds["total"] = time.perf_counter() - t0
    manifest = {
        "tool": "rded-fast",
        "parameters": {**_run_parameters(cfg), "crop_size": cfg.input_size // cfg.factor,
                       "cells_per_class": cfg.ipc * cfg.factor**2, "scale": [0.08, 1.0], "ratio": [1.0, 1.0]},
        "versions": _versions(),
        "observer": {**observer.manifest(), "check": check,
                     "head_rows": dict(zip(index.classes, observer.head_rows))},
        "data": {"root": index.root, "images": len(index), "classes": index.classes,
                 "class_counts": index.class_counts().tolist()},
        "short_classes": short,
        "empty_classes": [name for name, count in short.items() if count == 0],
        "skipped_classes": {r["class"]: r["skipped"] for r in ordered if r.get("skipped")},
        "fallback_cells": {r["class"]: r["fallback"] for r in ordered if r["fallback"]},
        "skipped_files": index.skipped,
        "decode_failures": failures,
        "images": images_meta,
        "run": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": seconds,
                "world_size": world.size, "resumed_classes": len(resumed), "out": str(out)},
    }
    write_manifest(out / "manifest.json", manifest)
    return DistillResult(out=out, manifest=out / "manifest.json", contact_sheet=out / "contact_sheet.png",
                         num_images=len(images_meta), observer_accuracy=None if check is None else check["accuracy"],
                         decode_failures=len(failures), seconds=seconds)
