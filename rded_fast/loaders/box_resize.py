"""Cut many boxes from many images and resize them at once, on any torch device: two matrix products per chunk.

The filter is torchvision's antialiased bilinear `resized_crop` (the torch loader's crop rule, see
rded_fast/loaders/resample.py for the same rule in numba): per output pixel a triangle over the box, centre
(i + 0.5) * scale, support max(scale, 1), taps outside the box never used, weights normalised. Written as
a dense weight matrix per box and axis, a crop is `Wy @ image @ Wx^T`, so a chunk of images with all their
boxes is two batched matrix products instead of one resize call per crop (B x K calls cannot keep a GPU
busy from Python).

The arithmetic is exact, so a crop's bytes do not depend on which images share its chunk, on the padding,
or on the order a BLAS library sums in: weights are integers summing to 2**WEIGHT_BITS per output pixel,
pixels are integers 0..255, the vertical pass's result is rounded to 1/2**FRACTION_BITS of a grey level,
and every partial sum is an integer below 2**24, which float32 holds exactly. Weights (<= 2048) and the
intermediate (<= 2040) have at most 11 significant bits, so the products stay exact under TF32 matmuls too.
The cost of exactness is the weights' resolution (1/2048): measured against torchvision's `resized_crop`
on the same pixels, the crops differ by at most 1 grey level (tests/test_crop_rule.py).
"""

from __future__ import annotations

import numpy as np
import torch

WEIGHT_BITS = 11  # weights are integers summing to 2048 per output pixel
FRACTION_BITS = 3  # the vertical pass keeps 1/8 grey level; 255 * 8 = 2040 < 2048
RAW_BITS = 16  # resolution of the unnormalised weights before they are made to sum to 2**WEIGHT_BITS
PIXEL_BUDGET = 1 << 25  # chunk cost (see _chunks): about 32 bytes of work buffers per unit, 1 GiB in all


def axis_weights(start: torch.Tensor, length: torch.Tensor, extent: int, size: int) -> torch.Tensor:
    """Integer weights [*start.shape, size, extent] (float32) of resizing [start, start + length) of an axis of
    `extent` pixels to `size`: each output's weights sum to exactly 2**WEIGHT_BITS.

    Every step is elementwise or an integer sum, so a box's weights do not depend on `extent` (the padding)."""
    start = start.to(torch.float32)[..., None, None]
    length = length.to(torch.float32)[..., None, None]
    device = start.device
    i = torch.arange(size, device=device, dtype=torch.float32)[:, None]
    x = torch.arange(extent, device=device, dtype=torch.float32)
    scale = length / size
    support = scale.clamp(min=1.0)
    offset = (x - start + 0.5) - (i + 0.5) * scale  # source pixel centre minus output centre, in source pixels
    raw = (1.0 - offset.abs() / support).clamp(min=0.0)
    raw = raw * ((x >= start) & (x < start + length))
    raw = torch.floor(raw * (1 << RAW_BITS) + 0.5).to(torch.float64)
    total = raw.sum(-1, keepdim=True)  # a sum of integers in float64: exact in any summation order
    weights = torch.floor(raw * (1 << WEIGHT_BITS) / total + 0.5).to(torch.float32)
    short = (1 << WEIGHT_BITS) - weights.sum(-1, keepdim=True)  # rounding's remainder goes to the largest tap
    return weights.scatter_add_(-1, weights.argmax(-1, keepdim=True), short)


def _chunks(shapes: list[tuple[int, int]], rows: int, budget: int) -> list[list[int]]:
    """Image positions grouped so that each group, padded to its largest height H and width W, costs at most
    `budget` = images x max(H, rows) x max(H, W) (it bounds every work buffer of `resize_boxes`; `rows`:
    output rows per image, K x p); an image costing more is a group alone. Images are taken in order of
    size, so a group's images are alike and little is padded."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i])
    groups: list[list[int]] = []
    height = width = 0
    for i in order:
        h, w = max(height, shapes[i][0]), max(width, shapes[i][1])
        if groups and (len(groups[-1]) + 1) * max(h, rows) * max(h, w) <= budget:
            groups[-1].append(i)
            height, width = h, w
        else:
            groups.append([i])
            height, width = shapes[i]
    return groups


def resize_boxes(images: list[torch.Tensor], boxes: np.ndarray, size: int, budget: int = PIXEL_BUDGET) -> torch.Tensor:
    """Crops [n, K, 3, size, size] uint8 of `images` (n tensors [3, H_i, W_i] uint8 on one device) at `boxes`
    [n, K, 4] (top, left, height, width; whole pixels inside the image), resized with the antialiased bilinear
    rule above. Work runs on the images' device, in chunks of at most `budget` (see _chunks)."""
    n, k = boxes.shape[:2]
    device = images[0].device
    out = torch.empty((n, k, 3, size, size), dtype=torch.uint8, device=device)
    shapes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    for group in _chunks(shapes, k * size, budget):
        height = max(shapes[i][0] for i in group)
        width = max(shapes[i][1] for i in group)
        m = len(group)
        pixels = torch.zeros((m, height, 3, width), dtype=torch.float32, device=device)  # rows of RGB runs
        for j, i in enumerate(group):
            pixels[j, : shapes[i][0], :, : shapes[i][1]] = images[i].permute(1, 0, 2)
        box = torch.as_tensor(boxes[group], device=device)
        wy = axis_weights(box[..., 0], box[..., 2], height, size)  # [m, K, p, H]
        wx = axis_weights(box[..., 1], box[..., 3], width, size)  # [m, K, p, W]
        rows = torch.bmm(wy.view(m, k * size, height), pixels.view(m, height, 3 * width))  # [m, K*p, 3*W]
        del pixels, wy
        rows.mul_(2.0 ** (FRACTION_BITS - WEIGHT_BITS)).add_(0.5).floor_()
        crops = torch.bmm(rows.view(m * k, size * 3, width), wx.view(m * k, size, width).transpose(1, 2))
        crops.mul_(2.0 ** -(FRACTION_BITS + WEIGHT_BITS)).add_(0.5).floor_().clamp_(0, 255)
        index = torch.as_tensor(group, device=device)
        out[index] = crops.to(torch.uint8).view(m, k, size, 3, size).permute(0, 1, 3, 2, 4)
    return out
