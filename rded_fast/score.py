"""Score crops: how typical the observer finds each crop of its class (RDED.md 1.3-1.5).

uint8 crops -> float [0, 1] -> ImageNet normalisation (for every dataset, as the reference does) ->
zero-pad centrally to the observer's input size (zero = the mean colour) -> observer (eval, no grad)
-> per-crop cross-entropy with the true class. Lower is more realistic.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] float in [0, 1] -> ImageNet-normalised, same dtype."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def normalize_uint8(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, 3, H, W] uint8 -> ImageNet-normalised float."""
    return normalize(images.to(dtype) / 255.0)


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
    channels_last: bool = False,
    max_batch: int = 512,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A function (crops [N, 3, p, p] uint8, labels [N]) -> (scores [N] float32, logits [N, C] float32).

    `amp_dtype` (bf16/fp16) runs the observer under autocast; None is the fp32 reference path.
    Forwards are chunked to `max_batch` crops.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def score(crops: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, all_logits = [], []
        with torch.inference_mode():
            for start in range(0, len(crops), max_batch):
                x = center_pad(normalize_uint8(crops[start : start + max_batch].to(device, non_blocking=True)), input_size)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = labels[start : start + max_batch].to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)
                scores.append(crop_cross_entropy(logits, y))
                all_logits.append(logits.float())
        if not scores:
            return torch.zeros(0, device=device), torch.zeros(0, 0, device=device)
        return torch.cat(scores), torch.cat(all_logits)

    return score
