"""Where a student's targets come from, per epoch and batch, all on the training device.

Four sources: the images' own labels (`hard`, one-hot, CutMix-mixed), the teacher labelling each augmented batch
(`online`, the reference's way), a labels folder of `relabel` replayed (`stored`: the epoch's augmentation
parameters and top-k logits), or region labels (`region`: one stored label per cell, mixed by the area a crop
covers). An epoch's parameters and stored labels are copied to the device once (`LabelSource.epoch`); a batch's
targets are then computed there without a host synchronisation (`LabelSource.targets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rded_fast.train import softlabels
from rded_fast.train.augment import Augmenter, DeviceEpoch, host_to_device, mixed_targets, sample_epoch
from rded_fast.train.recipe import Recipe
from rded_fast.train.regions import region_targets, region_weights

KINDS = ("hard", "online", "stored", "region")


@dataclass
class EpochTargets:
    """One student's epoch on the device: its augmentation, and what its targets are read from (stored top-k
    logits [N, k] in training order, or the region weights [N, g^2] of its crops)."""

    aug: DeviceEpoch
    encoded: dict[str, torch.Tensor] | None = None
    mixed: torch.Tensor | None = None  # hard and region labels: every sample's target [N, C], CutMix-mixed


@dataclass
class LabelSource:
    """The run's targets. `teacher`: the teacher's forward (eager or compiled) for online labels; `folder`: the
    labels folder for stored and region labels; `cell_probs` [N, g^2, C] for region labels; `labels` [N] the
    images' own classes, on the device."""

    kind: str
    recipe: Recipe
    num_classes: int
    size: int
    factor: int
    labels: torch.Tensor
    device: torch.device
    amp: torch.dtype | None = None
    teacher: nn.Module | None = None
    header: dict | None = None
    folder: Path | None = None
    cell_probs: torch.Tensor | None = None

    @property
    def shared_views(self) -> bool:
        """Whether every student sees the same augmented views (stored labels replay one recorded epoch)."""
        return self.kind == "stored"

    def epoch(self, seed: int, epoch: int, augmenter: Augmenter) -> EpochTargets:
        """Student `seed`'s parameters and labels of `epoch`, copied to the device once."""
        if self.kind == "stored":
            aug, encoded = softlabels.read_epoch(self.folder, epoch)
            return EpochTargets(augmenter.prepare(aug), encoded=softlabels.encoded_to_device(encoded, self.device))
        r = self.recipe
        aug = sample_epoch(seed, epoch, len(self.labels), r.batch_size, self.factor, self.size, r.cutmix_beta)
        on_device = augmenter.prepare(aug)
        if self.kind == "hard":
            return EpochTargets(on_device, mixed=mixed_targets(self.labels, on_device, self.num_classes))
        if self.kind == "region":
            grid = int(round(self.cell_probs.shape[1] ** 0.5))
            weights = host_to_device(region_weights(aug, self.size, self.factor, grid).astype(np.float32), self.device)
            return EpochTargets(on_device, mixed=region_targets(self.cell_probs, weights, on_device))
        return EpochTargets(on_device)

    def targets(self, plan: EpochTargets, b: int, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Batch `b`'s targets [B, C] (float32): mixed one-hot labels, or teacher probabilities at the recipe's
        temperature (`teacher_logits`: the teacher's logits of this student's batch, for online labels)."""
        t, sl = self.recipe.temperature, plan.aug.batch_slice(b)
        if plan.mixed is not None:
            return plan.mixed[sl]
        if self.kind == "online":
            return torch.softmax(teacher_logits / t, dim=1)
        enc = plan.encoded
        indices = enc["indices"][sl] if "indices" in enc else None
        return softlabels.decode_probs(enc["values"][sl], indices, enc["lse"][sl], self.num_classes, t)
