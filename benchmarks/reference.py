"""RDED's reference synthesis workload, re-implemented as its source describes, for speedup baselines.

Per class, one DataLoader batch of mipc images decoded by PIL in 4 workers; each whole image converted
to float (ToTensor) before cropping; num_crop RandomResizedCrops cut in a Python loop; normalised;
centre-padded; scored by the fp32 eager observer in batches of mipc; best crop per image; the best
ipc*factor^2 images; stitched on the CPU with nearest resize; de-normalised and written as JPEG (q75).
It runs the same images as our plan so that only the execution differs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from rded_fast.index import DatasetIndex
from rded_fast.plan import CropPlan
from rded_fast.recipe import CROP_RATIO, CROP_SCALE
from rded_fast.score import IMAGENET_MEAN, IMAGENET_STD, center_pad, crop_cross_entropy
from rded_fast.stitch import stitch


class _ReferenceImages(Dataset):
    def __init__(self, index: DatasetIndex, plan: CropPlan, crop_size: int):
        self.index, self.plan = index, plan
        cropper = transforms.RandomResizedCrop(crop_size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True)
        self.to_tensor, self.cropper = transforms.ToTensor(), cropper
        self.normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, row: int):
        path = os.path.join(self.index.root, self.index.paths[int(self.plan.image_ids[row])])
        image = self.to_tensor(Image.open(path).convert("RGB"))  # the whole image as float first
        crops = torch.stack([self.cropper(image) for _ in range(self.plan.num_crop)])  # Python loop per crop
        return self.normalize(crops), int(self.plan.labels[row])


def reference_distill(
    index: DatasetIndex,
    plan: CropPlan,
    model: torch.nn.Module,
    input_size: int,
    factor: int,
    ipc: int,
    out: str | Path,
    device: torch.device,
    workers: int = 4,
) -> dict:
    """Run the reference-style synthesis over `plan`'s images; returns seconds and images written."""
    t0 = time.perf_counter()
    crop_size = input_size // factor
    n = ipc * factor * factor
    class_batches = [np.flatnonzero(plan.labels == c).tolist() for c in np.unique(plan.labels)]
    loader = DataLoader(_ReferenceImages(index, plan, crop_size), batch_sampler=class_batches, num_workers=workers)
    model = model.to(device).eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = Path(out)
    written = 0
    with torch.no_grad():
        for images, labels in loader:
            m, k = images.shape[:2]
            flat = images.permute(1, 0, 2, 3, 4).reshape(m * k, 3, crop_size, crop_size)
            logits = torch.cat([model(center_pad(flat[i : i + m], input_size).to(device)) for i in range(0, m * k, m)])
            loss = crop_cross_entropy(logits, labels.repeat(k).to(device)).view(k, m).cpu()
            best = loss.argmin(0)
            chosen = flat.view(k, m, 3, crop_size, crop_size)[best, torch.arange(m)]
            order = torch.argsort(loss[best, torch.arange(m)])[:n]
            picked = chosen[order]
            if len(picked) < n:
                continue
            grid = stitch(picked, ipc, factor, input_size) * std + mean
            folder = out / f"{int(labels[0]):05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, image in enumerate(grid):
                arr = (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # truncation, as the reference
                Image.fromarray(arr).save(folder / f"class{int(labels[0]):05d}_id{j:05d}.jpg", quality=75)
                written += 1
    return {"seconds": time.perf_counter() - t0, "images": written}
