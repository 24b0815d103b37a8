"""Score crops: how typical the observer finds each crop of its class (RDED.md 1.3-1.5).

uint8 crops -> float [0, 1] -> ImageNet normalisation (for every dataset, as the reference does) ->
zero-pad centrally to the observer's input size (zero = the mean colour) -> observer (eval, no grad)
-> per-crop cross-entropy with the true class. Lower is more realistic.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """[N, 3, H, W] float in [0, 1] -> normalised by `mean`/`std` (ImageNet's by default), same dtype."""
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def normalize_uint8(images: torch.Tensor, dtype: torch.dtype = torch.float32, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """[N, 3, H, W] uint8 -> normalised float (ImageNet's mean/std by default)."""
    return normalize(images.to(dtype) / 255.0, mean, std)


def center_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad [N, C, p, p] to size x size: top/left get floor(pad/2), bottom/right the rest."""
    ph, pw = size - images.shape[-2], size - images.shape[-1]
    if ph == 0 and pw == 0:
        return images
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def crop_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[label] per row, in float32."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def make_scorer(
    model: nn.Module,
    input_size: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = True,
    compile: bool = False,
    batch_size: int = 512,
    native: bool = False,
    fixed_shape: bool | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The scoring engine: (crops [N, 3, p, p] uint8, labels [N]) -> (scores [N] float32, top-1 [N] int64).

    Everything between the loader's uint8 batch and the scores is one function: uint8 -> float,
    normalise, centre-pad to `input_size` (skipped when `native`: the p x p crop is scored as it is,
    which is not RDED), channels-last, autocast in `amp_dtype` (None = the fp32 reference path), the
    observer, per-crop cross-entropy. Results stay on `device` (no host sync). With `compile`, the
    function goes through torch.compile with fixed shapes: every call is padded to `batch_size` crops,
    so it compiles once (CUDA graphs on CUDA via mode "reduce-overhead"); `fixed_shape` (default:
    `compile`) controls that padding. `mean`/`std`: the observer's input normalisation (RDED's
    ImageNet values by default; timm models may carry others).
    """
    fixed_shape = compile if fixed_shape is None else fixed_shape
    device = torch.device(device)
    model = model.to(device).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    def fused(crops: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_uint8(crops, mean=mean, std=std)
        if not native:
            x = center_pad(x, input_size)
        x = x.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        return crop_cross_entropy(logits, labels), logits.argmax(1)

    step = fused
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" else None
        step = torch.compile(fused, dynamic=False, mode=mode)

    def score(crops: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(crops)
        scores = torch.empty(n, dtype=torch.float32, device=device)
        preds = torch.empty(n, dtype=torch.int64, device=device)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = crops[start : start + batch_size].to(device, non_blocking=True)
                y = labels[start : start + batch_size].to(device, non_blocking=True)
                m = len(chunk)
                if fixed_shape and m < batch_size:  # fixed shapes: pad with zero crops, drop their results
                    chunk = torch.cat([chunk, chunk.new_zeros((batch_size - m, *chunk.shape[1:]))])
                    y = torch.cat([y, y.new_zeros(batch_size - m)])
                s, p = step(chunk, y)
                scores[start : start + m] = s[:m]
                preds[start : start + m] = p[:m]
        return scores, preds

    return score
