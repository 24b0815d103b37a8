"""The student's augmentation (RDED.md section 3): parameters drawn per epoch, applied per batch in one pass.

Parameters for a whole epoch are drawn up front from one seeded generator (plain numpy arrays: sample order,
patch-grid permutations, crop boxes, flips, CutMix boxes), copied to the training device once and turned into
per-sample taps there (`prepare_epoch`), then applied batch by batch with no Python loop over samples and no host
synchronisation (`Augmenter.batch`):

- ShufflePatches, RandomResizedCrop and the flip only move and blend whole rows and columns, so each axis is one
  pick of two source lines per output line and one blend: the crop's bilinear taps (the crop rule of
  rded_fast/loaders/box_resize.py, which for a crop no larger than the output is plain bilinear interpolation),
  mapped through ShufflePatches' reordering of the strips, reversed for a flip. The result equals torchvision's
  per-sample `resized_crop` on the shuffled image to float rounding (tests/test_train.py).
- CutMix pastes one box per batch from a permutation of the batch: one copy of the box from the partners, its
  bounds known on the host from the epoch's draw (no wait for the device).

Online relabeling and stored soft labels use the same parameters, so a replay is exact. RECIPE_VERSION (in
rded_fast/train/recipe.py) names this way of applying them: stored labels record it.
"""

from __future__ import annotations

