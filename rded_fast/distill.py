"""The distill pipeline: the one place that knows the order of the stages.

index -> plan -> observer check -> (load -> score -> select -> stitch -> write) per class -> manifest.

Classes stream through: the loader runs over the whole plan in batches, crops are buffered per class,
and when a class is complete it is scored in fixed-size chunks of its own crops, selected, stitched
from the buffered winners and written, then journaled. Because scoring never mixes classes, any
split of classes (over torchrun ranks, or before and after a crash) gives the same bytes.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision

import rded_fast
from rded_fast import heap, journal
from rded_fast.arguments import check_config, paths_as_strings
from rded_fast.chance import near_chance_threshold
from rded_fast.compile_rule import CHOICES as COMPILE_CHOICES, resolve_compile
from rded_fast.device import (
    AMP_CHOICES,
    amp_name,
    available_cores,
    check_fits,
    check_workers,
    cpu_description,
    device_name,
    resolve_amp,
    resolve_device,
)
from rded_fast.distributed import World, assign_classes, barrier, collective, init_world
from rded_fast.errors import UserError
from rded_fast.formats import Source, reading, reopen
from rded_fast.formats.folder import keep_index_cache
from rded_fast.host import HostStage, default_host_workers
from rded_fast.index import DatasetIndex, is_index_cache, load_index, read_class_map, save_index
from rded_fast.loaders import LOADER_CHOICES, CropLoader, make_loader, open_source, preload, resolve_loader
from rded_fast.manifest import as_manifest, build_manifest, summary_lines
from rded_fast.models import BuiltModel, build, check_input_size
from rded_fast.models.classes import restrict_class_map
from rded_fast.models.factory import factory_source
from rded_fast.models.heads import HeadTooSmall, find_head, split_head
from rded_fast.outputs import DISTILLED_SET, check_separate, check_writable_file, claim_output, note, resolve
from rded_fast.plan import CropPlan, make_center_plan, make_plan, short_classes
from rded_fast.progress import progress
from rded_fast.recipe import CONTACT_SHEET_CLASSES, CROP_SCALE, FACTOR, INPUT_SIZE, IPC, MIPC, NUM_CROP
from rded_fast.score import Scorer
from rded_fast.select import MORE_CROPS, ClassSelection, select_class, select_covering, select_random
from rded_fast.stitch import cell_boxes, rank_of_cell, stitch
from rded_fast.timing import Stopwatch
from rded_fast.write import (
    encode_class_images,
    image_name,
    prepare_out_dir,
    read_image,
    write_classes_files,
    write_contact_sheet,
    write_manifest,
)

CHECK_IMAGES = 300
SCORE_CHUNK_MAX = 512
# --select: RDED, RDED that covers the class, or a baseline. `rded-cover`: RDED's score, one cell from each of n
# groups of the class's images (k-means on the observer's features; rded_fast.select.select_covering);
# `random-crops`: random crops of random images, stitched like RDED's cells (the ablation of the observer's
# ranking); `random-images`: random whole images (their centred square), one per output image at the input size
# (the literature's "random" row); `random` = `random-crops`.
SELECT_CHOICES = ("rded", "rded-cover", "random-crops", "random-images", "random")
SCORED_SELECTIONS = ("rded", "rded-cover")  # the selections that run the observer over the crops
# Parameters that do not change the output: they may differ between an interrupted run and its resume.
NOT_OUTPUT_RELEVANT = ("out", "overwrite", "overwrite_any", "resume", "show_progress", "workers", "index", "prefetch")


@dataclass
class DistillConfig:
    """Every knob of a distill run; defaults are the reference's ImageNet-1K settings."""

    data: str
    out: str
    observer: str
    weights: str | None = None
    ipc: int = IPC
    factor: int = FACTOR
    mipc: int = MIPC
    num_crop: int = NUM_CROP
    # area fraction range of the random crops (RandomResizedCrop's scale; RDED's (0.08, 1)); (1, 1): whole images
    crop_scale: tuple[float, float] = CROP_SCALE
    input_size: int = INPUT_SIZE
    seed: int = 0
    batch_size: int = 64
    workers: int | None = None  # None: the cores available to this process
    device: str = "auto"
    loader: str = "auto"
    prefetch: int | None = None  # loader batches in flight; None: the loader's default for the device
    # DALI on CUDA: share of each batch for the hardware JPEG decoder. Pinned to 0 or 1 every image gets the
    # same decoder wherever it sits in a batch, so output bytes do not depend on batch size or resume.
    hw_decoder_load: float = 1.0
    format: str = "png"
    jpeg_quality: int = 90
    class_map: str | None = None
    index: str | None = None
    select: str = "rded"
    amp: str = "auto"
    compile: str = "auto"
    score_mode: str = "faithful"
    overwrite: bool = False
    overwrite_any: bool = False  # replace an --out that rded-fast did not write (moved aside until success)
    resume: bool = False
    skip_observer_check: bool = False
    show_progress: bool = True


@dataclass
class DistillResult:
    out: Path
    manifest: Path
    contact_sheet: Path | None  # None when no class got an image (no sheet is drawn) and on ranks other than 0
    num_images: int
    observer_accuracy: float | None
    decode_failures: int
    seconds: dict = field(default_factory=dict)
    is_main: bool = True  # False on torchrun ranks other than 0, which write no manifest
    notes: list[str] = field(default_factory=list)  # the manifest's summary (rded_fast.manifest.summary_lines)


