"""The class stage of a distill run: decode -> score -> select -> stitch -> encode -> write -> journal, per class.

Classes stream through: the loader runs over the plan in batches, `iter_classes` buffers each class's crops, and
when a class is complete it is scored in fixed-size chunks of its own crops (`score_class`, on the scoring thread),
then selected, stitched and encoded (`prepare_class`) and written and journaled (`commit_classes`) on the host stage.
Because scoring never mixes classes, any split of classes (over torchrun ranks, or before and after a crash) gives
the same bytes. `run_classes` runs it over a rank's classes; the benchmarks time its parts one by one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rded_fast import journal
from rded_fast.config import DistillConfig, crops_are_whole
from rded_fast.formats import Source
from rded_fast.host import HostStage, default_host_workers
from rded_fast.index import DatasetIndex
from rded_fast.loaders import CropLoader, make_loader
from rded_fast.manifest import cell_record, class_record, image_record
from rded_fast.plan import CropPlan, make_center_plan, make_plan
from rded_fast.progress import progress
from rded_fast.score import Scorer, nonfinite_scores
from rded_fast.select import MORE_CROPS, ClassInputs, ClassSelection, selector
from rded_fast.stitch import cell_boxes, rank_of_cell, stitch
from rded_fast.timing import Stopwatch
from rded_fast.write import encode_class_images, image_name, write_classes_files


def plan_classes(cfg: DistillConfig, index: DatasetIndex, classes: list[int], show_progress: bool = False) -> CropPlan:
    """The plan of `classes`: crops, or one whole image each for a whole-image selection (random-images)."""
    if selector(cfg.select).whole_images:
        return make_center_plan(index, cfg.seed, cfg.mipc, classes=classes, show_progress=show_progress)
    return make_plan(
        index, cfg.seed, cfg.mipc, cfg.num_crop, classes=classes, scale=tuple(cfg.crop_scale), show_progress=show_progress
    )


def loader_for(
    cfg: DistillConfig, source: Source, plan: CropPlan, crop_size: int, device: torch.device, reuse_buffers: bool = False
) -> CropLoader:
    """The run's loader over `plan` at `crop_size` (the one place a distill builds one)."""
    return make_loader(
        cfg.loader,
        source,
        plan,
        crop_size,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        device=str(device),
        prefetch=cfg.prefetch,
        reuse_buffers=reuse_buffers,
        options=cfg.loader_options,
    )


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


def score_class(cfg: DistillConfig, label: int, crops: torch.Tensor, scorer: Scorer) -> dict[str, torch.Tensor] | None:
    """Score one class's crops [m, K, 3, p, p] on the scorer's device -> {"scores": [m, K] float32} (None for a
    selection without scores); a scorer with features adds "similarity": [m, m], the cosine similarity of the
    features of each row's best crop (argmin of its scores), computed on the device so the host gets m^2 numbers
    instead of m x D. Queues device work only: no host sync."""
    if not selector(cfg.select).scores:
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
    """Rank one class's crops by the rule `--select` names (rded_fast.select.SELECTORS), given the observer's
    scores [m, K] (and features' similarity) when it needs them; rows are class-local. A string is the reason the
    class gets no selection."""
    usable = ok.numpy()
    inputs = ClassInputs(label, name, usable, num_crop, cfg.ipc * cfg.factor**2, cfg.seed)
    if scored is not None:
        scores = scored["scores"]
        bad = int((~np.isfinite(scores[usable])).sum())
        if bad:  # checked here, where the scores are on the host already: no sync in the scoring loop
            raise nonfinite_scores(cfg.observer, cfg.amp, bad, scores[usable].size, f"crops of class {name}")
        # at --crop-scale 1 every crop of an image is the same: more of them would only repeat it
        fix = (
            "lower --ipc or --factor (at --crop-scale 1 every crop of an image is the same)"
            if crops_are_whole(cfg)
            else MORE_CROPS
        )
        scores = np.where(usable[:, None], scores, np.inf)
        inputs = replace(inputs, scores=scores, similarity=scored.get("similarity"), fix=fix)
    return selector(cfg.select).select(inputs)


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
    """The manifest's record of each of a class's `count` output images (rded_fast.manifest.image_record): per cell,
    where it sits, which source and box it was cut from, its score, and (rded-cover) its group of the class's
    images and that group's size."""
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
            source = (index.paths[image_id], index.sizes[image_id].tolist(), plan.boxes[row, crop].tolist())
            cells.append(cell_record(c, list(box_out), rank, *source, crop, score=score, **group, **source_extra(image_id)))
        records.append(image_record(f"{name}/{image_name(label, j, cfg.format)}", name, label, cells))
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
    record = functools.partial(
        class_record, label, name, len(rows), int(ok.sum()), failures, sources=journal.sources_fingerprint(index, label)
    )
    sel = select_cells(cfg, label, scored(), ok, crops.shape[1], name)
    if isinstance(sel, str):  # too few usable images: this class gets no output, the run goes on
        return PreparedClass(label, name, record([], 0, sel), [])
    device_rows = torch.from_numpy(sel.rows).to(crops.device)
    cells = crops[device_rows, torch.from_numpy(sel.crops).to(crops.device)]
    images = stitch(cells, cfg.ipc, cfg.factor, cfg.input_size).cpu()
    payloads = encode_class_images(images, cfg.format, cfg.jpeg_quality)
    images_meta = image_records(cfg, index, plan, label, rows, sel, len(payloads), source_extra)
    return PreparedClass(label, name, record(images_meta, sel.fallback), payloads)


def commit_classes(cfg: DistillConfig, out: Path, prepared: list[PreparedClass]) -> None:
    """Write prepared classes' files durably, then journal them (the order the resume guarantee rests on);
    one durability pass for the files of all of them, one for their records."""
    write_classes_files(out, [(p.name, p.label, p.payloads) for p in prepared if p.payloads], cfg.format)
    journal.write_classes(out, [p.record for p in prepared])


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
    rows); `watch` gets the time of each part. Classes with no planned image (empty folders) are journaled too."""
    index = source.index
    planned = set(np.unique(plan.labels).tolist())
    loader = loader_for(cfg, source, plan, cfg.input_size // cfg.factor, device, reuse_buffers=True)
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
    for label in (c for c in todo if c not in planned):
        record = class_record(label, index.classes[label], 0, 0, [], [], 0, "no usable images")
        journal.write_class(out, label, record, index=index)
