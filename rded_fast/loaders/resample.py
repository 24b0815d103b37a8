"""Numba crop-and-resize with torchvision's antialiased bilinear rule, for loaders that run inside numba.

`resize_box` cuts a box from an [H, W, 3] uint8 image and resizes it to [3, p, p] uint8 the way
`torchvision.transforms.v2.functional.resized_crop(..., antialias=True)` does for bilinear: a separable
triangle filter whose support widens with the downscale factor (PIL's and torch's `_upsample_bilinear2d_aa`
rule: centre (i + 0.5) * scale, support max(scale, 1), weights normalised per output pixel), horizontal
pixels outside the box never used. Upscaling is plain bilinear (align_corners=False) under the same
formula. Torch runs the horizontal pass first into a uint8 intermediate, in fixed point; this runs the
vertical pass first into a float32 intermediate (it vectorises over whole row spans: 0.9 ms instead of
1.3 ms for five 112 px crops of a 500x375 image). Measured against torchvision on random images and
RandomResizedCrop boxes: mean |difference| 0.11 grey levels, max 1.

The box may be fractional (a box in original pixels scaled to a smaller stored image); the filter then
samples the fractional interval and clamps to the pixels it touches.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def axis_taps(start: float, length: float, lo: int, hi: int, out_size: int):
    """Filter taps of one axis: output i reads source pixels first[i] .. first[i] + count[i] - 1 with
    weights[i, :count[i]] (float32, summing to 1). The source interval is [start, start + length) in
    source pixels; taps are clamped to pixels [lo, hi)."""
    scale = length / out_size
    support = scale if scale > 1.0 else 1.0
    inv = 1.0 / support
    max_taps = int(math.ceil(2.0 * support)) + 2
    first = np.empty(out_size, np.int64)
    count = np.empty(out_size, np.int64)
    weights = np.zeros((out_size, max_taps), np.float32)
    span = hi - lo
    for i in range(out_size):
        center = start - lo + (i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as in C
        xmax = min(int(center + support + 0.5), span)
        n = min(max(xmax - xmin, 0), max_taps)
        total = 0.0
        for j in range(n):
            w = 1.0 - abs((j + xmin - center + 0.5) * inv)
            w = w if w > 0.0 else 0.0
            weights[i, j] = w
            total += w
        if total > 0.0:
            for j in range(n):
                weights[i, j] /= total
        first[i] = xmin + lo
        count[i] = n
    return first, count, weights


@njit(nogil=True, cache=True)
def _to_u8(value: float) -> np.uint8:
    v = math.floor(value + 0.5)
    return np.uint8(0 if v < 0 else (255 if v > 255 else v))


@njit(nogil=True, cache=True, fastmath=True)
def resize_box(image, top: float, left: float, height: float, width: float, out) -> None:
    """Resize the box (top, left, height, width) of `image` [H, W, 3] uint8 (C-contiguous) into `out`
    [3, p, p] uint8. Vertical pass first over whole contiguous row spans (so it vectorises), into a
    float32 intermediate; then the horizontal pass, written channel-first."""
    h_img, w_img = image.shape[0], image.shape[1]
    p = out.shape[1]
    ylo, yhi = max(int(math.floor(top)), 0), min(int(math.ceil(top + height)), h_img)
    xlo, xhi = max(int(math.floor(left)), 0), min(int(math.ceil(left + width)), w_img)
    fx, nx, wx = axis_taps(left, width, xlo, xhi, p)
    fy, ny, wy = axis_taps(top, height, ylo, yhi, p)
    flat = image.reshape(-1)
    span = (xhi - xlo) * 3
    cols = np.zeros((p, span), np.float32)
    for i in range(p):
        acc = cols[i]
        for t in range(ny[i]):
            w = wy[i, t]
            base = ((fy[i] + t) * w_img + xlo) * 3
            for q in range(span):
                acc[q] += w * flat[base + q]
    for i in range(p):
        acc = cols[i]
        for jx in range(p):
            a0 = a1 = a2 = np.float32(0.0)
            x = (fx[jx] - xlo) * 3
            for j in range(nx[jx]):
                w = wx[jx, j]
                a0 += w * acc[x + 3 * j]
                a1 += w * acc[x + 3 * j + 1]
                a2 += w * acc[x + 3 * j + 2]
            out[0, i, jx] = _to_u8(a0)
            out[1, i, jx] = _to_u8(a1)
            out[2, i, jx] = _to_u8(a2)


@njit(nogil=True, cache=True)
def cut_boxes(image, boxes, out) -> None:
    """All of one image's boxes: `boxes` [K, 4] float64 (top, left, height, width) in the image's pixels,
    `out` [K, 3, p, p] uint8."""
    for k in range(boxes.shape[0]):
        resize_box(image, boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3], out[k])
