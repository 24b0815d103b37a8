"""The observer check of a distill run: is the observer any good on this data, and can it take the run's inputs?

`check_observer` scores centred crops of a sample of training images and refuses an observer near chance (most
often: classes in another order than its outputs, or no weights); `check_observer_input` feeds it one image of the
size it will be given, so that a size it cannot take is one line, not a traceback mid-run.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rded_fast.chance import near_chance_threshold
from rded_fast.class_stage import loader_for
from rded_fast.config import DistillConfig
from rded_fast.errors import UserError
from rded_fast.formats import Source
from rded_fast.models import BuiltModel
from rded_fast.plan import make_center_plan
from rded_fast.progress import progress
from rded_fast.score import Scorer, nonfinite_scores

CHECK_IMAGES = 300  # training images the check scores (about; at least one per class)


def _check_crops(cfg: DistillConfig, source: Source, device: torch.device):
    """The check's plan (one centred crop per image, up to CHECK_IMAGES spread over the classes), its decoded crops
    [N, 3, S, S] (on `device` when CUDA) and which rows decoded [N] bool."""
    per_class = max(1, math.ceil(CHECK_IMAGES / source.index.num_classes))
    plan = make_center_plan(source.index, cfg.seed, per_class)
    loader = loader_for(cfg, source, plan, cfg.input_size, device)
    crops, ok, pos = None, np.zeros(len(plan), bool), 0
    for batch in progress(loader, total=len(loader), desc="observer check", disable=not cfg.show_progress):
        n = len(batch.rows)
        if crops is None:
            where = device if device.type == "cuda" else batch.crops.device
            crops = torch.empty((len(plan), *batch.crops.shape[2:]), dtype=batch.crops.dtype, device=where)
        crops[pos : pos + n].copy_(batch.crops[:, 0], non_blocking=True)
        ok[pos : pos + n] = batch.ok.numpy()
        pos += n
    return plan, crops, ok


def check_observer(source: Source, cfg: DistillConfig, scorer: Scorer, device: torch.device) -> dict:
    """Top-1 of the observer on centred crops of a sample of training images; refuse when near chance.

    One batched pass: every decodable check image with its own label, in full scoring chunks (no per-class
    padding), counted on the device with one host sync at the end."""
    plan, crops, ok = _check_crops(cfg, source, device)
    index = source.index
    keep = np.flatnonzero(ok)
    decoded = len(keep)
    correct = 0
    if decoded:
        labels = torch.from_numpy(plan.labels[keep])
        rows = torch.from_numpy(keep)
        # eager: compiling the observer a second time, for this crop size, costs more than these few hundred crops
        # (benchmarks/README.md, "Timings the code quotes"; the class stage's size is compiled already)
        scores, preds = scorer(crops[rows.to(crops.device)], labels.to(scorer.device), eager=True)
        correct = int((preds == labels.to(preds.device)).sum())
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise nonfinite_scores(cfg.observer, cfg.amp, bad, decoded, "training images in the observer check")
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
