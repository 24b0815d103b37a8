"""Train a student on a distilled set with RDED's recipe and measure it on real validation data.

Soft labels come either online (the teacher labels exactly each augmented batch, as the reference
does), from a labels folder written by `relabel` (same augmentations replayed, no teacher in memory), or
from region labels (`relabel --region`: one stored label per cell, rded_fast.train.regions); `--labels
hard` trains on one-hot labels. The reference's extra no-grad student forward in train mode (which updates
BN statistics twice) is kept behind `bn_refresh` (on by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rded_fast.device import TRAIN_AMP_CHOICES, amp_name, autocast, resolve_amp, resolve_device
from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_text
from rded_fast.formats.folder import build_index
from rded_fast.index import UNLISTED_CLASS, DatasetIndex
from rded_fast.models import BuiltModel, build
from rded_fast.outputs import LABEL_FOLDER, RESULT_JSON, check_separate, check_writable_file, claim_output
from rded_fast.progress import progress
from rded_fast.score import IMAGENET_MEAN, IMAGENET_STD
from rded_fast.train import checkpoint, softlabels
from rded_fast.train.augment import augment_batch, mixed_targets, sample_epoch
from rded_fast.train.distilled_set import DistilledSet, load_distilled
from rded_fast.train.memory_dataset import load_tensor_dataset
from rded_fast.train.metrics import topk_accuracy
from rded_fast.train.recipe import Recipe, evaluates_at, kd_loss, make_optimizer, rded_batch_size, rded_lr
from rded_fast.train.regions import REGION_GRIDS, cell_logits, grid_of, region_targets


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
    device: str = "auto"
    soft_labels: str | None = None
    labels: str = "soft"  # "hard": one-hot labels (CutMix-mixed), no teacher: what the images alone carry
    bn_refresh: bool = True  # the reference's extra no-grad train-mode forward per step (BN statistics updated twice)
    amp: str = "auto"  # student and teacher autocast: auto (bf16 on CUDA and native-bf16 CPUs), none (fp32), bf16
    final_only: bool = False  # test once after the last epoch (the reference also tests every 10th in the last 20 %)
    top_k: int | None = None
    region: str | None = None  # relabel: "cells" (one label per cell of the factor grid) or "image" (one per image)
    out: str | None = None
    json: str | None = None
    checkpoint: str | None = None
    resume: bool = False
    overwrite: bool = False  # relabel: replace an earlier labels folder of ours at `out`
    show_progress: bool = True


def _input_size(data: DistilledSet) -> int:
    return int(data.images.shape[-1])


def _recipe(cfg: StudentConfig, data: DistilledSet, student: str) -> Recipe:
    if cfg.epochs < 1:
        raise UserError(f"--epochs {cfg.epochs}: must be >= 1")
    batch = cfg.batch_size or rded_batch_size(data.ipc, len(data.classes), student)
    return Recipe(epochs=cfg.epochs, batch_size=min(batch, len(data.labels)), lr=cfg.lr or rded_lr(len(data.classes), student))


class Renormalize(nn.Module):
    """Turn ImageNet-normalised batches (what the recipe makes) into a teacher's own normalisation."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _recorded_rows(data: DistilledSet, teacher: str) -> list[int] | None:
    """The head rows the distilled set's observer used, when the teacher is that observer."""
    observer = (data.manifest or {}).get("observer", {})
    rows = observer.get("head_rows")
    if observer.get("name") != teacher or not rows or not all(c in rows for c in data.classes):
        return None
    return [int(rows[c]) for c in data.classes]


