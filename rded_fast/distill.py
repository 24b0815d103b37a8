"""The distill pipeline: the one place that knows the order of the stages.

index -> plan -> checks (crops, memory) -> observer -> observer check -> (load -> score -> select -> stitch ->
write -> journal) per class -> manifest.

Each stage lives in a module of its own: the config and its checks (rded_fast.config), the memory check
(memory_check), the observer and its scorer (observer_setup), the observer check (observer_check), the class stage
(class_stage: classes stream through the loader, each scored, selected, stitched, written and journaled when it is
complete) and the manifest's records (manifest). Rank 0 claims the output, runs the prologue and, after every
rank's classes, merges the journal into manifest.json.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rded_fast import heap, journal
from rded_fast.arguments import paths_as_strings
from rded_fast.class_stage import plan_classes, run_classes
from rded_fast.config import PATH_FIELDS, DistillConfig, check_crops_fit, check_index_path, note_ignored, resolve_auto, validate
from rded_fast.device import cpu_description, device_name, resolve_device
from rded_fast.distributed import World, assign_classes, barrier, collective, init_world
from rded_fast.errors import UserError
from rded_fast.formats import Source, reading, reopen
from rded_fast.formats.folder import keep_index_cache
from rded_fast.index import DatasetIndex, load_index, read_class_map, save_index
from rded_fast.loaders import open_source, preload
from rded_fast.manifest import (
    as_manifest,
    build_manifest,
    observer_record,
    run_parameters,
    run_record,
    summary_lines,
    versions,
    write_manifest,
)
from rded_fast.memory_check import check_memory
from rded_fast.models import BuiltModel
from rded_fast.models.classes import restrict_class_map
from rded_fast.models.factory import factory_source
from rded_fast.observer_check import check_observer
from rded_fast.observer_setup import build_observer, scoring_choices
from rded_fast.outputs import DISTILLED_SET, claim_output, resolve
from rded_fast.plan import CropPlan, short_classes
from rded_fast.recipe import CONTACT_SHEET_CLASSES
from rded_fast.score import Scorer
from rded_fast.select import selector
from rded_fast.timing import Stopwatch
from rded_fast.write import prepare_out_dir, read_image, write_contact_sheet


@dataclass
class DistillResult:
    """What a distill run made: its folder, manifest and contact sheet, with the counts and notes the command prints."""

    out: Path
    manifest: Path
    contact_sheet: Path | None  # None when no class got an image (no sheet is drawn) and on ranks other than 0
    num_images: int
    observer_accuracy: float | None
    decode_failures: int
    seconds: dict = field(default_factory=dict)
    is_main: bool = True  # False on torchrun ranks other than 0, which write no manifest
    notes: list[str] = field(default_factory=list)  # the manifest's summary (rded_fast.manifest.summary_lines)


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
        heap.frozen(),  # the imports' objects: no full collection over them in the prologue (heap.py)
    ):
        return _distill(cfg)


def _distill(cfg: DistillConfig) -> DistillResult:
    """The stages in order on this rank: rank 0's prologue (the others read its index and plan the same), this
    rank's classes (less those a --resume finds done), then rank 0's manifest."""
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
        observer, scorer = build_observer(cfg, index, device)
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
    with heap.frozen():  # and the setup's: no full collection over them, here or in forked loader workers
        collective(world, run, "another rank failed; finished classes are journaled: rerun with --resume")
    seconds["classes"] = time.perf_counter() - t
    seconds.update(watch.seconds)
    barrier(world)
    if not world.is_main:
        return DistillResult(out, out / "manifest.json", None, 0, None, 0, seconds, is_main=False)
    scoring = {**scoring_choices(scorer), "device": device_name(device), "cpu": cpu_description()}
    return _finish(cfg, index, observer, check, out, seconds, t0, world, resumed=sorted(done), scoring=scoring)


def _prologue(
    cfg: DistillConfig, out: Path, device: torch.device, seconds: dict[str, float]
) -> tuple[Source, CropPlan, BuiltModel, Scorer, dict | None]:
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
    observer, scorer = build_observer(cfg, index, device)
    check = check_observer(source, cfg, scorer, device) if selector(cfg.select).scores else None
    seconds["check"] = time.perf_counter() - t - scorer.compile_seconds
    prepare_out_dir(out, cfg.overwrite, cfg.resume)
    run = _run_record(cfg, index, observer, scorer, device)
    if cfg.resume and (journal.journal_dir(out) / "run.json").is_file():
        journal.check_run(out, run)
    else:
        journal.write_run(out, run)
    save_index(replace(index, folders=None), out / "index.npz")  # ranks > 0 read it; folder times are no output
    if cfg.index and stamps is not None and not np.array_equal(stamps, index.stamps):  # keep the headers read
        keep_index_cache(index, cfg.index)
    return source, plan, observer, scorer, check


def _run_record(cfg: DistillConfig, index: DatasetIndex, observer: BuiltModel, scorer: Scorer, device: torch.device) -> dict:
    """The journal's run record (rded_fast.manifest.run_record), which a --resume must match."""
    paths = {k: str(resolve(v)) for k in journal.PATH_KEYS if isinstance(v := getattr(cfg, k), str) and os.path.exists(v)}
    weights = {
        "weights_sha256": observer.weights_sha256,
        "factory_sha256": observer.origin.get("file_sha256"),
        "head_rows": list(observer.head_rows),
    }
    scored_on = {"device": device.type, **scoring_choices(scorer)}
    return run_record(run_parameters(asdict(cfg)), paths, index.classes, weights, scored_on)


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
    observer_facts = observer_record(observer.manifest(), check, dict(zip(index.classes, observer.head_rows)), scoring)
    manifest = build_manifest(
        run_parameters(asdict(cfg)),
        versions(),
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
