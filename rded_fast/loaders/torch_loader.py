"""The reference loader: PIL decoding in DataLoader workers, planned boxes cut and resized by torchvision.

Crops are resized with bilinear interpolation and antialiasing (RDED's RandomResizedCrop setting)
from the uint8 image, so they come out as uint8 [K, 3, p, p] per image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from rded_fast.decode import decode_rgb_array
from rded_fast.formats import FOLDER, Source
from rded_fast.index import DatasetIndex
from rded_fast.loaders.base import BufferRing, CropBatch, CropLoader, LoaderSpec
from rded_fast.plan import CropPlan


def decode_rgb(path: str) -> torch.Tensor:
    """Decode any PIL-readable image to [3, H, W] uint8 RGB by the project's one pixel rule (rded_fast.decode)."""
    return torch.from_numpy(decode_rgb_array(path)).permute(2, 0, 1).contiguous()


def cut_crops(image: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Cut (top, left, height, width) boxes from [3, H, W] uint8 and resize each to size x size.

    Returns [K, 3, size, size] uint8 (bilinear, antialias), the one crop rule of the torch loader.
    """
    out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8)
    for k, (top, left, h, w) in enumerate(boxes.tolist()):
        out[k] = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    return out


class _PlanDataset(Dataset):
    def __init__(self, index: DatasetIndex, plan: CropPlan, size: int):
        self.root, self.paths, self.sizes = index.root, index.paths, index.sizes
        self.plan, self.size = plan, size

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, row: int):
        image_id = int(self.plan.image_ids[row])
        rel = self.paths[image_id]
        k = self.plan.num_crop
        try:
            image = decode_rgb(os.path.join(self.root, rel))
            expect_w, expect_h = (int(v) for v in self.sizes[image_id])
            if image.shape[1:] != (expect_h, expect_w):
                raise ValueError(f"decoded size {image.shape[2]}x{image.shape[1]} differs from indexed {expect_w}x{expect_h}")
            crops = cut_crops(image, self.plan.boxes[row], self.size)
            return row, crops, True, ""
        except Exception as exc:  # one bad file must not stop the run
            return row, torch.zeros((k, 3, self.size, self.size), dtype=torch.uint8), False, f"{type(exc).__name__}: {exc}"


def _collate(items):
    rows, crops, ok, errors = zip(*items)
    return torch.tensor(rows, dtype=torch.int64), torch.stack(crops), torch.tensor(ok, dtype=torch.bool), errors


class TorchCropLoader(CropLoader):
    """Decode with PIL in `workers` processes; yields CropBatch of `batch_size` planned images, in plan order.

    `prefetch`: batches in flight over all workers. With `reuse_buffers` and CUDA present, each batch is
    copied into one of `prefetch + 2` pinned buffers made once (instead of the DataLoader pinning a fresh
    buffer per batch), so the scorer's host-to-device copies run asynchronously without a pinned allocation
    per batch. Without CUDA the workers' batches are handed out as they come (nothing to pin)."""

    def __init__(self, *args, prefetch: int = 2, reuse_buffers: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        workers = self.workers
        pin = torch.cuda.is_available()
        self._ring = BufferRing(prefetch + 2, pin=True) if reuse_buffers and pin else None
        self._loader = DataLoader(
            _PlanDataset(self.index, self.plan, self.crop_size),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=_collate,
            prefetch_factor=max(1, math.ceil(prefetch / workers)) if workers > 0 else None,
            pin_memory=pin and self._ring is None,  # lets the scorer's host-to-device copies run asynchronously
        )

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[CropBatch]:
        for rows, crops, ok, errors in self._loader:
            reasons = {row: err for row, good, err in zip(rows.tolist(), ok.tolist(), errors) if not good}
            if self._ring is not None:
                crops = self._ring.take(tuple(crops.shape)).copy_(crops)
            yield CropBatch(rows=rows, crops=crops, ok=ok, reasons=reasons)


def build(source: Source, plan: CropPlan, crop_size: int, *, batch_size, workers, device, prefetch, reuse_buffers) -> CropLoader:
    """The torch loader as rded_fast.loaders.make_loader builds it (it decodes on the host whatever the device)."""
    return TorchCropLoader(
        source, plan, crop_size, batch_size=batch_size, workers=workers, prefetch=prefetch, reuse_buffers=reuse_buffers
    )


SPEC = LoaderSpec("torch", reads=(FOLDER,), build=build, auto_order={"cpu": 0, "cuda": 3}, reference=True)