# DistillConfig fields that name files or folders: a pathlib.Path is taken for them too (as a string)
PATH_FIELDS = ("data", "out", "weights", "class_map", "index")


def validate(cfg: DistillConfig) -> None:
    """One-line errors for impossible arguments, before any work: the command line's checks (types included, for
    the Python API: rded_fast.arguments), then the ranges and combinations."""
    check_config(cfg, PATH_FIELDS)
    checks = [
        (cfg.ipc >= 1, f"--ipc {cfg.ipc}: must be >= 1"),
        (cfg.factor >= 1, f"--factor {cfg.factor}: must be >= 1"),
        (cfg.mipc >= 1, f"--mipc {cfg.mipc}: must be >= 1"),
        (cfg.num_crop >= 1, f"--num-crop {cfg.num_crop}: must be >= 1"),
        (
            len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1,
            f"--crop-scale {','.join(map(str, cfg.crop_scale))}: must be MIN,MAX with 0 < MIN <= MAX <= 1",
        ),
        (cfg.input_size >= 1, f"--input-size {cfg.input_size}: must be >= 1"),
        (cfg.input_size // max(cfg.factor, 1) >= 1, f"--factor {cfg.factor}: larger than --input-size {cfg.input_size}"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size}: must be >= 1"),
        (cfg.workers is None or cfg.workers >= 0, f"--workers {cfg.workers}: must be >= 0"),
        (cfg.prefetch is None or cfg.prefetch >= 1, f"--prefetch {cfg.prefetch}: must be >= 1"),
        (0.0 <= cfg.hw_decoder_load <= 1.0, f"--hw-decoder-load {cfg.hw_decoder_load}: must be in 0..1"),
        (cfg.loader in LOADER_CHOICES, f"--loader {cfg.loader}: choose one of {', '.join(LOADER_CHOICES)}"),
        (cfg.format in ("png", "jpg"), f"--format {cfg.format}: choose png or jpg"),
        (1 <= cfg.jpeg_quality <= 100, f"--jpeg-quality {cfg.jpeg_quality}: must be in 1..100"),
        (cfg.select in SELECT_CHOICES, f"--select {cfg.select}: choose one of {', '.join(SELECT_CHOICES)}"),
        (cfg.amp in AMP_CHOICES, f"--amp {cfg.amp}: choose one of {', '.join(AMP_CHOICES)}"),
        (cfg.compile in COMPILE_CHOICES, f"--compile {cfg.compile}: choose {', '.join(COMPILE_CHOICES)}"),
        (cfg.score_mode in ("faithful", "native"), f"--score-mode {cfg.score_mode}: choose faithful or native"),
        (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), f"--device {cfg.device}: choose auto, cpu or cuda"),
        (
            not (cfg.resume and (cfg.overwrite or cfg.overwrite_any)),
            f"--resume and {'--overwrite-any' if cfg.overwrite_any else '--overwrite'} exclude each other: --resume "
            "continues the run in --out, the other replaces it; give one",
        ),
        (0 <= cfg.seed < 2**63, f"--seed {cfg.seed}: must be in 0..2^63-1"),
    ]
    if cfg.select != "random-images":
        checks.append(
            (
                not (float(cfg.crop_scale[0]) >= 1 and cfg.num_crop > 1),
                f"--crop-scale 1 with --num-crop {cfg.num_crop}: every crop is the whole image (its centred square), so "
                f"the {cfg.num_crop} crops of an image would be the same; pass --num-crop 1 (a larger --mipc gives more "
                "candidates)",
            )
        )
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_workers(cfg.workers)
    check_input_size(cfg.observer, cfg.input_size)
    if cfg.ipc * cfg.factor**2 > cfg.mipc * cfg.num_crop:
        raise UserError(
            f"--ipc {cfg.ipc} --factor {cfg.factor} needs {cfg.ipc * cfg.factor**2} cells per class but "
            f"--mipc {cfg.mipc} x --num-crop {cfg.num_crop} gives at most {cfg.mipc * cfg.num_crop}"
        )


def note_ignored(cfg: DistillConfig) -> None:
    """A note naming the crop arguments `--select random-images` does not use (one whole image per output image),
    when they were given other values than their defaults and than the ones it uses."""
    if cfg.select != "random-images":
        return
    given = [
        f"{flag} {shown}"
        for flag, value, default, used, shown in (
            ("--factor", cfg.factor, FACTOR, 1, cfg.factor),
            ("--num-crop", cfg.num_crop, NUM_CROP, 1, cfg.num_crop),
            ("--crop-scale", tuple(cfg.crop_scale), CROP_SCALE, (1.0, 1.0), ",".join(f"{v:g}" for v in cfg.crop_scale)),
        )
        if value != default and value != used
    ]
    if given:
        note(
            f"--select random-images uses one whole image (its centred square) per output image at --input-size: "
            f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply and {'is' if len(given) == 1 else 'are'} ignored"
        )


