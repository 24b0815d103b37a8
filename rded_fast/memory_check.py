"""The memory check of a distill run: refuse, before any decoding, a run whose smallest working set cannot fit."""

from __future__ import annotations

import math

import numpy as np
import torch

from rded_fast.config import DistillConfig
from rded_fast.device import check_fits
from rded_fast.observer_check import CHECK_IMAGES
from rded_fast.plan import CropPlan
from rded_fast.score import score_chunk
from rded_fast.select import selector


def check_memory(cfg: DistillConfig, plan: CropPlan, num_classes: int, device: torch.device) -> None:
    """Refuse, before any decoding, an --input-size whose smallest working set cannot fit on `device`: the float
    input of one scoring chunk beside the larger of the observer check's uint8 crops and the largest class's uint8
    crops (a selection without scores: that class's crops and its stitched images). Counted from `plan` (usable
    images only), without the observer and its activations: a lower bound, so what it refuses could never run."""
    s, p = cfg.input_size, cfg.input_size // cfg.factor
    per_class = np.bincount(plan.labels, minlength=num_classes)
    class_crops = int(per_class.max(initial=0)) * plan.num_crop
    if not selector(cfg.select).scores:
        need, what = class_crops * 3 * p * p + cfg.ipc * 3 * s * s, f"holding a class's {class_crops} crops"
    else:
        size = p if cfg.score_mode == "native" else s
        chunk = min(score_chunk(cfg.mipc, cfg.num_crop), class_crops)
        check = int(np.minimum(per_class, math.ceil(CHECK_IMAGES / num_classes)).sum())
        need = 12 * chunk * size * size + max(class_crops * 3 * p * p, check * 3 * s * s)
        what = f"scoring {chunk} crops at a time at {size}x{size} px"
    check_fits(need, device, f"--input-size {s}: {what}", "lower --input-size (or --mipc, --num-crop)")