import math
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
    cut = int(size * math.sqrt(1.0 - lam))
    cr, cc = int(rng.integers(size)), int(rng.integers(size))
    clip = lambda v: min(max(v, 0), size)
    return clip(cr - cut // 2), clip(cc - cut // 2), clip(cr + cut // 2), clip(cc + cut // 2)


def sample_epoch(seed: int, epoch: int, n: int, batch_size: int, factor: int, size: int, cutmix_beta: float = 1.0) -> EpochAug:
    """Draw every augmentation parameter of `epoch` (a pure function of its arguments)."""
    rng = np.random.default_rng([int(seed), int(epoch), 3])
    order = rng.permutation(n)
    row_perm = np.argsort(rng.random((n, factor)), axis=1)
    col_perm = np.argsort(rng.random((n, factor)), axis=1)
    boxes = sample_resized_crop_boxes(np.full((n, 2), size), 1, rng, (1.0 / factor, 1.0), CROP_RATIO)[:, 0]
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


@dataclass(frozen=True)
class AugConstants:
    """What every batch of a run shares, made once on the training device (a tensor made from Python numbers per
    batch would be a blocking host-to-device copy on CUDA): the image side, the grid's factor, and the
    normalisation as uint8 -> (x / 255 - mean) / std = x * scale - shift ([1, 3, 1, 1])."""

    size: int
    factor: int
    scale: torch.Tensor
    shift: torch.Tensor


def aug_constants(size: int, factor: int, device: torch.device) -> AugConstants:
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    return AugConstants(
        size=size,
        factor=factor,
        scale=(1.0 / (255.0 * std)).to(torch.float32).view(1, 3, 1, 1).to(device),
        shift=(torch.tensor(IMAGENET_MEAN, dtype=torch.float64) / std).to(torch.float32).view(1, 3, 1, 1).to(device),
    )


def shuffle_map(perm: np.ndarray, size: int) -> np.ndarray:
    """[N, S] source pixel of each pixel of an axis of `size` once its strips are reordered by `perm` [N, factor]
    (position j holds strip perm[:, j]; stitch.cell_boxes: the first size % factor strips are one pixel larger)."""
    spans = np.array([(top, h) for top, _, h, _ in cell_boxes(size, perm.shape[1])[:: perm.shape[1]]])
    placed = spans[:, 1][perm]  # [N, f] strip sides in their new order
    shift = spans[:, 0][perm] - (np.cumsum(placed, axis=1) - placed)  # source start minus new start, per strip
    return np.arange(size) + np.repeat(shift.ravel(), placed.ravel()).reshape(len(perm), size)


def axis_taps(start: np.ndarray, length: np.ndarray, perm: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis, for crops [start, start + length) [N] of images whose strips ShufflePatches reordered by
    `perm` [N, factor], resized to the image side: each output pixel's two source pixels in the unshuffled image
    ([N, 2S] int64: the first taps, then the second) and the second one's weight ([N, S] float32).

    The crop never exceeds the image side, so the resize only enlarges: the antialiased bilinear rule of
    loaders/box_resize.py (a triangle of support 1, taps outside the box unused, weights normalised) is then plain
    bilinear interpolation with the source position clamped to the box."""
    first, last = start[:, None], (start + length - 1)[:, None]
    centre = first + (np.arange(size)[None, :] + 0.5) * (length[:, None] / size) - 0.5
    centre = np.clip(centre, first, last)
    low = np.floor(centre)
    weight = (centre - low).astype(np.float32)
    low = low.astype(np.int64)
    taps = np.concatenate([low, np.minimum(low + 1, last)], axis=1)
    if perm.shape[1] > 1:
        taps = shuffle_map(perm, size).ravel()[taps + size * np.arange(len(taps))[:, None]]
    return taps, weight


@dataclass
class DeviceEpoch:
    """One epoch's augmentation made ready on the training device by `prepare_epoch`, so that a batch is a few
    gathers and blends: the sample order [N]; per sample the row and column taps ([N, 2S] source pixels, [N, S]
    weights; ShufflePatches and the flip folded in); CutMix's partner as a position within the batch and in the
    epoch [N] and the share of the image it pastes [N], and its box per batch (host numbers)."""

    batch_size: int
    order: torch.Tensor
    rows: torch.Tensor
    row_weight: torch.Tensor
    cols: torch.Tensor
    col_weight: torch.Tensor
    mix_perm: torch.Tensor
    partner: torch.Tensor
    share: torch.Tensor
    mix_boxes: list[tuple[int, int, int, int]]  # (r1, c1, r2, c2) per batch, on the host

    @property
    def num_batches(self) -> int:
        return len(self.mix_boxes)

    def batch_slice(self, b: int) -> slice:
        return slice(b * self.batch_size, min((b + 1) * self.batch_size, len(self.order)))


def prepare_epoch(aug: EpochAug, k: AugConstants) -> DeviceEpoch:
    """`aug` (numpy, as drawn) turned into every sample's taps and every batch's CutMix mask on the host, then copied
    to the device once (pinned, not blocking, on CUDA)."""
    device, size, n = k.scale.device, k.size, len(aug.order)
    boxes = np.asarray(aug.boxes, np.int64)
    # rows and columns in one call: [rows of every sample; columns of every sample]
    starts, lengths = np.concatenate([boxes[:, 0], boxes[:, 1]]), np.concatenate([boxes[:, 2], boxes[:, 3]])
    taps, weights = axis_taps(starts, lengths, np.concatenate([aug.row_perm, aug.col_perm]), size)
    rows, cols, row_weight, col_weight = taps[:n], taps[n:], weights[:n], weights[n:]
    flip = np.asarray(aug.flip, bool)
    cols[flip] = cols[flip].reshape(-1, 2, size)[:, :, ::-1].reshape(-1, 2 * size)  # a flip reverses the outputs
    col_weight[flip] = col_weight[flip][:, ::-1]
    box = np.asarray(aug.mix_box, np.int64)  # [B, 4]: r1, c1, r2, c2
    share = ((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]) / float(size * size)).astype(np.float32)
    batch_of = np.arange(len(aug.order)) // aug.batch_size
    mix_perm = np.asarray(aug.mix_perm, np.int64)
    on = [np.asarray(aug.order, np.int64), rows, row_weight, cols, col_weight, mix_perm]
    on += [batch_of * aug.batch_size + mix_perm, share[batch_of]]
    return DeviceEpoch(aug.batch_size, *(host_to_device(a, device) for a in on), [tuple(map(int, r)) for r in box])


class Augmenter:
    """Applies epochs of augmentation to one resident set, batch by batch, into buffers it keeps.

    `images` [N, 3, S, S] uint8, contiguous, on the training device. A batch is: the row taps of its samples taken
    straight from the set (one `index_select` of whole image rows), blended; transposed; the column taps taken and
    blended the same way, written channels last; CutMix's partner pasted inside its box. Every
    intermediate and output lives in a buffer made once per batch shape: on a CPU a fresh allocation per batch
    costs more than the work (new pages to fault in). `batch(..., slot=i)` writes into output buffer `i`, valid
    until the next call with the same slot (one slot per student whose batch must stay alive)."""

    def __init__(self, images: torch.Tensor, factor: int):
        self.images = images.contiguous()
        self.k = aug_constants(int(images.shape[-1]), factor, images.device)
        c, s = images.shape[1], self.k.size
        self._planes = torch.arange(c, device=images.device).view(1, c, 1) * s  # each channel's first line in an image
        self._own: dict[int, torch.Tensor] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
        key = (name, shape)
        if key not in self._buffers:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=self.images.device, memory_format=layout)
        return self._buffers[key]

    def prepare(self, aug: EpochAug) -> DeviceEpoch:
        """The epoch's parameters on the device (`prepare_epoch`)."""
        return prepare_epoch(aug, self.k)

    def _blend(
        self, rows: torch.Tensor, first: torch.Tensor, taps: torch.Tensor, weight: torch.Tensor, name: str, out: torch.Tensor
    ) -> torch.Tensor:
        """`out` [n, C, S, S]: for each (sample, channel, output line) the blend of the two source lines `taps`
        [n, 2S] picks from `rows` ([lines, S]: the lines of every image, `first` [n, C, 1] the first line of each
        sample's channel), by `weight` [n, S]."""
        n, c, s = len(taps), first.shape[1], self.k.size
        index = torch.add(first, taps.view(n, 1, 2 * s), out=self._buffer(name + "-index", (n, c, 2 * s), torch.int64))
        pair = torch.index_select(rows, 0, index.view(-1), out=self._buffer(name + "-pair", (n * c * 2 * s, s), rows.dtype))
        pair = pair.view(n, c, 2 * s, s)
        if pair.dtype != torch.float32:
            pair = self._buffer(name + "-float", (n, c, 2 * s, s)).copy_(pair)
        return torch.lerp(pair[:, :, :s], pair[:, :, s:], weight.view(n, 1, s, 1), out=out)

    def batch(self, ep: DeviceEpoch, b: int, slot: int = 0) -> torch.Tensor:
        """Batch `b` of the epoch: ShufflePatches -> RandomResizedCrop -> flip -> normalise -> CutMix, float32
        [B, 3, S, S] channels last (the layout the models take), in output buffer `slot`."""
        sl = ep.batch_slice(b)
        images, k = self.images, self.k
        n, c, s = len(ep.order[sl]), images.shape[1], k.size
        first = ep.order[sl].view(n, 1, 1) * (c * s) + self._planes  # each sample's channels in the whole set
        x = self._blend(images.view(-1, s), first, ep.rows[sl], ep.row_weight[sl], "rows", self._buffer("rows", (n, c, s, s)))
        # normalised as it is turned (columns become lines): the blends are linear, their weights sum to 1
        turned = torch.addcmul(-k.shift, x.transpose(2, 3), k.scale, out=self._buffer("turned", (n, c, s, s)))
        if n not in self._own:  # each sample's channels in the batch
            self._own[n] = torch.arange(n, device=images.device).view(n, 1, 1) * (c * s) + self._planes
        x = self._blend(
            turned.view(-1, s), self._own[n], ep.cols[sl], ep.col_weight[sl], "cols", self._buffer("cols", (n, c, s, s))
        )
        out = self._buffer(f"out{slot}", (n, c, s, s), channels_last=True)
        out.copy_(x.transpose(2, 3))  # turned back, channels last
        r1, c1, r2, c2 = ep.mix_boxes[b]  # numbers the host drew: slicing by them waits for nothing
        box = out[:, :, r1:r2, c1:c2]
        box.copy_(box.index_select(0, ep.mix_perm[sl]))  # CutMix: the partner's box pasted
        return out


def mix_targets(own: torch.Tensor, ep: DeviceEpoch) -> torch.Tensor:
    """The epoch's targets [N, C] (training order) as CutMix mixes its images: each sample's own target `own`
    [N, C], with the box's share of the image given to its partner's."""
    return torch.lerp(own, own[ep.partner], ep.share[:, None])


def mixed_targets(labels: torch.Tensor, ep: DeviceEpoch, num_classes: int) -> torch.Tensor:
    """Hard-label targets of the epoch as `Augmenter.batch` mixes its images: one-hot labels, CutMix-mixed. [N, C]
    float in training order, rows sum to 1. `labels` [N] on the training device."""
    return mix_targets(torch.nn.functional.one_hot(labels[ep.order], num_classes).float(), ep)