def resolve_auto(cfg: DistillConfig, device: torch.device) -> DistillConfig:
    """The config with `auto`/None knobs that change what runs made concrete: the loader, the worker count."""
    workers = available_cores() if cfg.workers is None else cfg.workers
    cfg = replace(cfg, loader=resolve_loader(cfg.loader, cfg.data, device), workers=workers)
    if cfg.select == "random":
        cfg = replace(cfg, select="random-crops")
    if cfg.select == "random-images":  # one whole image per output image: no cells, no crops to choose from
        cfg = replace(cfg, factor=1, num_crop=1, crop_scale=(1.0, 1.0))
    return cfg


def score_chunk(mipc: int, num_crop: int) -> int:
    """Crops per observer call: a full class (mipc x num_crop crops) split into equal chunks of at most
    SCORE_CHUNK_MAX. It depends on output-relevant parameters only, never on --batch-size: on a GPU the
    kernels, and so the last bits of each score, depend on the batch shape, and the selection must not."""
    crops = mipc * num_crop
    return -(-crops // -(-crops // SCORE_CHUNK_MAX))


def check_memory(cfg: DistillConfig, plan: CropPlan, num_classes: int, device: torch.device) -> None:
    """Refuse, before any decoding, an --input-size whose smallest working set cannot fit on `device`: the float
    input of one scoring chunk beside the larger of the observer check's uint8 crops and the largest class's uint8
    crops (a random baseline: that class's crops and its stitched images). Counted from `plan` (usable images
    only), without the observer and its activations: a lower bound, so what it refuses could never run."""
    s, p = cfg.input_size, cfg.input_size // cfg.factor
    per_class = np.bincount(plan.labels, minlength=num_classes)
    class_crops = int(per_class.max(initial=0)) * plan.num_crop
    if cfg.select not in SCORED_SELECTIONS:
        need, what = class_crops * 3 * p * p + cfg.ipc * 3 * s * s, f"holding a class's {class_crops} crops"
    else:
        size = p if cfg.score_mode == "native" else s
        chunk = min(score_chunk(cfg.mipc, cfg.num_crop), class_crops)
        check = int(np.minimum(per_class, math.ceil(CHECK_IMAGES / num_classes)).sum())
        need = 12 * chunk * size * size + max(class_crops * 3 * p * p, check * 3 * s * s)
        what = f"scoring {chunk} crops at a time at {size}x{size} px"
    check_fits(need, device, f"--input-size {s}: {what}", "lower --input-size (or --mipc, --num-crop)")


def iter_classes(
    loader: CropLoader, plan: CropPlan, device: torch.device | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, dict[int, str]]]:
    """Regroup the loader's batches by class: yields (label, crops [m, K, 3, p, p], ok [m], reasons) in plan
    order, each as soon as all of the class's planned rows have arrived; `reasons` maps the class's failed
    plan rows to why they failed.

    A class's rows are contiguous in plan order and batches arrive in plan order, so each batch is cut into
    slices by position alone (no per-label index, no host sync). Each slice is copied into its class's
    buffer at once, so the loader may reuse its batch buffers; the buffer is on `device` when that is
    CUDA (the copy from a pinned batch is asynchronous), else where the loader's crops are. `ok` is on the CPU."""
    labels = plan.labels
    if len(labels) == 0:
        return
    change = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], change]).tolist()
    ends = np.concatenate([change, [len(labels)]]).tolist()
    seg, pos = 0, 0
    crops_out = ok_out = None
    reasons: dict[int, str] = {}  # failed plan rows seen and not yet handed out with their class
    for batch in loader:
        reasons.update(batch.reasons)
        n = len(batch.rows)
        off = 0
        while off < n:
            start, end = starts[seg], ends[seg]
            if crops_out is None:
                where = device if device is not None and device.type == "cuda" else batch.crops.device
                crops_out = torch.empty((end - start, *batch.crops.shape[1:]), dtype=batch.crops.dtype, device=where)
                ok_out = torch.zeros(end - start, dtype=torch.bool)
            take = min(end - pos - off, n - off)
            at = pos + off - start
            crops_out[at : at + take].copy_(batch.crops[off : off + take], non_blocking=True)
            ok_out[at : at + take] = batch.ok[off : off + take]
            off += take
            if pos + off == end:
                mine = {r: reasons.pop(r) for r in [r for r in reasons if start <= r < end]}
                yield int(labels[start]), crops_out, ok_out, mine
                crops_out = ok_out = None
                seg += 1
        pos += n


