"""Read a distilled set (ours: images + manifest.json) into memory for student training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rded_fast.errors import UserError
from rded_fast.index import build_index
from rded_fast.loaders.torch_loader import decode_rgb


@dataclass
class DistilledSet:
    """images [N, 3, S, S] uint8, labels [N] (indices into `classes`, the observer's order), files [N]."""

    root: Path
    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    classes: list[str]
    factor: int
    ipc: int
    manifest: dict | None


def load_distilled(root: str | Path, factor: int | None = None) -> DistilledSet:
    """Load `root`; class order and factor come from its manifest.json (or sorted folders and `factor`)."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is not None:
        classes = manifest["data"]["classes"]
        present = sorted({m["class"] for m in manifest["images"]}, key=classes.index)
        factor = factor or int(manifest["parameters"]["factor"])
    else:
        if factor is None:
            raise UserError(f"{root}: no manifest.json; pass --factor to say how the images were stitched")
        present = classes = None
    index = build_index(root, class_map=present, show_progress=False)
    if len(index) == 0:
        raise UserError(f"{root}: no images found; is it a distilled set (DIR/<class>/<images>)?")
    classes = classes or index.classes
    labels = torch.tensor([classes.index(index.classes[label]) for label in index.labels], dtype=torch.int64)
    images = [decode_rgb(str(root / p)) for p in index.paths]
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1 or images[0].shape[1] != images[0].shape[2]:
        raise UserError(f"{root}: images must all be square and the same size, found {sorted(sizes)[:3]}")
    ipc = int(np.bincount(labels.numpy()).max())
    return DistilledSet(root, torch.stack(images), labels, index.paths, classes, int(factor), ipc, manifest)
