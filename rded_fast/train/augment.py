"""The student's augmentation (RDED.md section 3): parameters drawn per epoch, applied per batch in one pass.

Parameters for a whole epoch are drawn up front from one seeded generator (plain numpy arrays: sample order,
patch-grid permutations, crop boxes, flips, CutMix boxes), copied to the training device once (`to_device`), then
applied batch by batch with no Python loop over samples and no host synchronisation (`augment_batch`):

- ShufflePatches, RandomResizedCrop and the flip only move and blend whole rows and columns, so each axis is one
  gather of two source rows (columns) per output row and one blend: the crop's bilinear taps (the crop rule of
  rded_fast/loaders/box_resize.py, which for a crop no larger than the output is plain bilinear interpolation),
  mapped through ShufflePatches' reordering of the strips, reversed for a flip. The result equals torchvision's
  per-sample `resized_crop` on the shuffled image to float rounding (tests/test_train.py).
- CutMix pastes one box per batch from a permutation of the batch: a mask, not a slice, so every shape is fixed.

Online relabeling and stored soft labels use the same parameters, so a replay is exact. RECIPE_VERSION (in
rded_fast/train/recipe.py) names this way of applying them: stored labels record it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rded_fast.plan import sample_resized_crop_boxes
from rded_fast.score import IMAGENET_MEAN, IMAGENET_STD
from rded_fast.stitch import cell_boxes

CROP_RATIO = (3 / 4, 4 / 3)
AUG_FIELDS = ("order", "row_perm", "col_perm", "boxes", "flip", "mix_perm", "mix_box", "mix_lam")


@dataclass
class EpochAug:
    """One epoch's augmentation parameters for N samples in batches of `batch_size` (numpy, or torch on a device
    after `to_device`).

    order [N]: sample indices in training order; row_perm/col_perm [N, factor]: ShufflePatches (position j of the
    shuffled grid holds strip perm[j]); boxes [N, 4]: RandomResizedCrop (top, left, h, w); flip [N] bool;
    mix_perm [N]: CutMix partner, as a position within the sample's batch; mix_box [B, 4]: (r1, c1, r2, c2) per
    batch; mix_lam [B].
    """

    order: np.ndarray | torch.Tensor
    row_perm: np.ndarray | torch.Tensor
    col_perm: np.ndarray | torch.Tensor
    boxes: np.ndarray | torch.Tensor
    flip: np.ndarray | torch.Tensor
    mix_perm: np.ndarray | torch.Tensor
    mix_box: np.ndarray | torch.Tensor
    mix_lam: np.ndarray | torch.Tensor
    batch_size: int

    @property
    def num_batches(self) -> int:
        return len(self.mix_lam)

    def batch_slice(self, b: int) -> slice:
        return slice(b * self.batch_size, min((b + 1) * self.batch_size, len(self.order)))

    def arrays(self) -> dict[str, np.ndarray | torch.Tensor]:
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


def host_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` on `device`: on CUDA through pinned memory without blocking (the copy overlaps the work queued
    before it); on a CPU the array itself, shared."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def to_device(aug: EpochAug, device: torch.device) -> EpochAug:
    """The epoch's parameters as tensors on `device`, copied once (integers as int64, flip as bool)."""
    arrays = {
        k: v.astype(np.float32 if k == "mix_lam" else (np.bool_ if k == "flip" else np.int64)) for k, v in aug.arrays().items()
    }
    return EpochAug(**{k: host_to_device(v, device) for k, v in arrays.items()}, batch_size=aug.batch_size)


@dataclass(frozen=True)
class AugConstants:
    """What every batch of a run shares, made once on the training device (a tensor made from Python numbers per
    batch would be a blocking host-to-device copy on CUDA): the image side, the grid's strips along an axis
    (start, side [factor]; stitch.cell_boxes: the first size % factor strips are one pixel larger), the pixel
    positions, and the normalisation as uint8 -> (x / 255 - mean) / std = x * scale - shift ([1, 3, 1, 1])."""

    size: int
    starts: torch.Tensor
    sides: torch.Tensor
    pixels: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


def aug_constants(size: int, factor: int, device: torch.device) -> AugConstants:
    spans = [(top, h) for top, _, h, _ in cell_boxes(size, factor)[::factor]]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    return AugConstants(
        size=size,
        starts=torch.tensor([s for s, _ in spans], device=device),
        sides=torch.tensor([h for _, h in spans], device=device),
        pixels=torch.arange(size, device=device),
        scale=(1.0 / (255.0 * std)).to(torch.float32).view(1, 3, 1, 1).to(device),
        shift=(torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / std).to(torch.float32).view(1, 3, 1, 1).to(device),
    )


