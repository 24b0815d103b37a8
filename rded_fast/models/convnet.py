"""ConvNet-D (RDED's conv3..conv6): D blocks of conv3x3(128) -> BatchNorm -> ReLU -> AvgPool(2), then Linear.

State-dict keys match RDED's released checkpoints: layers.conv.{d}.*, layers.norm.{d}.*, classifier.*.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, input_size: int, width: int = 128, channels: int = 3):
        super().__init__()
        if input_size % (2**depth):
            raise ValueError(f"conv{depth} needs an input size divisible by {2**depth}, got {input_size}")
        convs, norms = [], []
        in_ch = channels
        for _ in range(depth):
            convs.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=1))
            norms.append(nn.BatchNorm2d(width))
            in_ch = width
        self.layers = nn.ModuleDict({"conv": nn.ModuleList(convs), "norm": nn.ModuleList(norms)})
        self.pool = nn.AvgPool2d(2)
        feat = input_size // (2**depth)
        self.classifier = nn.Linear(width * feat * feat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.layers["conv"], self.layers["norm"]):
            x = self.pool(torch.relu(norm(conv(x))))
        return self.classifier(torch.flatten(x, 1))
