"""Read a distilled set (ours: images + manifest.json) into memory for student training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rded_fast.errors import UserError
from rded_fast.formats.folder import build_index
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


def _read_manifest(path: Path) -> dict:
    """A distilled set's manifest.json, with the fields a student needs; one line when it is not ours or damaged."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # also UnicodeDecodeError
        raise UserError(f"--distilled {path.parent}: {path.name} is damaged ({exc}); distill again") from None
    if not isinstance(manifest, dict) or not {"data", "images", "parameters"} <= manifest.keys():
        raise UserError(f"--distilled {path.parent}: {path.name} is not a manifest of `rded-fast distill`; distill again")
    return manifest


def load_distilled(root: str | Path, factor: int | None = None) -> DistilledSet:
    """Load `root`; class order and factor come from its manifest.json (or sorted folders and `factor`)."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    manifest = _read_manifest(manifest_path) if manifest_path.is_file() else None
    if manifest is not None:
        classes = manifest["data"]["classes"]
        present = sorted({m["class"] for m in manifest["images"]}, key=classes.index)
        factor = factor or int(manifest["parameters"]["factor"])
    else:
        if factor is None:  # the factor decides ShufflePatches and the soft labels' regions: it cannot be guessed
            raise UserError(
                f"--distilled {root}: no manifest.json, which says how its images were stitched; give a folder "
                "written by `rded-fast distill` (with its manifest.json), or distill again"
            )
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