def shuffle_map(perm: torch.Tensor, k: AugConstants) -> torch.Tensor:
    """[B, S] source pixel of each pixel of an axis once its strips are reordered by `perm` [B, factor]."""
    placed = k.sides[perm]  # [B, f] strip sides in their new order
    begin = placed.cumsum(1) - placed
    slot = (k.pixels[None, :, None] >= begin[:, None, :]).sum(-1) - 1  # [B, S] the new strip each pixel is in
    return k.starts[perm.gather(1, slot)] + k.pixels - begin.gather(1, slot)


def _taps(start: torch.Tensor, length: torch.Tensor, perm: torch.Tensor, k: AugConstants) -> tuple[torch.Tensor, ...]:
    """Along one axis, for a crop [start, start + length) of the image whose strips ShufflePatches reordered by
    `perm` [B, factor], resized to the image side: each output pixel's two source pixels (in the unshuffled image)
    and the second one's weight, [B, S] each.

    The crop never exceeds the image side, so the resize only enlarges: the antialiased bilinear rule of
    loaders/box_resize.py (a triangle of support 1, taps outside the box unused, weights normalised) is then plain
    bilinear interpolation with the source position clamped to the box."""
    scale = length.to(torch.float32)[:, None] / k.size
    first, last = start[:, None], (start + length - 1)[:, None]
    centre = start[:, None] + (k.pixels[None, :] + 0.5) * scale - 0.5
    centre = torch.minimum(torch.maximum(centre, first.to(torch.float32)), last.to(torch.float32))
    low = centre.floor()
    weight = centre - low
    low = low.to(torch.int64)
    high = torch.minimum(low + 1, last)
    if perm.shape[1] > 1:
        source = shuffle_map(perm, k)
        low, high = source.gather(1, low), source.gather(1, high)
    return low, high, weight


def _resize_axis(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Interpolate `x` [B, C, S, S] along `dim` (2: rows, 3: columns) at the taps of `_taps`."""
    shape = [len(x), 1, 1, 1]
    shape[dim] = x.shape[dim]
    index = lambda i: i.view(shape).expand_as(x)
    a, b = x.gather(dim, index(low)).to(torch.float32), x.gather(dim, index(high)).to(torch.float32)
    return torch.lerp(a, b, weight.view(shape))


def augment_batch(images: torch.Tensor, aug: EpochAug, b: int, k: AugConstants) -> torch.Tensor:
    """Batch `b` of the epoch: ShufflePatches -> RandomResizedCrop -> flip -> normalise -> CutMix, in one pass.

    `images` [N, 3, S, S] uint8 (the whole distilled set, on the training device); `aug` on the same device
    (`to_device`); returns float32 [B, 3, S, S], channels last (the layout the models take)."""
    sl = aug.batch_slice(b)
    boxes = aug.boxes[sl]
    rows = _taps(boxes[:, 0], boxes[:, 2], aug.row_perm[sl], k)
    flip = aug.flip[sl][:, None]
    cols = [torch.where(flip, t.flip(1), t) for t in _taps(boxes[:, 1], boxes[:, 3], aug.col_perm[sl], k)]
    x = _resize_axis(images[aug.order[sl]], *rows, dim=2)
    x = _resize_axis(x, *cols, dim=3)
    x = x * k.scale - k.shift
    x = torch.where(cutmix_mask(aug.mix_box[b], k), x[aug.mix_perm[sl]], x)
    return x.contiguous(memory_format=torch.channels_last)


def cutmix_mask(box: torch.Tensor, k: AugConstants) -> torch.Tensor:
    """[S, S] bool: the pixels inside CutMix's box (r1, c1, r2, c2) [4], a tensor on the training device."""
    rows = (k.pixels >= box[0]) & (k.pixels < box[2])
    cols = (k.pixels >= box[1]) & (k.pixels < box[3])
    return rows[:, None] & cols[None, :]


def pasted_share(box: torch.Tensor, size: int) -> torch.Tensor:
    """The share of the image CutMix's box (r1, c1, r2, c2) covers: a 0-d float tensor on the box's device."""
    return ((box[2] - box[0]) * (box[3] - box[1])).to(torch.float32) / float(size * size)


def mix_targets(own: torch.Tensor, aug: EpochAug, b: int, size: int) -> torch.Tensor:
    """Batch `b`'s targets [B, C] as CutMix mixes its images: each sample's own target, with the box's share of
    the image given to its partner's."""
    share = pasted_share(aug.mix_box[b], size)
    return (1.0 - share) * own + share * own[aug.mix_perm[aug.batch_slice(b)]]


def mixed_targets(labels: torch.Tensor, aug: EpochAug, b: int, num_classes: int, size: int) -> torch.Tensor:
    """Hard-label targets of batch `b` as `augment_batch` mixes it: one-hot labels, CutMix-mixed. [B, C] float,
    rows sum to 1. `labels` and `aug` on the training device."""
    onehot = torch.nn.functional.one_hot(labels[aug.order[aug.batch_slice(b)]], num_classes).float()
    return mix_targets(onehot, aug, b, size)
