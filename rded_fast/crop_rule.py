"""The one crop rule: how every loader turns a planned box of a decoded image into a p x p crop, and who implements it.

The rule is torchvision's `resized_crop(image, top, left, height, width, [p, p], antialias=True)` (bilinear) on
the decoded uint8 [3, H, W] image, which the torch loader calls and every other loader is measured against:

- Box: (top, left, height, width) in whole pixels of the decoded image, inside it (rded_fast.plan draws them, the
  same for every loader). Only pixels inside the box are read: a tap that falls outside it gets no weight.
- Antialias: per axis a triangle filter; output pixel i is centred at (i + 0.5) * scale inside the box (scale = box
  side / p) with support max(scale, 1), so a downscale averages every pixel it covers and an upscale is plain
  bilinear (align_corners=False); each output pixel's weights are normalised to sum to 1.
- Rounding: every value is rounded to the nearest grey level and clamped to 0..255; the crop is uint8 [3, p, p].

The kernels below implement it with other arithmetic (fixed point, float32, another library's filter), so each has
its tolerance: the largest, mean and 99th-percentile |difference| in grey levels from the rule on the same pixels
and boxes, per crop size, on the conformance cases of tests/test_crop_rule.py (noisy images of 9..159 px a side,
boxes from one pixel to the whole image, crops of 7..64 px: downscales up to 20x and upscales). That test runs every
kernel against the rule (the CUDA ones under `pytest -m gpu`); a new kernel is a row here and an adapter there.
The student's RandomResizedCrop (rded_fast/train/augment.py) applies the same rule to crops no larger than the
image side (upscales only: plain bilinear), in float, with ShufflePatches folded in; tests/test_train.py checks it
against torchvision sample by sample.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CropKernel:
    """One implementation of the rule: `function` ("module:name"), the loaders that cut with it, the devices it runs
    on, and its tolerance against the rule (grey levels: largest, mean, 99th percentile; None: not bounded apart)."""

    name: str
    function: str
    loaders: tuple[str, ...]
    devices: tuple[str, ...]
    max_diff: int
    mean_diff: float
    p99_diff: float | None = None


KERNELS = (
    # the rule itself, per box: torchvision's resized_crop
    CropKernel("torchvision", "rded_fast.loaders.torch_loader:cut_crops", ("torch",), ("cpu",), 0, 0.0, 0.0),
    # numba, vertical pass first into float32 (the ffcv loader's compiled decoder, rded_fast/loaders/ffcv_crops.py)
    CropKernel("numba", "rded_fast.loaders.resample:cut_boxes", ("ffcv",), ("cpu",), 1, 0.2),
    # exact integer weights (1/2048) as two matrix products per chunk of images: the same bytes on any device
    CropKernel("box-resize", "rded_fast.loaders.box_resize:resize_boxes", ("tvjpeg",), ("cpu", "cuda"), 1, 0.25),
    # DALI's graph: fn.slice of the box, then fn.resize with DALI's own antialias filter (CPU, or GPU with "mixed").
    # Its filter departs most on fine detail at large downscales (measured on the cases: max 13, mean 0.63, p99 5 at
    # 7 px); on smooth photographs at 24 px the DALI loader keeps to max 8, mean 0.5, p99 2 (tests/test_dali.py).
    CropKernel("dali", "rded_fast.loaders.dali_loader:crop_pipeline", ("dali",), ("cpu", "cuda"), 16, 0.75, 6.0),
)
