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


class _NanLogits(nn.Module):
    """A working CNN whose logits are all NaN (what an fp16 overflow gives)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = tiny_observer(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * float("nan")


def nan_logits(num_classes: int = 10) -> nn.Module:
    return _NanLogits(num_classes)


class _NanWhenPadded(nn.Module):
    """Finite logits for whole images, NaN for padded crops (zero corners): passes the observer check, then
    gives NaN scores only inside the class loop."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = tiny_observer(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = (x[:, :, 0, 0] == 0).all(dim=1, keepdim=True)
        return torch.where(padded, float("nan"), self.body(x))


def nan_when_padded(num_classes: int = 10) -> nn.Module:
    return _NanWhenPadded(num_classes)


class _Huge(nn.Module):
    """Logits near 1e6: finite in fp32 and bf16, infinite in fp16 (its largest value is 65504)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = tiny_observer(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        return logits * 1e6 + 1e6


def huge_logits(num_classes: int = 10) -> nn.Module:
    return _Huge(num_classes)


def tiny_student(num_classes: int = 10) -> nn.Module:
    """A small CNN with BatchNorm and Dropout: a student whose steps draw random numbers (dropout)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32, num_classes),
    )


def tiny_student_without_dropout(num_classes: int = 10) -> nn.Module:
    """tiny_student less its Dropout: a compiled step then computes what the eager one does (to float rounding)."""
    return nn.Sequential(*[m for m in tiny_student(num_classes) if not isinstance(m, nn.Dropout)])


def stuck_thread_then_wait(num_classes: int = 10) -> nn.Module:
    """Leaves a non-daemon thread that never ends (as a preload thread stuck on an import lock does), writes the file
    named by $RDED_TEST_READY, then waits in the main thread until a signal ends the run (the output is claimed)."""
    import os
    import threading
    import time
    from pathlib import Path

    threading.Thread(target=threading.Event().wait, name="stuck-forever").start()
    Path(os.environ["RDED_TEST_READY"]).write_text("ready")
    while True:
        time.sleep(0.05)