def check_observer(source: Source, cfg: DistillConfig, scorer: Scorer, device: torch.device) -> dict:
    """Top-1 of the observer on centred crops of a sample of training images; refuse when near chance.

    One batched pass: every decodable check image with its own label, in full scoring chunks (no per-class
    padding), counted on the device with one host sync at the end."""
    index = source.index
    per_class = max(1, math.ceil(CHECK_IMAGES / index.num_classes))
    plan = make_center_plan(index, cfg.seed, per_class)
    loader = make_loader(
        cfg.loader,
        source,
        plan,
        cfg.input_size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        device=str(device),
        prefetch=cfg.prefetch,
        options={"hw_decoder_load": cfg.hw_decoder_load},
    )
    crops, ok, pos = None, np.zeros(len(plan), bool), 0
    for batch in progress(loader, total=len(loader), desc="observer check", disable=not cfg.show_progress):
        n = len(batch.rows)
        if crops is None:
            where = device if device.type == "cuda" else batch.crops.device
            crops = torch.empty((len(plan), *batch.crops.shape[2:]), dtype=batch.crops.dtype, device=where)
        crops[pos : pos + n].copy_(batch.crops[:, 0], non_blocking=True)
        ok[pos : pos + n] = batch.ok.numpy()
        pos += n
    keep = np.flatnonzero(ok)
    decoded = len(keep)
    correct = 0
    if decoded:
        labels = torch.from_numpy(plan.labels[keep])
        rows = torch.from_numpy(keep)
        # eager: compiling the observer a second time, for this crop size, costs more than these few hundred crops
        # (5.5 s of a cold compile of ResNet-18 on a 2-core EPYC; the class stage's size is compiled already)
        scores, preds = scorer(crops[rows.to(crops.device)], labels.to(scorer.device), eager=True)
        correct = int((preds == labels.to(preds.device)).sum())
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise nonfinite_scores(cfg, bad, decoded, "training images in the observer check")
    accuracy = correct / decoded if decoded else 0.0
    chance = 1.0 / index.num_classes
    threshold = near_chance_threshold(index.num_classes, decoded)
    report = {"accuracy": accuracy, "chance": chance, "threshold": threshold, "images": decoded}
    if not cfg.skip_observer_check and accuracy < threshold and cfg.weights is None:
        raise UserError(
            f"observer {cfg.observer} gets {accuracy:.1%} top-1, near chance ({chance:.1%}): it has no "
            "--weights, so it is randomly initialised; pass --weights (a weights name or a checkpoint)"
        )
    if not cfg.skip_observer_check and accuracy < threshold:
        raise UserError(
            f"observer {cfg.observer} gets {accuracy:.1%} top-1 on {decoded} training images, near chance "
            f"({chance:.1%}; refusing below {threshold:.1%}). Likely cause: class order. The folders are "
            "taken in sorted order unless --class-map FILE lists them in the observer's output order; also "
            "check --weights and --input-size. --skip-observer-check overrides."
        )
    return report


def check_observer_input(observer: BuiltModel, cfg: DistillConfig, device: torch.device) -> None:
    """One image of the size the scorer will feed (--input-size; --score-mode native: the p x p crop) through the
    observer, so that a size it cannot take is one line naming the argument, not a traceback mid-run."""
    size = cfg.input_size // cfg.factor if cfg.score_mode == "native" else cfg.input_size
    try:
        with torch.inference_mode():
            observer.model.to(device)(torch.zeros(1, 3, size, size, device=device))
    except (RuntimeError, ValueError, MemoryError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if cfg.score_mode == "native":
            raise UserError(
                f"--score-mode native: observer {observer.name} cannot take {size}x{size} inputs ({first}); use --score-mode faithful"
            ) from exc
        raise UserError(f"--input-size {size}: observer {observer.name} cannot take {size}x{size} inputs ({first})") from exc


def nonfinite_scores(cfg: DistillConfig, bad: int, total: int, where: str) -> UserError:
    """The error for observer scores that are NaN or infinite (NaN logits, or an fp16 overflow)."""
    fix = (
        "--amp fp16 overflows in this observer: use --amp bf16 or --amp none"
        if cfg.amp == "fp16"
        else "check the observer and its --weights"
    )
    return UserError(f"observer {cfg.observer} gives NaN or infinite scores for {bad} of {total} {where}; {fix}")


def score_class(cfg: DistillConfig, label: int, crops: torch.Tensor, scorer: Scorer) -> dict[str, torch.Tensor] | None:
    """Score one class's crops [m, K, 3, p, p] on the scorer's device -> {"scores": [m, K] float32} (None for a
    random baseline); a scorer with features adds "similarity": [m, m], the cosine similarity of the features of
    each row's best crop (argmin of its scores), computed on the device so the host gets m^2 numbers instead of
    m x D. Queues device work only: no host sync."""
    if cfg.select not in SCORED_SELECTIONS:
        return None
    m, k = crops.shape[:2]
    labels = torch.full((m * k,), label, dtype=torch.int64, device=scorer.device)
    flat = crops.reshape(m * k, *crops.shape[2:])
    if not scorer.features:
        return {"scores": scorer(flat, labels)[0].view(m, k)}
    scores, _, feats = scorer.with_features(flat, labels)
    scores = scores.view(m, k)
    best = F.normalize(feats[scores.argmin(1) + torch.arange(m, device=scores.device) * k], dim=1)
    return {"scores": scores, "similarity": best @ best.T}


def to_host(scored: dict[str, torch.Tensor] | None) -> Callable[[], dict[str, np.ndarray] | None]:
    """Start copying a class's scores (and features) to the host (asynchronously from a CUDA device); returns a
    function that waits for that copy alone and gives numpy arrays. Called on the scoring thread, waited for on
    the host stage."""
    if scored is None:
        return lambda: None
    if next(iter(scored.values())).device.type != "cuda":
        return lambda: {name: t.numpy() for name, t in scored.items()}
    host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for name, t in scored.items()}
    for name, t in scored.items():
        host[name].copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> dict[str, np.ndarray]:
        done.synchronize()
        return {name: t.numpy() for name, t in host.items()}

    return wait


