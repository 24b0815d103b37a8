"""The loader interface: decode the planned images and cut the planned boxes into uint8 crops.

Every loader (torch, FFCV, DALI) executes the same CropPlan and yields CropBatch objects; only the
speed differs. Images that cannot be decoded are reported per row (`ok` False) and listed in
`failures`, so the run goes on without them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


@dataclass
class CropBatch:
    """One batch of planned rows and their crops.

    rows: [B] int64 plan rows; crops: [B, K, 3, p, p] uint8 (on the loader's device);
    ok: [B] bool, False where the image could not be decoded (its crops are zeros).
    """

    rows: torch.Tensor
    crops: torch.Tensor
    ok: torch.Tensor


class CropLoader(Protocol):
    """Iterates over a plan's rows in order, in batches. `failures` fills as it goes: {row, path, reason}.

    Optional: `source_extra(image_id) -> dict`, extra facts about a source image that the manifest records
    beside each cell (the ffcv loader gives the size its .beton stores the image at)."""

    failures: list[dict]

    def __iter__(self) -> Iterator[CropBatch]: ...

    def __len__(self) -> int: ...
