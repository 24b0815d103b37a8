"""Region-level soft labels: the teacher's labels of each cell of a stitched image, stored once, no teacher in training.

RDED's paper labels each of the factor x factor cells of a stitched image with the teacher's view of that cell
(its public code labels each augmented view instead, which `relabel` stores per epoch). Here `relabel --region
cells` stores one label per cell (the cell resized to the input size, as the teacher would see it alone), and a
student's target for an augmented view is the cells its crop covers, weighted by covered area after
ShufflePatches moved them: a crop inside one cell gets exactly that cell's label. `--region image` stores one
label per image (grid 1), the static image-level control.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from rded_fast.score import normalize
from rded_fast.stitch import cell_boxes
from rded_fast.train.augment import DeviceEpoch, EpochAug, mix_targets

REGION_GRIDS = ("cells", "image")


def grid_of(region: str, factor: int) -> int:
    """Cells per side of the labelled grid: the stitching factor for "cells", 1 for "image"."""
    return factor if region == "cells" else 1


def cell_views(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Each image's `grid` x `grid` cells, each resized to the image size and normalised as the recipe's batches
    are: [N, 3, S, S] uint8 -> [N * grid^2, 3, S, S] float (cells of an image consecutive, row-major)."""
    size = images.shape[-1]
    x = images.float() / 255.0
    cells = [
        TF.resize(x[:, :, top : top + h, left : left + w], [size, size], antialias=True)
        for top, left, h, w in cell_boxes(size, grid)
    ]
    return normalize(torch.stack(cells, dim=1).flatten(0, 1))


def cell_logits(
    teacher: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, grid: int, batch: int = 256
) -> torch.Tensor:
    """The teacher's logits of every cell: [N, 3, S, S] uint8 -> [N * grid^2, C] float (`teacher(x)` -> logits)."""
    per_batch = max(1, batch // (grid * grid))
    return torch.cat([teacher(cell_views(images[i : i + per_batch], grid)) for i in range(0, len(images), per_batch)])


def _strip_overlap(perm: np.ndarray, starts: np.ndarray, spans: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """[B, g] pixels of each original strip inside [start, start + span) once the strips are reordered by `perm`
    [B, g] (position j holds strip perm[:, j]); with g = 1 the one strip is the whole axis."""
    placed = sides[perm]  # [B, g] sizes in their new order
    begin = np.cumsum(placed, axis=1) - placed
    lo = np.maximum(begin, starts[:, None])
    hi = np.minimum(begin + placed, (starts + spans)[:, None])
    overlap_at = np.clip(hi - lo, 0, None)  # by position
    out = np.zeros_like(overlap_at)
    np.put_along_axis(out, perm, overlap_at, axis=1)  # by original strip
    return out


def region_weights(aug: EpochAug, size: int, factor: int, grid: int) -> np.ndarray:
    """[N, grid^2]: the share of each (original) cell in each sample's crop of the epoch, after ShufflePatches
    (rows sum to 1; `aug` as drawn, numpy). Computed once per epoch and copied to the device with it."""
    boxes = aug.boxes
    n = len(boxes)
    if grid == 1:
        return np.ones((n, 1))
    if grid != factor:
        raise ValueError(f"a region grid of {grid} cells per side on a factor {factor} set")
    sides = np.array([h for _, _, h, _ in cell_boxes(size, factor)[::factor]])
    rows = _strip_overlap(aug.row_perm, boxes[:, 0], boxes[:, 2], sides)
    cols = _strip_overlap(aug.col_perm, boxes[:, 1], boxes[:, 3], sides)
    area = (rows[:, :, None] * cols[:, None, :]).reshape(n, grid * grid).astype(np.float64)
    return area / area.sum(axis=1, keepdims=True)


def region_targets(cell_probs: torch.Tensor, weights: torch.Tensor, ep: DeviceEpoch) -> torch.Tensor:
    """Batch `b`'s targets from per-cell probabilities [N, g^2, C] and the epoch's `region_weights` [N, g^2] (both
    on the device, as `ep` is): each crop's covered cells by area, then CutMix's pasted share given to the partner's
    target (as the hard labels mix). [B, C], rows sum to 1."""
    return mix_targets(torch.einsum("ng,ngc->nc", weights, cell_probs[ep.order]), ep)
