"""The observer of a distill run and its scorer: built, checked for the input size, warmed for the class stage."""

from __future__ import annotations

import numpy as np
import torch

from rded_fast.compile_rule import resolve_compile
from rded_fast.config import DistillConfig
from rded_fast.device import amp_name, resolve_amp
from rded_fast.errors import UserError
from rded_fast.index import DatasetIndex, read_class_map
from rded_fast.models import BuiltModel, build
from rded_fast.models.heads import HeadTooSmall, find_head, split_head
from rded_fast.observer_check import check_observer_input
from rded_fast.score import Scorer, score_chunk
from rded_fast.select import selector


def build_observer(cfg: DistillConfig, index: DatasetIndex, device: torch.device) -> tuple[BuiltModel, Scorer]:
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
    if selector(cfg.select).scores:
        scorer.warm(cfg.input_size // cfg.factor)
    return observer, scorer


def make_scorer(cfg: DistillConfig, observer: BuiltModel, device: torch.device, crops: int) -> Scorer:
    """The run's scorer for `observer` (not warmed); `crops`: how many the run scores (for --compile auto).
    For a selection that needs features (rded-cover) the observer is split at its head, so the pass that scores a
    crop also gives its features."""
    model, head = observer.model, None
    if selector(cfg.select).features:
        if find_head(model) is None:
            raise UserError(
                f"--select {cfg.select}: observer {observer.name} has no Linear classifier head, and {cfg.select} groups a "
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


def scoring_choices(scorer: Scorer) -> dict:
    """What `--amp auto` and `--compile auto` resolved to: both decide the scores (a CPU with native bf16 picks
    other cells than fp32), so a resume must match them and the manifest records them."""
    return {"amp": amp_name(scorer.amp_dtype), "compile": scorer.compiled}