def select_cells(
    cfg: DistillConfig, label: int, scored: dict[str, np.ndarray] | None, ok: torch.Tensor, num_crop: int, name: str
) -> ClassSelection | str:
    """Rank one class's crops (by the observer's scores [m, K], spread over groups of its features for
    rded-cover, or randomly for a baseline); rows are class-local. A string is the reason the class gets no
    selection."""
    n = cfg.ipc * cfg.factor**2
    if scored is None:
        return select_random(ok.numpy(), label, num_crop, n, cfg.seed, name)
    usable = ok.numpy()
    scores = scored["scores"]
    bad = int((~np.isfinite(scores[usable])).sum())
    if bad:  # checked here, where the scores are on the host already: no sync in the scoring loop
        raise nonfinite_scores(cfg, bad, scores[usable].size, f"crops of class {name}")
    scores = np.where(usable[:, None], scores, np.inf)
    # at --crop-scale 1 every crop of an image is the same: more of them would only repeat it
    fix = "lower --ipc or --factor (at --crop-scale 1 every crop of an image is the same)" if whole_images(cfg) else MORE_CROPS
    if cfg.select == "rded-cover":
        return select_covering(scores, scored["similarity"], np.arange(len(scores)), label, n, cfg.seed, name, fix)
    return select_class(scores, np.arange(len(scores)), label, n, name, fix)


def whole_images(cfg: DistillConfig) -> bool:
    """--crop-scale 1: every crop is its image's whole (centred, ratio-clamped) square, the same each time."""
    return float(cfg.crop_scale[0]) >= 1.0


@dataclass
class PreparedClass:
    """One class ready to be committed: its journal record and its encoded images (none when skipped)."""

    label: int
    name: str
    record: dict
    payloads: list[bytes]


def image_records(
    cfg: DistillConfig,
    index: DatasetIndex,
    plan: CropPlan,
    label: int,
    rows: np.ndarray,
    sel: ClassSelection,
    count: int,
    source_extra: Callable[[int], dict],
) -> list[dict]:
    """The manifest's record of each of a class's `count` output images: its file and, per cell, where the cell
    sits, which source and box it was cut from, its score, and (rded-cover) its group of the class's images and
    that group's size."""
    name = index.classes[label]
    records = []
    for j in range(count):
        cells = []
        for c, box_out in enumerate(cell_boxes(cfg.input_size, cfg.factor)):
            rank = rank_of_cell(j, c, cfg.ipc)
            row, crop = int(rows[sel.rows[rank]]), int(sel.crops[rank])
            image_id = int(plan.image_ids[row])
            score = None if np.isnan(sel.scores[rank]) else float(sel.scores[rank])
            group = {} if sel.groups is None else {"group": int(sel.groups[rank]), "group_size": int(sel.group_sizes[rank])}
            cells.append(
                {
                    "cell": c,
                    "cell_box": list(box_out),
                    "rank": rank,
                    "source": index.paths[image_id],
                    "source_size": index.sizes[image_id].tolist(),
                    "box": plan.boxes[row, crop].tolist(),
                    "crop": crop,
                    "score": score,
                    **group,
                    **source_extra(image_id),
                }
            )
        records.append({"file": f"{name}/{image_name(label, j, cfg.format)}", "class": name, "label": label, "cells": cells})
    return records


def prepare_class(
    cfg: DistillConfig,
    index: DatasetIndex,
    plan: CropPlan,
    label: int,
    crops: torch.Tensor,
    ok: torch.Tensor,
    scored: Callable[[], dict[str, np.ndarray] | None],
    reasons: dict[int, str],
    source_extra: Callable[[int], dict] = lambda image_id: {},
) -> PreparedClass:
    """Select, stitch and encode one class (host stage). `scored()` waits for the class's scores (`score_class`); `reasons`:
    plan row -> decode error; `source_extra(image_id) -> dict`: the loader's extra per-source facts for each
    cell (e.g. ffcv's stored size)."""
    name = index.classes[label]
    rows = plan.class_rows(label)
    failures = [
        {"path": index.paths[int(plan.image_ids[r])], "reason": reasons.get(int(r), "could not be decoded")}
        for r, good in zip(rows, ok.tolist())
        if not good
    ]
    record = {
        "label": label,
        "class": name,
        "planned": len(rows),
        "decoded": int(ok.sum()),
        "failures": failures,
        "sources": journal.sources_fingerprint(index, label),
    }
    sel = select_cells(cfg, label, scored(), ok, crops.shape[1], name)
    if isinstance(sel, str):  # too few usable images: this class gets no output, the run goes on
        return PreparedClass(label, name, {**record, "images": [], "fallback": 0, "skipped": sel}, [])
    device_rows = torch.from_numpy(sel.rows).to(crops.device)
    cells = crops[device_rows, torch.from_numpy(sel.crops).to(crops.device)]
    images = stitch(cells, cfg.ipc, cfg.factor, cfg.input_size).cpu()
    payloads = encode_class_images(images, cfg.format, cfg.jpeg_quality)
    images_meta = image_records(cfg, index, plan, label, rows, sel, len(payloads), source_extra)
    return PreparedClass(label, name, {**record, "images": images_meta, "fallback": sel.fallback}, payloads)


def commit_classes(cfg: DistillConfig, out: Path, prepared: list[PreparedClass]) -> None:
    """Write prepared classes' files durably, then journal them (the order the resume guarantee rests on);
    one durability pass for the files of all of them, one for their records."""
    write_classes_files(out, [(p.name, p.label, p.payloads) for p in prepared if p.payloads], cfg.format)
    journal.write_classes(out, [p.record for p in prepared])


