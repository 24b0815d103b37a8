"""Accuracy of a model on uint8 images: the one helper observer training and student evaluation both use."""

from __future__ import annotations

import torch
from torch import nn

from rded_fast.device import autocast
from rded_fast.score import normalize_uint8


def topk_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    batch: int = 500,
    amp: torch.dtype | None = None,
) -> tuple[float, float]:
    """(top-1, top-5) fractions of `model` on uint8 images [N, 3, S, S] with ImageNet normalisation (top-5 = top-1
    with fewer than 5 classes), in eval mode (the model's mode is restored after), autocast to `amp` (None: fp32)."""
    was_training = model.training
    model.eval()
    c1 = c5 = 0
    with torch.no_grad(), autocast(device, amp):
        for i in range(0, len(images), batch):
            logits = model(normalize_uint8(images[i : i + batch].to(device)).contiguous(memory_format=torch.channels_last))
            y = labels[i : i + batch].to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            c1 += int((top[:, 0] == y).sum())
            c5 += int((top == y[:, None]).any(1).sum())
    model.train(was_training)
    return c1 / max(len(images), 1), c5 / max(len(images), 1)
