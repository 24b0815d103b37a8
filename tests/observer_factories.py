"""Factories for `--observer MODULE:FACTORY` tests (imported as tests.observer_factories)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_observer(num_classes: int = 10) -> nn.Module:
    """A small CNN with a Linear head of `num_classes` outputs."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)
    )


def fixed_conv_head() -> nn.Module:
    """Takes no num_classes: 5 outputs from a 1x1 conv head (no Linear layer at all)."""
    return nn.Sequential(nn.Conv2d(3, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class _LinearThenScale(nn.Module):
    """Its last Linear has 7 outputs but the model returns 4 columns: the Linear is not the head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[:, :4] * 2


def linear_not_head(**kwargs) -> nn.Module:
    return _LinearThenScale()


def two_outputs(num_classes: int = 2) -> nn.Module:
    return tiny_observer(2)


def not_a_module(num_classes: int = 10):
    return {"not": "a model"}


def raises(num_classes: int = 10):
    raise RuntimeError("no GPU here")


NOT_CALLABLE = 42
