"""Train students on a distilled set with RDED's recipe and test them on real data (`evaluate`); store the
teacher's labels of every augmented view (`relabel`).

Soft labels come online (the teacher labels exactly each augmented batch, as the reference does), from a labels
folder of `relabel` (the same augmentations replayed, no teacher in memory) or from region labels (`relabel
--region`); `--labels hard` trains on one-hot labels. The reference's extra no-grad student forward in train mode
(which moves BN statistics twice) is kept behind `bn_refresh` (on by default). `seeds` trains one student per
seed in one process (rded_fast.train.engine). Before epoch 0 the teacher is checked on real images with the run's
class mapping (rded_fast.train.teacher). The result records the students' throughput over the epoch loop
(`train_img_per_s`) apart from the fixed costs (`fixed_seconds`).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rded_fast import heap
from rded_fast.compile_rule import compile_step, resolve_compile
from rded_fast.device import TRAIN_AMP_CHOICES, amp_name, resolve_amp, resolve_device
from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_text
from rded_fast.formats.folder import build_index
from rded_fast.index import UNLISTED_CLASS
from rded_fast.models import BuiltModel
from rded_fast.outputs import LABEL_FOLDER, RESULT_JSON, check_separate, check_writable_file, claim_output
from rded_fast.progress import progress
from rded_fast.train import checkpoint, softlabels
from rded_fast.train.augment import Augmenter, sample_epoch
from rded_fast.train.distilled_set import DistilledSet, load_distilled
from rded_fast.train.engine import Steps, StudentRun, make_run, make_steps, train_epoch, warm
from rded_fast.train.labels import LabelSource
from rded_fast.train.metrics import topk_accuracy
from rded_fast.train.recipe import RECIPE_VERSION, Recipe, evaluates_at, rded_batch_size, rded_lr
from rded_fast.train.regions import cell_logits, grid_of
from rded_fast.train.teacher import build_teacher, check_teacher, teacher_logits
from rded_fast.train.val_cache import load_val
from rded_fast.train.validate import validate_student_config

# relabel --top-k by default: on Fashion-MNIST IPC 10 no k below all 10 classes kept students within 0.5 point of
# online labels (top-5: -1.5), so 10 (benchmarks/README.md, "How many logits relabel keeps"); fewer classes: all.
DEFAULT_TOP_K = 10


@dataclass
class StudentConfig:
    """`evaluate` and `relabel` arguments (relabel ignores val/student/lr; `out` is its labels folder)."""

    distilled: str
    teacher: str | None = None  # evaluate: only for --labels soft without --soft-labels (online labels); relabel: needed
    teacher_weights: str | None = None
    val: str | None = None
    student: str | None = None
    epochs: int = 300
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    seeds: tuple[int, ...] | None = None  # evaluate: one student per seed in one process (overrides `seed`)
    device: str = "auto"
    soft_labels: str | None = None
    labels: str = "soft"  # "hard": one-hot labels (CutMix-mixed), no teacher: what the images alone carry
    bn_refresh: bool = True  # the reference's extra no-grad train-mode forward per step (BN statistics updated twice)
    amp: str = "auto"  # student and teacher autocast: auto (bf16 on CUDA and native-bf16 CPUs), none (fp32), bf16
    compile: str = "auto"  # auto (CUDA; a CPU when it repays, cold compile counted), on, off
    final_only: bool = False  # test once after the last epoch (the reference also tests every 10th in the last 20 %)
    top_k: int | None = None  # relabel: logits kept per view (None: DEFAULT_TOP_K; 0: all classes)
    region: str | None = None  # relabel: "cells" (one label per cell of the factor grid) or "image" (one per image)
    skip_teacher_check: bool = False
    out: str | None = None
    json: str | None = None
    checkpoint: str | None = None
    resume: bool = False
    overwrite: bool = False  # relabel: replace an earlier labels folder of ours at `out`
    show_progress: bool = True


def _input_size(data: DistilledSet) -> int:
    return int(data.images.shape[-1])


def _seeds(cfg: StudentConfig) -> tuple[int, ...]:
    seeds = tuple(cfg.seeds) if cfg.seeds is not None else (cfg.seed,)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds):
        raise UserError(f"--seeds {','.join(map(str, seeds))}: give distinct whole numbers >= 0, e.g. --seeds 0,1,2,3,4")
    return seeds


def _recipe(cfg: StudentConfig, data: DistilledSet, student: str) -> Recipe:
    if cfg.epochs < 1:
        raise UserError(f"--epochs {cfg.epochs}: must be >= 1")
    batch = cfg.batch_size or rded_batch_size(data.ipc, len(data.classes), student)
    return Recipe(epochs=cfg.epochs, batch_size=min(batch, len(data.labels)), lr=cfg.lr or rded_lr(len(data.classes), student))


def content_sha256(data: DistilledSet) -> str:
    """A hash of the distilled set's content: every image's pixels, label and file name, in training order.
    Stored soft labels are bound to it, so labels of another set with the same file names are refused."""
    h = hashlib.sha256()
    h.update(json.dumps([data.files, data.labels.tolist(), data.classes, data.factor]).encode())
    h.update(data.images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_labels_match(header: dict, data: DistilledSet, recipe: Recipe, folder: str) -> None:
    if header["files"] != data.files:
        raise UserError(f"--soft-labels {folder}: made for another distilled set ({header['distilled']}: file lists differ)")
    if header.get("content_sha256") != content_sha256(data):
        raise UserError(
            f"--soft-labels {folder}: made for another distilled set ({header['distilled']}: same file names, "
            "different images or labels); run `rded-fast relabel` on this --distilled set"
        )
    if "region_grid" not in header and header["epochs"] < recipe.epochs:
        raise UserError(f"--soft-labels {folder} holds {header['epochs']} epochs, fewer than --epochs {recipe.epochs}")


def _inputs(cfg: StudentConfig) -> dict:
    weights = cfg.teacher_weights if cfg.teacher_weights and os.path.exists(cfg.teacher_weights) else None
    return {"--distilled": cfg.distilled, "--val": cfg.val, "--soft-labels": cfg.soft_labels, "--teacher-weights": weights}


def evaluate(cfg: StudentConfig) -> dict:
    """Train `cfg.student` (one per seed of `cfg.seeds`) on the distilled set and report top-1/top-5 on `cfg.val`
    (fractions; with several seeds, each one's and their mean and std).

    Output paths (`--json`, `--checkpoint`) are checked before any training: outside the inputs,
    writable, and replacing only an earlier result of ours; `--json` is locked for the run."""
    cfg = validate_student_config(cfg)
    if not cfg.val or not cfg.student:
        raise UserError("evaluate needs --val DIR and --student NAME")
    _seeds(cfg)
    inputs = _inputs(cfg)
    if cfg.checkpoint:
        check_separate(cfg.checkpoint, "--checkpoint", inputs, "file")
        check_writable_file(cfg.checkpoint, "--checkpoint")
        if os.path.isfile(cfg.checkpoint) and not _is_training_state(cfg.checkpoint):
            raise UserError(
                f"--checkpoint {cfg.checkpoint}: an existing file that is not a training state of rded-fast; give a new path"
            )
    if not cfg.json:
        return _evaluate(cfg)
    check_writable_file(cfg.json, "--json")
    out_inputs = {**inputs, "--checkpoint": cfg.checkpoint}
    with claim_output(cfg.json, "--json", out_inputs, RESULT_JSON, overwrite=True, any_flag=None):
        return _evaluate(cfg)


def _label_source(cfg: StudentConfig, data: DistilledSet, device: torch.device, recipe: Recipe) -> LabelSource:
    """The run's targets; builds the teacher for online labels."""
    amp = resolve_amp(cfg.amp, device, TRAIN_AMP_CHOICES)
    size = _input_size(data)
    base = dict(
        num_classes=len(data.classes), size=size, factor=data.factor, labels=data.labels.to(device), device=device, amp=amp
    )
    if cfg.labels == "hard":
        if cfg.soft_labels:
            raise UserError("--labels hard trains on the images' own labels; leave out --soft-labels")
        return LabelSource("hard", recipe, **base)
    if cfg.soft_labels:
        folder = Path(cfg.soft_labels)
        header = softlabels.read_header(folder)
        region = "region_grid" in header  # static labels: any batch size and number of epochs
        batch_size = recipe.batch_size if region else header["batch_size"]
        recipe = Recipe(epochs=cfg.epochs, batch_size=batch_size, lr=recipe.lr, temperature=header["temperature"])
        _check_labels_match(header, data, recipe, cfg.soft_labels)
        if not region:
            return LabelSource("stored", recipe, **base, header=header, folder=folder)
        probs = softlabels.read_region_probs(folder, header, len(data.classes))
        return LabelSource("region", recipe, **base, header=header, folder=folder, cell_probs=probs.to(device))
    if not cfg.teacher:
        raise UserError(
            "--labels soft (the default) needs the teacher that labels each batch: give --teacher NAME, or "
            "--soft-labels DIR (from `rded-fast relabel`), or --labels hard (no teacher)"
        )
    teacher, _ = build_teacher(cfg.teacher, cfg.teacher_weights, data.classes, size, data.manifest, device)
    return LabelSource("online", recipe, **base, teacher=teacher)


def _parameters(cfg: StudentConfig, data: DistilledSet, source: LabelSource, compiled: bool) -> dict:
    """What an evaluation ran with: its arguments and what they resolved to."""
    return {
        **{k: v for k, v in asdict(cfg).items() if k != "show_progress"},
        "seeds": list(_seeds(cfg)),
        "factor": data.factor,
        "ipc": data.ipc,
        "input_size": _input_size(data),
        "num_classes": len(data.classes),
        "recipe": asdict(source.recipe),
        "recipe_version": RECIPE_VERSION,
        "resolved_device": str(source.device),
        "resolved_amp": amp_name(source.amp),
        "resolved_compile": compiled,
        "soft_label_source": source.kind,
        "teacher_used": _teacher_used(cfg, source),
    }


def _teacher_used(cfg: StudentConfig, source: LabelSource) -> str | None:
    """The teacher whose outputs the student learnt from: none for hard labels, the labels folder's for stored ones."""
    if source.kind == "hard":
        return None
    return cfg.teacher if source.kind == "online" else source.header.get("teacher")


class _Clock:
    """Seconds of the named fixed costs of a run, each measured where it happens."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


def _resume(cfg: StudentConfig, runs: list[StudentRun]) -> int:
    """The first epoch still to run: 0, or the one after the checkpoint's, with every student restored."""
    if cfg.resume and not cfg.checkpoint:
        raise UserError("--resume needs --checkpoint FILE (the per-epoch state of the interrupted run)")
    state = checkpoint.load_state(cfg.checkpoint) if cfg.resume else None
    if state is None:
        return 0
    saved = [s.get("seed") for s in state.get("students", [])]
    if state.get("recipe_version") != RECIPE_VERSION or saved != [r.seed for r in runs]:
        raise UserError(
            f"--checkpoint {cfg.checkpoint}: the state of another run (recipe version {state.get('recipe_version', 1)}, "
            f"seeds {saved or '?'}); resume with the same --seeds and rded-fast version, or give a new --checkpoint"
        )
    for run, saved_run in zip(runs, state["students"]):
        checkpoint.restore(saved_run, run.model, run.opt, run.sched, None)
        run.rng, run.epoch_loss, run.evaluations = saved_run["rng"], saved_run["epoch_loss"], saved_run["evaluations"]
    return int(state["epoch"]) + 1


def _save(cfg: StudentConfig, runs: list[StudentRun], epoch: int) -> None:
    students = [
        checkpoint.capture(
            r.model, r.opt, r.sched, None, epoch, seed=r.seed, rng=r.rng, epoch_loss=r.epoch_loss, evaluations=r.evaluations
        )
        for r in runs
    ]
    checkpoint.save_state(cfg.checkpoint, {"recipe_version": RECIPE_VERSION, "epoch": epoch, "students": students})


def _summary(runs: list[StudentRun]) -> dict:
    """Each student's figures, and the headline: the one student's, or the mean and std over the seeds."""
    per_seed = [
        {
            "seed": r.seed,
            "final_top1": r.evaluations[-1]["top1"],
            "final_top5": r.evaluations[-1]["top5"],
            "best_top1": max(e["top1"] for e in r.evaluations),
            "evaluations": r.evaluations,
            "epoch_loss": r.epoch_loss,
        }
        for r in runs
    ]
    if len(per_seed) == 1:
        return {**{k: v for k, v in per_seed[0].items() if k != "seed"}, "runs": per_seed}
    head = {k: statistics.mean(s[k] for s in per_seed) for k in ("final_top1", "final_top5", "best_top1")}
    return {**head, "final_top1_std": statistics.stdev(s["final_top1"] for s in per_seed), "runs": per_seed}


def _train(
    cfg: StudentConfig, runs: list[StudentRun], source: LabelSource, steps: Steps, augmenter: Augmenter, first: int, val
) -> float:
    """The epochs from `first` on, each followed by the evaluations the recipe asks for and the checkpoint; returns
    the seconds spent in the epoch loop proper (evaluations and checkpoints excluded)."""
    epochs, train_seconds = source.recipe.epochs, 0.0
    for epoch in progress(
        range(first, epochs), total=epochs, initial=first, desc=f"train {cfg.student}", disable=not cfg.show_progress
    ):
        t = time.perf_counter()
        losses = train_epoch(runs, source, steps, augmenter, epoch, cfg.bn_refresh)
        train_seconds += time.perf_counter() - t
        for run, loss in zip(runs, losses):
            run.epoch_loss.append(loss)
            run.sched.step()
            if epoch == epochs - 1 or (evaluates_at(epoch, epochs) and not cfg.final_only):
                top1, top5 = topk_accuracy(run.model, *val, source.device, amp=source.amp)
                run.evaluations.append({"epoch": epoch, "top1": top1, "top5": top5})
        if cfg.checkpoint:
            _save(cfg, runs, epoch)
    return train_seconds


def _is_training_state(path: str) -> bool:
    """Whether `path` holds a training state of ours (one per student, or an older single student's with its optimiser
    and schedule), which each epoch replaces: any other file, a model's weights above all, is the user's to keep."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        state = checkpoint.load_state(path)
    except UserError:
        return False
    return isinstance(state, dict) and ("students" in state or {"model", "opt", "sched"} <= state.keys())


def _evaluate(cfg: StudentConfig) -> dict:
    t0 = time.perf_counter()
    clock = _Clock()
    device = resolve_device(cfg.device)
    seeds = _seeds(cfg)
    data = load_distilled(cfg.distilled)
    size = _input_size(data)
    clock.lap("set_load")
    source = _label_source(cfg, data, device, _recipe(cfg, data, cfg.student))
    recipe = source.recipe
    clock.lap("teacher_load")
    vindex = build_index(
        cfg.val, class_map=data.classes, show_progress=False, headers=False, flag="--val", classes_from="the distilled set"
    )
    val_x, val_y, val_from = load_val(vindex, size, cfg.show_progress)
    clock.lap("val_load")
    check = None
    if source.kind == "online" and not cfg.skip_teacher_check:
        check = check_teacher(
            source.teacher, cfg.teacher, cfg.teacher_weights is not None, val_x, val_y, len(data.classes),
            f"--val {cfg.val}", device, source.amp, seeds[0],
        )  # fmt: skip
    clock.lap("teacher_check")
    compiled = resolve_compile(cfg.compile, device, "train", recipe.epochs * len(data.labels) * len(seeds))
    runs = [make_run(cfg.student, len(data.classes), size, seed, recipe, device) for seed in seeds]
    steps = make_steps(source, compiled)
    images = data.images.to(device)
    augmenter = Augmenter(images, data.factor)
    clock.lap("students")
    clock.seconds["compile"] = warm(steps, runs, source, images, cfg.bn_refresh)
    clock.lap("other")
    first = _resume(cfg, runs)
    with heap.frozen():  # no full collection over the setup's objects while the epochs run
        train_seconds = _train(cfg, runs, source, steps, augmenter, first, (val_x, val_y))
    trained = (recipe.epochs - first) * len(data.labels) * len(runs)
    result = {
        "parameters": _parameters(cfg, data, source, compiled),
        **_summary(runs),
        "train_images": len(images),
        "set_notes": data.notes,
        "val_images": len(val_x),
        "val_source": val_from,
        "val_unused_classes": [s["path"] for s in vindex.skipped if s["reason"] == UNLISTED_CLASS],
        "teacher_check": check,
        "train_img_per_s": trained / train_seconds if train_seconds > 0 else None,
        "train_seconds": train_seconds,
        "fixed_seconds": clock.seconds,
        "seconds": time.perf_counter() - t0,
    }
    if cfg.json:
        atomic_write_text(cfg.json, json.dumps(result, indent=1))
    return result


def relabel(cfg: StudentConfig) -> dict:
    """Store every epoch's augmentation parameters and the teacher's top-k logits under `cfg.out`.

    An earlier labels folder of ours at `cfg.out` is replaced only with `overwrite` (kept aside until this run
    succeeds; files in it that relabel did not write are kept; `replaced` in the result says so); any other
    non-empty folder is refused."""
    cfg = validate_student_config(cfg)
    if not cfg.out or not cfg.teacher:
        raise UserError("relabel needs --teacher NAME and --out DIR")
    replaced = []
    with claim_output(
        cfg.out, "--out", _inputs(cfg), LABEL_FOLDER, overwrite=cfg.overwrite, any_flag=None, on_replace=replaced.append
    ):
        result = _relabel(cfg)
    return {**result, "replaced": str(replaced[0]) if replaced else None}


RECIPE_TEXT = (
    "RDED: ShufflePatches(factor) -> RandomResizedCrop(scale (1/factor, 1), ratio (3/4, 4/3)) -> flip -> normalise -> "
    "CutMix Beta(1,1)"
)


def _label_header(cfg: StudentConfig, data: DistilledSet, recipe: Recipe, built: BuiltModel, k: int) -> dict:
    """What a labels folder records of the set and the teacher it was made from (checked when it is replayed)."""
    return {
        "distilled": str(data.root),
        "content_sha256": content_sha256(data),
        "files": data.files,
        "classes": data.classes,
        "factor": data.factor,
        "input_size": _input_size(data),
        "temperature": recipe.temperature,
        "top_k": k,
        "recipe_version": RECIPE_VERSION,
        "teacher": cfg.teacher,
        "teacher_weights": cfg.teacher_weights,
        "teacher_head_rows": dict(zip(data.classes, built.head_rows)),
        "teacher_normalization": {"mean": list(built.mean), "std": list(built.std)},
    }


def _top_k(cfg: StudentConfig, num_classes: int) -> int:
    if cfg.top_k is not None and cfg.top_k < 0:
        raise UserError(f"--top-k {cfg.top_k}: must be >= 1, or 0 for all classes")
    k = DEFAULT_TOP_K if cfg.top_k is None else (cfg.top_k or num_classes)
    return min(k, num_classes)


def _relabel(cfg: StudentConfig) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    data = load_distilled(cfg.distilled)
    size = _input_size(data)
    recipe = _recipe(cfg, data, cfg.student or cfg.teacher)
    k = _top_k(cfg, len(data.classes))
    amp = resolve_amp(cfg.amp, device, TRAIN_AMP_CHOICES)
    teacher, built = build_teacher(cfg.teacher, cfg.teacher_weights, data.classes, size, data.manifest, device)
    check = None
    if not cfg.skip_teacher_check:
        where = f"the distilled set {cfg.distilled} (its cells)"
        check = check_teacher(
            teacher, cfg.teacher, cfg.teacher_weights is not None, data.images, data.labels, len(data.classes), where,
            device, amp, cfg.seed, grid=data.factor,
        )  # fmt: skip
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {**_label_header(cfg, data, recipe, built, k), "teacher_amp": amp_name(amp)}
    images = data.images.to(device)
    result = {"out": str(out), "top_k": k, "samples": len(images), "teacher_check": check, "set_notes": data.notes}
    if cfg.region:
        grid = grid_of(cfg.region, data.factor)
        softlabels.write_header(out, {**header, "region": cfg.region, "region_grid": grid})
        logits = cell_logits(lambda x: teacher_logits(teacher, x, device, amp), images, grid)
        written = softlabels.write_regions(out, softlabels.encode_logits(logits, k, recipe.temperature))
        return {**result, "region": cfg.region, "cells": len(logits), "total_bytes": written, "seconds": time.perf_counter() - t0}
    per_epoch = {"epochs": recipe.epochs, "batch_size": recipe.batch_size, "seed": cfg.seed, "cutmix_beta": recipe.cutmix_beta}
    softlabels.write_header(out, {**header, **per_epoch, "recipe": RECIPE_TEXT})
    augmenter = Augmenter(images, data.factor)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return teacher_logits(teacher, x, device, amp)

    if resolve_compile(cfg.compile, device, "relabel", recipe.epochs * len(images)):
        forward = compile_step(forward, device)
    sizes = []
    for epoch in progress(range(recipe.epochs), desc="relabel", disable=not cfg.show_progress):
        aug = sample_epoch(cfg.seed, epoch, len(images), recipe.batch_size, data.factor, size, recipe.cutmix_beta)
        daug = augmenter.prepare(aug)
        logits = torch.empty((len(images), len(data.classes)), device=device)
        for b in range(aug.num_batches):  # each batch copied out at once: a CUDA graph reuses its output buffer
            logits[daug.batch_slice(b)] = forward(augmenter.batch(daug, b))
        sizes.append(softlabels.write_epoch(out, epoch, aug, softlabels.encode_logits(logits, k, recipe.temperature)))
    return {
        **result,
        "epochs": recipe.epochs,
        "bytes_per_epoch": float(np.mean(sizes)),
        "total_bytes": int(np.sum(sizes)),
        "seconds": time.perf_counter() - t0,
    }
