"""The student's augmentation (RDED.md section 3), split into parameters and their application.

Parameters for a whole epoch are drawn up front from one seeded generator (plain numpy arrays:
sample order, patch-grid permutations, crop boxes, flips, CutMix boxes), then applied batch by batch.
Online relabeling and stored soft labels use the same parameters, so a replay is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from rded_fast.plan import sample_resized_crop_boxes
from rded_fast.score import normalize
from rded_fast.stitch import cell_boxes

CROP_RATIO = (3 / 4, 4 / 3)
AUG_FIELDS = ("order", "row_perm", "col_perm", "boxes", "flip", "mix_perm", "mix_box", "mix_lam")


@dataclass
class EpochAug:
    """One epoch's augmentation parameters for N samples in batches of `batch_size`.

    order [N]: sample indices in training order; row_perm/col_perm [N, factor]: ShufflePatches;
    boxes [N, 4]: RandomResizedCrop (top, left, h, w); flip [N] bool; mix_perm [N]: CutMix partner,
    as a position within the sample's batch; mix_box [B, 4]: (r1, c1, r2, c2) per batch; mix_lam [B].
    """

    order: np.ndarray
    row_perm: np.ndarray
    col_perm: np.ndarray
    boxes: np.ndarray
    flip: np.ndarray
    mix_perm: np.ndarray
    mix_box: np.ndarray
    mix_lam: np.ndarray
    batch_size: int

    @property
    def num_batches(self) -> int:
        return len(self.mix_lam)

    def batch_slice(self, b: int) -> slice:
        return slice(b * self.batch_size, min((b + 1) * self.batch_size, len(self.order)))

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in AUG_FIELDS}


def cutmix_box(size: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The reference's box: side sqrt(1 - lam) of the image, centre uniform, clipped to the image."""
    cut = int(size * np.sqrt(1.0 - lam))
    cr, cc = int(rng.integers(size)), int(rng.integers(size))
    r1, r2 = np.clip([cr - cut // 2, cr + cut // 2], 0, size)
    c1, c2 = np.clip([cc - cut // 2, cc + cut // 2], 0, size)
    return int(r1), int(c1), int(r2), int(c2)


def sample_epoch(seed: int, epoch: int, n: int, batch_size: int, factor: int, size: int, cutmix_beta: float = 1.0) -> EpochAug:
    """Draw every augmentation parameter of `epoch` (a pure function of its arguments)."""
    rng = np.random.default_rng([int(seed), int(epoch), 3])
    order = rng.permutation(n)
    row_perm = np.argsort(rng.random((n, factor)), axis=1)
    col_perm = np.argsort(rng.random((n, factor)), axis=1)
    boxes = sample_resized_crop_boxes(np.array([[size, size]] * n), 1, rng, (1.0 / factor, 1.0), CROP_RATIO)[:, 0]
    flip = rng.random(n) < 0.5
    num_batches = -(-n // batch_size)
    mix_perm = np.zeros(n, dtype=np.int64)
    mix_box = np.zeros((num_batches, 4), dtype=np.int64)
    mix_lam = rng.beta(cutmix_beta, cutmix_beta, size=num_batches)
    for b in range(num_batches):
        lo, hi = b * batch_size, min((b + 1) * batch_size, n)
        mix_perm[lo:hi] = rng.permutation(hi - lo)
        mix_box[b] = cutmix_box(size, float(mix_lam[b]), rng)
    return EpochAug(order, row_perm, col_perm, boxes, flip, mix_perm, mix_box, mix_lam, batch_size)


def _strip_index(perm: np.ndarray, size: int, factor: int) -> np.ndarray:
    """Pixel index map that reorders the factor strips of an axis by `perm` (cells kept intact)."""
    spans = [(top, h) for top, _, h, _ in cell_boxes(size, factor)[::factor]]
    return np.concatenate([np.arange(spans[p][0], spans[p][0] + spans[p][1]) for p in perm])


def shuffle_patches(images: torch.Tensor, row_perm: np.ndarray, col_perm: np.ndarray, factor: int) -> torch.Tensor:
    """ShufflePatches: permute the grid's rows and columns of cells independently per image. [B, C, S, S]."""
    if factor == 1:
        return images
    size = images.shape[-1]
    rows = torch.from_numpy(np.stack([_strip_index(p, size, factor) for p in row_perm])).to(images.device)
    cols = torch.from_numpy(np.stack([_strip_index(p, size, factor) for p in col_perm])).to(images.device)
    b = torch.arange(len(images), device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment_batch(images: torch.Tensor, aug: EpochAug, b: int, factor: int) -> torch.Tensor:
    """Batch `b` of the epoch: ShufflePatches -> RandomResizedCrop -> flip -> normalise -> CutMix.

    `images` [N, 3, S, S] uint8 (the whole distilled set, on the training device); returns float [B, 3, S, S].
    """
    sl = aug.batch_slice(b)
    idx = torch.from_numpy(aug.order[sl]).to(images.device)
    size = images.shape[-1]
    x = shuffle_patches(images[idx], aug.row_perm[sl], aug.col_perm[sl], factor).float() / 255.0
    out = torch.empty_like(x)
    for i, ((top, left, h, w), flip) in enumerate(zip(aug.boxes[sl].tolist(), aug.flip[sl].tolist())):
        crop = TF.resized_crop(x[i], top, left, h, w, [size, size], antialias=True)
        out[i] = crop.flip(-1) if flip else crop
    out = normalize(out)
    r1, c1, r2, c2 = aug.mix_box[b].tolist()
    partner = torch.from_numpy(aug.mix_perm[sl]).to(images.device)
    out[:, :, r1:r2, c1:c2] = out[partner][:, :, r1:r2, c1:c2]
    return out


def mixed_targets(labels: torch.Tensor, aug: EpochAug, b: int, num_classes: int, size: int) -> torch.Tensor:
    """Hard-label targets of batch `b` as `augment_batch` mixes it: each sample's one-hot label, with the
    CutMix box's share of the image given to its partner's label. [B, num_classes] float, rows sum to 1."""
    sl = aug.batch_slice(b)
    onehot = torch.nn.functional.one_hot(labels[torch.from_numpy(aug.order[sl])], num_classes).float()
    r1, c1, r2, c2 = aug.mix_box[b].tolist()
    pasted = (r2 - r1) * (c2 - c1) / float(size * size)
    return (1.0 - pasted) * onehot + pasted * onehot[torch.from_numpy(aug.mix_perm[sl])]