def _teacher(cfg: StudentConfig, data: DistilledSet, device: torch.device) -> tuple[nn.Module, BuiltModel]:
    """(the teacher in eval mode, frozen, taking the recipe's ImageNet-normalised batches; its BuiltModel:
    head rows and normalisation, for the records)."""
    built = build(
        cfg.teacher,
        len(data.classes),
        cfg.teacher_weights,
        _input_size(data),
        classes=data.classes,
        head_rows=_recorded_rows(data, cfg.teacher),
    )
    model = built.model
    if (built.mean, built.std) != (IMAGENET_MEAN, IMAGENET_STD):
        model = nn.Sequential(Renormalize(built.mean, built.std), model)
    model = model.to(device, memory_format=torch.channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, built


def teacher_logits(teacher: nn.Module, x: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    with torch.no_grad(), autocast(device, amp):
        return teacher(x.contiguous(memory_format=torch.channels_last)).float()


def content_sha256(data: DistilledSet) -> str:
    """A hash of the distilled set's content: every image's pixels, label and file name, in training order.
    Stored soft labels are bound to it, so labels of another set with the same file names are refused."""
    h = hashlib.sha256()
    h.update(json.dumps([data.files, data.labels.tolist(), data.classes, data.factor]).encode())
    h.update(data.images.contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_labels_match(header: dict, data: DistilledSet, recipe: Recipe) -> None:
    if header["files"] != data.files:
        raise UserError(f"--soft-labels {header['distilled']}: made for another distilled set (file lists differ)")
    if header.get("content_sha256") != content_sha256(data):
        raise UserError(
            f"--soft-labels: made for another distilled set ({header['distilled']}: same file names, "
            "different images or labels); run `rded-fast relabel` on this --distilled set"
        )
    if "region_grid" not in header and header["epochs"] < recipe.epochs:
        raise UserError(f"--soft-labels holds {header['epochs']} epochs, fewer than --epochs {recipe.epochs}")


def _inputs(cfg: StudentConfig) -> dict:
    weights = cfg.teacher_weights if cfg.teacher_weights and os.path.exists(cfg.teacher_weights) else None
    return {"--distilled": cfg.distilled, "--val": cfg.val, "--soft-labels": cfg.soft_labels, "--teacher-weights": weights}


def evaluate(cfg: StudentConfig) -> dict:
    """Train `cfg.student` on the distilled set and report top-1/top-5 on `cfg.val` (fractions).

    Output paths (`--json`, `--checkpoint`) are checked before any training: outside the inputs,
    writable, and replacing only an earlier result of ours; `--json` is locked for the run."""
    if not cfg.val or not cfg.student:
        raise UserError("evaluate needs --val DIR and --student NAME")
    inputs = _inputs(cfg)
    if cfg.checkpoint:
        check_separate(cfg.checkpoint, "--checkpoint", inputs, "file")
        check_writable_file(cfg.checkpoint, "--checkpoint")
        if os.path.isfile(cfg.checkpoint) and not zipfile.is_zipfile(cfg.checkpoint):
            raise UserError(
                f"--checkpoint {cfg.checkpoint}: an existing file that is not a training state of rded-fast; give a new path"
            )
    if not cfg.json:
        return _evaluate(cfg)
    check_writable_file(cfg.json, "--json")
    out_inputs = {**inputs, "--checkpoint": cfg.checkpoint}
    with claim_output(cfg.json, "--json", out_inputs, RESULT_JSON, overwrite=True, any_flag=None):
        return _evaluate(cfg)


@dataclass
class _Labels:
    """Where a step's targets come from: the images' own labels (hard), a labels folder, or the teacher online."""

    kind: str  # "hard", "stored", "region" or "online"
    recipe: Recipe
    header: dict | None = None
    amp: torch.dtype | None = None  # the autocast dtype of student and teacher
    teacher: nn.Module | None = None
    cell_probs: torch.Tensor | None = None  # region labels [N, grid^2, C]


def _label_source(cfg: StudentConfig, data: DistilledSet, device: torch.device, recipe: Recipe) -> _Labels:
    if cfg.labels not in ("soft", "hard"):
        raise UserError(f"--labels {cfg.labels}: choose soft or hard")
    amp = resolve_amp(cfg.amp, device, TRAIN_AMP_CHOICES)
    if cfg.labels == "hard":
        if cfg.soft_labels:
            raise UserError("--labels hard trains on the images' own labels; leave out --soft-labels")
        return _Labels("hard", recipe, amp=amp)
    if cfg.soft_labels:
        header = softlabels.read_header(Path(cfg.soft_labels))
        region = "region_grid" in header  # static labels: any batch size and number of epochs
        batch_size = recipe.batch_size if region else header["batch_size"]
        recipe = Recipe(epochs=cfg.epochs, batch_size=batch_size, lr=recipe.lr, temperature=header["temperature"])
        _check_labels_match(header, data, recipe)
        if not region:
            return _Labels("stored", recipe, amp=amp, header=header)
        probs = softlabels.read_region_probs(Path(cfg.soft_labels), header, len(data.classes))
        return _Labels("region", recipe, amp=amp, header=header, cell_probs=probs.to(device))
    if not cfg.teacher:
        raise UserError(
            "--labels soft (the default) needs the teacher that labels each batch: give --teacher NAME, or "
            "--soft-labels DIR (from `rded-fast relabel`), or --labels hard (no teacher)"
        )
    return _Labels("online", recipe, amp=amp, teacher=_teacher(cfg, data, device)[0])


def _epoch_aug(cfg: StudentConfig, labels: _Labels, data: DistilledSet, epoch: int, size: int):
    """(the epoch's augmentation parameters, the stored labels of the epoch or None)."""
    if labels.kind == "stored":
        return softlabels.read_epoch(Path(cfg.soft_labels), epoch)
    r = labels.recipe
    return sample_epoch(cfg.seed, epoch, len(data.images), r.batch_size, data.factor, size, r.cutmix_beta), None


def _targets(labels: _Labels, data: DistilledSet, aug, encoded, b: int, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Batch `b`'s targets: mixed one-hot labels, or the teacher's probabilities at the recipe's temperature."""
    n, t = len(data.classes), labels.recipe.temperature
    if labels.kind == "hard":
        return mixed_targets(data.labels, aug, b, n, x.shape[-1]).to(device)
    if labels.kind == "online":
        return torch.softmax(teacher_logits(labels.teacher, x, device, labels.amp) / t, dim=1)
    if labels.kind == "region":
        return region_targets(labels.cell_probs, aug, b, x.shape[-1], data.factor)
    sl = aug.batch_slice(b)
    indices = encoded["indices"][sl] if "indices" in encoded else None
    return softlabels.decode_probs(encoded["values"][sl], indices, encoded["lse"][sl], n, t).to(device)


def train_student_epoch(
    cfg: StudentConfig,
    student: nn.Module,
    opt,
    labels: _Labels,
    data: DistilledSet,
    images: torch.Tensor,
    epoch: int,
    device: torch.device,
) -> float:
    """One epoch of RDED's recipe (or hard labels); returns the mean loss."""
    aug, encoded = _epoch_aug(cfg, labels, data, epoch, images.shape[-1])
    total = 0.0
    for b in range(aug.num_batches):
        x = augment_batch(images, aug, b, data.factor)
        probs = _targets(labels, data, aug, encoded, b, x, device)
        with autocast(device, labels.amp):
            logits = student(x.contiguous(memory_format=torch.channels_last))
        loss = (
            F.cross_entropy(logits.float(), probs) if labels.kind == "hard" else kd_loss(logits, probs, labels.recipe.temperature)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.bn_refresh:  # the reference's logging forward: train mode, so BatchNorm's running stats move again
            with torch.no_grad(), autocast(device, labels.amp):
                student(x.contiguous(memory_format=torch.channels_last))
        total += float(loss.detach())
    return total / aug.num_batches


def _parameters(cfg: StudentConfig, data: DistilledSet, recipe: Recipe, device: torch.device, labels: _Labels) -> dict:
    """What an evaluation ran with: its arguments and what they resolved to."""
    return {
        **{k: v for k, v in asdict(cfg).items() if k != "show_progress"},
        "factor": data.factor,
        "ipc": data.ipc,
        "input_size": _input_size(data),
        "num_classes": len(data.classes),
        "recipe": asdict(recipe),
        "resolved_device": str(device),
        "resolved_amp": amp_name(labels.amp),
        "soft_label_source": labels.kind,
        "teacher_used": _teacher_used(cfg, labels),
    }


def _teacher_used(cfg: StudentConfig, labels: _Labels) -> str | None:
    """The teacher whose outputs the student learnt from: none for hard labels, the labels folder's for stored ones."""
    if labels.kind == "hard":
        return None
    return cfg.teacher if labels.kind == "online" else labels.header.get("teacher")


_VAL_CACHE: dict = {}


def _val_tensors(vindex: DatasetIndex, size: int, show: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images at `size` (resized to size * 8/7, centre-cropped) and labels, decoded once per
    process for one listing (paths and modification times): a benchmark's many students share one test split."""
    stamps = tuple(os.stat(os.path.join(vindex.root, p)).st_mtime_ns for p in vindex.paths)
    key = (size, str(vindex.root), tuple(vindex.paths), tuple(vindex.labels.tolist()), stamps)
    if key not in _VAL_CACHE:
        _VAL_CACHE.clear()
        _VAL_CACHE[key] = load_tensor_dataset(vindex, size, resize_to=size // 7 * 8, show_progress=show, desc="load val")
    return _VAL_CACHE[key]


def _evaluate(cfg: StudentConfig) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    data = load_distilled(cfg.distilled)
    size = _input_size(data)
    labels = _label_source(cfg, data, device, _recipe(cfg, data, cfg.student))
    recipe = labels.recipe
    vindex = build_index(cfg.val, class_map=data.classes, show_progress=False)
    val_x, val_y = _val_tensors(vindex, size, cfg.show_progress)
    torch.manual_seed(cfg.seed)
    student = (
        build(cfg.student, len(data.classes), None, size, what="student")
        .model.to(device, memory_format=torch.channels_last)
        .train()
    )
    opt, sched = make_optimizer(student, recipe)
    images = data.images.to(device)
    epoch_loss, evaluations = [], []
    if cfg.resume and not cfg.checkpoint:
        raise UserError("--resume needs --checkpoint FILE (the per-epoch state of the interrupted run)")
    first = 0
    if cfg.resume and (state := checkpoint.load_state(cfg.checkpoint)) is not None:
        first = checkpoint.restore(state, student, opt, sched, None)
        epoch_loss, evaluations = state["epoch_loss"], state["evaluations"]
    for epoch in progress(
        range(first, recipe.epochs),
        total=recipe.epochs,
        initial=first,
        desc=f"train {cfg.student}",
        disable=not cfg.show_progress,
    ):
        epoch_loss.append(train_student_epoch(cfg, student, opt, labels, data, images, epoch, device))
        sched.step()
        if epoch == recipe.epochs - 1 or (evaluates_at(epoch, recipe.epochs) and not cfg.final_only):
            top1, top5 = topk_accuracy(student, val_x, val_y, device, amp=labels.amp)
            evaluations.append({"epoch": epoch, "top1": top1, "top5": top5})
        if cfg.checkpoint:
            checkpoint.save_state(
                cfg.checkpoint,
                checkpoint.capture(student, opt, sched, None, epoch, epoch_loss=epoch_loss, evaluations=evaluations),
            )
    result = {
        "parameters": _parameters(cfg, data, recipe, device, labels),
        "final_top1": evaluations[-1]["top1"],
        "final_top5": evaluations[-1]["top5"],
        "best_top1": max(e["top1"] for e in evaluations),
        "evaluations": evaluations,
        "epoch_loss": epoch_loss,
        "train_images": len(images),
        "val_images": len(val_x),
        "val_unused_classes": [s["path"] for s in vindex.skipped if s["reason"] == UNLISTED_CLASS],
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
        "teacher": cfg.teacher,
        "teacher_weights": cfg.teacher_weights,
        "teacher_head_rows": dict(zip(data.classes, built.head_rows)),
        "teacher_normalization": {"mean": list(built.mean), "std": list(built.std)},
    }


def _relabel(cfg: StudentConfig) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    data = load_distilled(cfg.distilled)
    size = _input_size(data)
    recipe = _recipe(cfg, data, cfg.student or cfg.teacher)
    k = min(len(data.classes) if cfg.top_k is None else int(cfg.top_k), len(data.classes))
    if k < 1:
        raise UserError(f"--top-k {cfg.top_k}: must be >= 1 (or omit it for all classes)")
    if cfg.region is not None and cfg.region not in REGION_GRIDS:
        raise UserError(f"--region {cfg.region}: choose {' or '.join(REGION_GRIDS)}")
    amp = resolve_amp(cfg.amp, device, TRAIN_AMP_CHOICES)
    teacher, built = _teacher(cfg, data, device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {**_label_header(cfg, data, recipe, built, k), "teacher_amp": amp_name(amp)}
    images = data.images.to(device)
    result = {"out": str(out), "top_k": k, "samples": len(images)}
    if cfg.region:
        grid = grid_of(cfg.region, data.factor)
        softlabels.write_header(out, {**header, "region": cfg.region, "region_grid": grid})
        logits = cell_logits(lambda x: teacher_logits(teacher, x, device, amp), images, grid)
        written = softlabels.write_regions(out, softlabels.encode_logits(logits, k, recipe.temperature))
        return {**result, "region": cfg.region, "cells": len(logits), "total_bytes": written, "seconds": time.perf_counter() - t0}
    per_epoch = {"epochs": recipe.epochs, "batch_size": recipe.batch_size, "seed": cfg.seed, "cutmix_beta": recipe.cutmix_beta}
    softlabels.write_header(out, {**header, **per_epoch, "recipe": RECIPE_TEXT})
    sizes = []
    for epoch in progress(range(recipe.epochs), desc="relabel", disable=not cfg.show_progress):
        aug = sample_epoch(cfg.seed, epoch, len(images), recipe.batch_size, data.factor, size, recipe.cutmix_beta)
        logits = torch.cat(
            [teacher_logits(teacher, augment_batch(images, aug, b, data.factor), device, amp) for b in range(aug.num_batches)]
        )
        sizes.append(softlabels.write_epoch(out, epoch, aug, softlabels.encode_logits(logits, k, recipe.temperature)))
    return {
        **result,
        "epochs": recipe.epochs,
        "bytes_per_epoch": float(np.mean(sizes)),
        "total_bytes": int(np.sum(sizes)),
        "seconds": time.perf_counter() - t0,
    }
