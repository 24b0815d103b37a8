"""The teacher that labels a student's batches: built for the distilled set's classes, frozen, and checked.

The check is the guard rail of RDED.md section 2 on the student side: the teacher's top-1 on a sample of images
with the class mapping the run will use (evaluate: the real validation set; relabel, which has none: the distilled
set itself). Near chance the run stops before epoch 0: the usual cause is a class order or folder names that do
not match the teacher's outputs ("10 % instead of 40 %").
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rded_fast.chance import near_chance_threshold
from rded_fast.device import autocast
from rded_fast.errors import UserError
from rded_fast.models import BuiltModel, build
from rded_fast.score import IMAGENET_MEAN, IMAGENET_STD
from rded_fast.train.regions import cell_views

CHECK_IMAGES = 500  # images the teacher check scores, spread evenly over the classes


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


def recorded_rows(manifest: dict | None, classes: list[str], teacher: str) -> list[int] | None:
    """The head rows the distilled set's observer used, when the teacher is that observer."""
    observer = (manifest or {}).get("observer", {})
    rows = observer.get("head_rows")
    if observer.get("name") != teacher or not rows or not all(c in rows for c in classes):
        return None
    return [int(rows[c]) for c in classes]


def build_teacher(
    name: str, weights: str | None, classes: list[str], size: int, manifest: dict | None, device: torch.device
) -> tuple[nn.Module, BuiltModel]:
    """(the teacher in eval mode, frozen, channels last, taking the recipe's ImageNet-normalised batches; its
    BuiltModel: head rows and normalisation, for the records)."""
    built = build(name, len(classes), weights, size, classes=classes, head_rows=recorded_rows(manifest, classes, name))
    model = built.model
    if (built.mean, built.std) != (IMAGENET_MEAN, IMAGENET_STD):
        model = nn.Sequential(Renormalize(built.mean, built.std), model)
    model = model.to(device, memory_format=torch.channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, built


def teacher_logits(teacher, x: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    """float32 logits [B, C] of the teacher (a module, or its compiled forward) on normalised batches [B, 3, S, S]."""
    with torch.no_grad(), autocast(device, amp):
        return teacher(x.contiguous(memory_format=torch.channels_last)).float()


def check_sample(labels: np.ndarray, seed: int, limit: int = CHECK_IMAGES) -> np.ndarray:
    """Indices of at most `limit` images spread evenly over the classes of `labels` (seeded), sorted."""
    rng = np.random.default_rng([int(seed), 5])
    classes = np.unique(labels)
    per_class = max(1, limit // max(len(classes), 1))
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    # more classes than `limit`: a seeded choice among all classes' picks, not the first classes' (sorted, a prefix)
    return np.sort(rng.permutation(np.concatenate(picks))[:limit]) if picks else np.zeros(0, dtype=np.int64)


def check_teacher(
    teacher,
    name: str,
    has_weights: bool,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    where: str,
    device: torch.device,
    amp: torch.dtype | None,
    seed: int = 0,
    grid: int = 1,
) -> dict:
    """The teacher's top-1 on a sample of `images` [N, 3, S, S] uint8 with `labels` [N] (the run's class mapping,
    `num_classes` classes); a UserError naming `where` (the images it was measured on) and the usual cause when it
    is near chance (not when the sample is too small for any accuracy to clear the threshold). `grid` > 1: each
    image's grid x grid cells are scored apart, each resized to the image size
    (a distilled set's stitched cells, as region labels see them: a stitched image of four small crops is a
    harder view than any one of them). Returns {"accuracy", "chance", "threshold", "images"}."""
    pick = torch.from_numpy(check_sample(labels.numpy(), seed, max(1, CHECK_IMAGES // (grid * grid))))
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(0, len(pick), 250):
        rows = pick[i : i + 250]
        x = cell_views(images[rows.to(images.device)].to(device), grid)
        y = labels[rows].repeat_interleave(grid * grid).to(device)
        correct += (teacher_logits(teacher, x, device, amp).argmax(1) == y).sum()
    n = len(pick) * grid * grid
    accuracy = int(correct) / n if n else 0.0
    chance, threshold = 1.0 / num_classes, near_chance_threshold(num_classes, n)
    report = {"accuracy": accuracy, "chance": chance, "threshold": threshold, "images": n}
    if not n or accuracy >= threshold or threshold >= 1.0:  # too few images to tell a guess from a teacher
        return report
    head = f"teacher {name} gets {accuracy:.1%} top-1 on {n} images of {where}, near chance ({chance:.1%}; refusing below {threshold:.1%})"
    if not has_weights:
        raise UserError(f"{head}: it has no --teacher-weights, so it is randomly initialised; pass --teacher-weights")
    raise UserError(
        f"{head}. Likely cause: class order: the images' classes and the teacher's outputs must be the same classes in "
        "the same order (--val: class folders named as the distilled set's classes, each holding its own class; "
        "--teacher-weights: the observer the set was distilled with, or one trained on its classes); "
        "--skip-teacher-check overrides"
    )