def _versions() -> dict:
    return {
        "rded_fast": rded_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def _run_parameters(cfg: DistillConfig) -> dict:
    """The output-relevant parameters as JSON gives them back (tuples as lists), so a resume compares like with like."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k not in NOT_OUTPUT_RELEVANT}


def _journal_run(cfg: DistillConfig, index: DatasetIndex, observer: BuiltModel, scorer: Scorer, device: torch.device) -> dict:
    """Everything that decides the output besides the source images (whose changes the class records catch): the
    parameters (paths resolved, so a resume from another working directory matches), the class order (label ->
    folder: a class map reordered in place, or a class folder added, renumbers the classes and their files), the
    observer's weights, factory code and class rows, the library versions, and where and in which precision it
    scores. A --resume must match all of it."""
    versions = {k: v for k, v in _versions().items() if k != "python"}
    paths = {k: str(resolve(v)) for k in journal.PATH_KEYS if isinstance(v := getattr(cfg, k), str) and os.path.exists(v)}
    return {
        **_run_parameters(cfg),
        **paths,
        "classes": list(index.classes),
        "observer": {
            "weights_sha256": observer.weights_sha256,
            "factory_sha256": observer.origin.get("file_sha256"),
            "head_rows": list(observer.head_rows),
        },
        "versions": versions,
        "scored_on": {"device": device.type, **scoring_choices(scorer)},
    }


def scoring_choices(scorer: Scorer) -> dict:
    """What `--amp auto` and `--compile auto` resolved to: both decide the scores (a CPU with native bf16 picks
    other cells than fp32), so a resume must match them and the manifest records them."""
    return {"amp": amp_name(scorer.amp_dtype), "compile": scorer.compiled}


def plan_classes(cfg: DistillConfig, index: DatasetIndex, classes: list[int], show_progress: bool = False) -> CropPlan:
    """The plan of `classes`: crops for RDED and random-crops, whole images for random-images."""
    if cfg.select == "random-images":
        return make_center_plan(index, cfg.seed, cfg.mipc, classes=classes, show_progress=show_progress)
    return make_plan(
        index, cfg.seed, cfg.mipc, cfg.num_crop, classes=classes, scale=tuple(cfg.crop_scale), show_progress=show_progress
    )


def _prologue(
    cfg: DistillConfig, out: Path, device: torch.device, seconds: dict[str, float]
) -> tuple[DatasetIndex, CropPlan, BuiltModel, Scorer, dict | None]:
    """Rank 0's work before any class: index, the plan of every class (which reads the headers it needs from a
    lazy index), observer, its check, then the output folder, journal and index files (`seconds` gets each
    part's time). The folder is created only after the checks pass, so a refused run leaves nothing behind."""
    t = time.perf_counter()
    prepare_out_dir(out, cfg.overwrite, cfg.resume, create=False)
    class_map = restrict_class_map(read_class_map(cfg.class_map), cfg.data) if cfg.class_map else None
    source = open_source(cfg.loader, cfg.data, class_map=class_map, cache=cfg.index, show_progress=cfg.show_progress)
    index = source.index
    if len(index) == 0:
        raise UserError(f"--data {cfg.data}: no image files found")
    stamps = None if index.stamps is None else index.stamps.copy()
    seconds["index"], t = time.perf_counter() - t, time.perf_counter()
    plan = plan_classes(cfg, index, list(range(index.num_classes)), cfg.show_progress)
    if len(plan) == 0:
        raise UserError(f"--data {cfg.data}: no readable images found")
    check_crops_fit(cfg, index, plan)
    check_memory(cfg, plan, index.num_classes, device)
    seconds["plan"], t = time.perf_counter() - t, time.perf_counter()
    observer, scorer = _observer(cfg, index, device)
    check = check_observer(source, cfg, scorer, device) if cfg.select in SCORED_SELECTIONS else None
    seconds["check"] = time.perf_counter() - t - scorer.compile_seconds
    prepare_out_dir(out, cfg.overwrite, cfg.resume)
    run = _journal_run(cfg, index, observer, scorer, device)
    if cfg.resume and (journal.journal_dir(out) / "run.json").is_file():
        journal.check_run(out, run)
    else:
        journal.write_run(out, run)
    save_index(replace(index, folders=None), out / "index.npz")  # ranks > 0 read it; folder times are no output
    if cfg.index and stamps is not None and not np.array_equal(stamps, index.stamps):  # keep the headers read
        keep_index_cache(index, cfg.index)
    return source, plan, observer, scorer, check


def check_crops_fit(cfg: DistillConfig, index: DatasetIndex, plan: CropPlan) -> None:
    """Refuse a --crop-scale whose largest crop is under one pixel on a planned image: there torchvision's rule
    falls back to the whole image for every crop, so the run would silently score whole images."""
    if cfg.select == "random-images" or len(plan) == 0:
        return
    sizes = index.sizes[plan.image_ids]
    area = sizes[:, 0] * sizes[:, 1]
    small = area * float(cfg.crop_scale[1]) < 1
    if small.any():
        i = int(np.argmin(area))
        w, h = (int(v) for v in sizes[i])
        raise UserError(
            f"--crop-scale {','.join(f'{v:g}' for v in cfg.crop_scale)}: its largest crop is under one pixel on "
            f"{int(small.sum())} planned image(s) (e.g. {index.paths[plan.image_ids[i]]}, {w}x{h}), which would be "
            f"used whole instead; give a MAX of at least {1 / (w * h):.2g}, or RDED's 0.08,1"
        )


def _observer(cfg: DistillConfig, index: DatasetIndex, device: torch.device) -> tuple[BuiltModel, Scorer]:
    """The observer and its scorer, warmed for the classes' crop size (the observer check scores eagerly), so no
    compile happens inside a timed class; the seconds are in `scorer.compile_seconds`."""
    class_map = read_class_map(cfg.class_map) if cfg.class_map else None  # may name classes the data lacks
    try:
        observer = build(cfg.observer, index.num_classes, cfg.weights, cfg.input_size, classes=index.classes, class_map=class_map)
    except HeadTooSmall as exc:  # empty class folders count as classes: say so when they are why the head is short
        note = index.empty_note()
        raise UserError(f"{exc}" + (f"; {note}" if note else "")) from exc
    check_observer_input(observer, cfg, device)
    crops = int(np.minimum(index.class_counts(), cfg.mipc).sum()) * cfg.num_crop
    scorer = make_scorer(cfg, observer, device, crops)
    if cfg.select in SCORED_SELECTIONS:
        scorer.warm(cfg.input_size // cfg.factor)
    return observer, scorer


def make_scorer(cfg: DistillConfig, observer: BuiltModel, device: torch.device, crops: int) -> Scorer:
    """The run's scorer for `observer` (not warmed); `crops`: how many the run scores (for --compile auto).
    For rded-cover the observer is split at its head, so the pass that scores a crop also gives its features."""
    model, head = observer.model, None
    if cfg.select == "rded-cover":
        if find_head(model) is None:
            raise UserError(
                f"--select rded-cover: observer {observer.name} has no Linear classifier head, and rded-cover groups a "
                "class's images by the features such a head reads (its input); use --select rded, which scores with "
                "any observer, or an observer whose last layer is nn.Linear"
            )
        model, head = split_head(model, cfg.input_size)
    return Scorer(
        model,
        cfg.input_size,
        device,
        amp_dtype=resolve_amp(cfg.amp, device),
        compile=resolve_compile(cfg.compile, device, "distill", crops),
        batch_size=score_chunk(cfg.mipc, cfg.num_crop),
        native=cfg.score_mode == "native",
        mean=observer.mean,
        std=observer.std,
        head=head,
    )


def check_index_path(cfg: DistillConfig) -> None:
    """The --index cache is read and written: a file name outside the data and outside --out (an output folder is
    replaced as a whole), and, when it exists, an index cache of ours (used as it is where it cannot be rewritten:
    read-only storage); when it does not, in a writable folder."""
    where, out = resolve(cfg.index), resolve(cfg.out)
    if str(cfg.index) and where.is_relative_to(out):
        raise UserError(
            f"--index {cfg.index} lies in --out {cfg.out} ({where} is inside {out}); keep the index cache outside the "
            f"output folder, e.g. {out.parent / where.name}"
        )
    if not where.is_file():
        check_writable_file(cfg.index, "--index")
    check_separate(cfg.index, "--index", {"--data": cfg.data}, "file")
    if where.is_file() and not is_index_cache(where):
        raise UserError(f"--index {cfg.index}: not an index cache of rded-fast (rded-fast did not write it); give another path")


def distill(cfg: DistillConfig) -> DistillResult:
    """Distill `cfg.data` into `cfg.ipc` images per class under `cfg.out`; see the module docstring.

    Rank 0 first claims `--out` (rded_fast.outputs: no overlap with the inputs, replace only our own
    output, moved aside until this run succeeds, one process at a time)."""
    cfg = paths_as_strings(cfg, PATH_FIELDS)
    validate(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        with reading(cfg.data):
            return _distill(cfg)
    note_ignored(cfg)
    inputs = {
        "--data": cfg.data,
        "--weights": cfg.weights if cfg.weights and os.path.exists(cfg.weights) else None,
        "--class-map": cfg.class_map,
        "--observer": factory_source(cfg.observer),  # a MODULE:FACTORY file inside --out would be moved away unread
    }
    if cfg.index is not None:
        check_index_path(cfg)
    with (
        reading(cfg.data),  # a convert must not rewrite the source under this run
        claim_output(
            cfg.out,
            "--out",
            inputs,
            DISTILLED_SET,
            overwrite=cfg.overwrite,
            overwrite_any=cfg.overwrite_any,
            resume=cfg.resume,
            replace_hint="pass --overwrite to replace it or --resume to continue it",
        ),
    ):
        return _distill(cfg)


def run_classes(
    cfg: DistillConfig,
    source: Source,
    plan: CropPlan,
    scorer: Scorer,
    todo: list[int],
    out: Path,
    device: torch.device,
    watch: Stopwatch,
) -> None:
    """Decode, score, select, stitch, write and journal the classes `todo` (this rank's share; `plan` holds their
    rows); `watch` gets the time of each part."""
    index = source.index
    planned = set(np.unique(plan.labels).tolist())
    loader = make_loader(
        cfg.loader,
        source,
        plan,
        cfg.input_size // cfg.factor,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        device=str(device),
        prefetch=cfg.prefetch,
        reuse_buffers=True,
        options={"hw_decoder_load": cfg.hw_decoder_load},
    )
    prepare = watch.timed("select_stitch_encode", prepare_class)
    with HostStage(watch.timed("write", functools.partial(commit_classes, cfg, out)), default_host_workers(device)) as host:
        classes = watch.waiting("decode_wait", iter_classes(loader, plan, device))
        for label, crops, ok, reasons in progress(
            classes, total=len(planned), desc="distill classes", disable=not cfg.show_progress
        ):
            scored = to_host(watch.timed("score", score_class)(cfg, label, crops, scorer))
            host.submit(functools.partial(prepare, cfg, index, plan, label, crops, ok, scored, reasons, loader.source_extra))
        watch.add("host_wait", host.waited)
    for key, value in loader.timings().items():  # the loader's side work (DALI: its JPEG check, and the wait for it)
        watch.add(key, value)
    for label in todo:  # classes with no planned image (empty folders) are journaled too
        if label not in planned:
            record = {
                "label": label,
                "class": index.classes[label],
                "planned": 0,
                "decoded": 0,
                "failures": [],
                "images": [],
                "fallback": 0,
                "skipped": "no usable images",
            }
            journal.write_class(out, label, record, index=index)


def _distill(cfg: DistillConfig) -> DistillResult:
    t0 = time.perf_counter()
    world = init_world(resolve_device(cfg.device).type)
    device = resolve_device(cfg.device, world.local_rank if world.size > 1 else None)
    cfg = resolve_auto(cfg, device)
    preload(cfg.loader)  # its import overlaps the prologue
    out = Path(cfg.out).resolve()
    seconds: dict[str, float] = {}
    source = plan = observer = scorer = check = None
    if world.is_main:
        source, plan, observer, scorer, check = collective(world, lambda: _prologue(cfg, out, device, seconds), "")
        index = source.index
    else:
        collective(world, lambda: None, "rank 0 stopped before distilling; see its message")
        index = load_index(out / "index.npz")  # with every header rank 0's plan read: this plan reads none
        source = reopen(cfg.data, index)
        plan = plan_classes(cfg, index, list(range(index.num_classes)))
        observer, scorer = _observer(cfg, index, device)
    seconds["compile"] = scorer.compile_seconds
    seconds["prologue"] = time.perf_counter() - t0 - scorer.compile_seconds

    t = time.perf_counter()
    records = journal.read_classes(out) if cfg.resume else {}
    done = journal.still_current(out, records, index) if cfg.resume else {}
    counts = np.minimum(index.class_counts(), cfg.mipc)
    todo = [c for c in assign_classes(counts, world.size)[world.rank] if c not in done]
    journal.forget_classes(out, [records[c] for c in todo if c in records])  # each rank its own classes' old files
    watch = Stopwatch()
    run = functools.partial(run_classes, cfg, source, plan.only(todo), scorer, todo, out, device, watch)
    with heap.frozen():  # no full collection over the setup's objects, here or in forked loader workers
        collective(world, run, "another rank failed; finished classes are journaled: rerun with --resume")
    seconds["classes"] = time.perf_counter() - t
    seconds.update(watch.seconds)
    barrier(world)
    if not world.is_main:
        return DistillResult(out, out / "manifest.json", None, 0, None, 0, seconds, is_main=False)
    scoring = {**scoring_choices(scorer), "device": device_name(device), "cpu": cpu_description()}
    return _finish(cfg, index, observer, check, out, seconds, t0, world, resumed=sorted(done), scoring=scoring)


def _finish(
    cfg: DistillConfig,
    index: DatasetIndex,
    observer: BuiltModel,
    check: dict | None,
    out: Path,
    seconds: dict,
    t0: float,
    world: World,
    resumed: list[int],
    scoring: dict,
) -> DistillResult:
    """Rank 0: merge the class records into manifest.json and draw the contact sheet; `scoring` says how the observer
    scored (resolved amp and compile, the device, the CPU)."""
    records = journal.read_classes(out)
    missing = [index.classes[c] for c in range(index.num_classes) if c not in records]
    if missing:
        raise UserError(f"classes {missing[:3]} have no journal record; rerun with --resume")
    ordered = [records[c] for c in range(index.num_classes)]
    shown = [r for r in ordered if r["images"]][:CONTACT_SHEET_CLASSES]
    sheet_rows = [(r["class"], torch.stack([read_image(out / m["file"]) for m in r["images"]])) for r in shown]
    if sheet_rows:
        write_contact_sheet(out / "contact_sheet.png", sheet_rows)
    seconds["total"] = time.perf_counter() - t0
    observer_facts = {
        **observer.manifest(),
        "check": check,
        "head_rows": dict(zip(index.classes, observer.head_rows)),
        "scoring": scoring,
    }
    manifest = build_manifest(
        _run_parameters(cfg),
        _versions(),
        observer_facts,
        index,
        ordered,
        short_classes(index, cfg.mipc),
        journal.read_redone(out) if cfg.resume else [],
        seconds,
        world.size,
        len(resumed),
        out,
    )
    write_manifest(out / "manifest.json", manifest)
    return DistillResult(
        out=out,
        manifest=out / "manifest.json",
        contact_sheet=out / "contact_sheet.png" if sheet_rows else None,
        num_images=len(manifest["images"]),
        observer_accuracy=None if check is None else check["accuracy"],
        decode_failures=len(manifest["decode_failures"]),
        seconds=seconds,
        notes=summary_lines(as_manifest(manifest)),
    )
