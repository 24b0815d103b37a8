"""Read a distilled set (ours: images + manifest.json) into memory for student training.

The set is what the manifest lists, in its order: a listed image that is missing or cannot be decoded is left out
and an image in the class folders that the manifest does not list is not used; either way a note says so (a
deleted or stray file must not change the training set silently).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rded_fast.errors import UserError
from rded_fast.formats.folder import build_index
from rded_fast.loaders.torch_loader import decode_rgb
from rded_fast.manifest import read_manifest
from rded_fast.train.memory_dataset import DECODE_ERRORS


@dataclass
class DistilledSet:
    """images [N, 3, S, S] uint8, labels [N] (indices into `classes`, the observer's order), files [N];
    `notes`: what differed between the manifest and the folders (missing, undecodable or unlisted files)."""

    root: Path
    images: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    classes: list[str]
    factor: int
    ipc: int
    manifest: dict | None
    notes: list[str] = field(default_factory=list)


def _listed(files: list[str], most: int = 3) -> str:
    return ", ".join(files[:most]) + (f" and {len(files) - most} more" if len(files) > most else "")


def load_distilled(root: str | Path) -> DistilledSet:
    """Load `root`: the images its manifest.json lists, with the manifest's classes (the observer's order) and
    factor. Notes (`DistilledSet.notes`) name what the folders hold beyond or below the manifest."""
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():  # the factor decides ShufflePatches and the soft labels' regions: it cannot be guessed
        raise UserError(
            f"--distilled {root}: no manifest.json, which says which images the set holds and how they were stitched; "
            "give a folder written by `rded-fast distill` (with its manifest.json), or distill again"
        )
    manifest = read_manifest(manifest_path, "--distilled")
    classes = manifest.classes
    present = sorted({m["class"] for m in manifest.images}, key=classes.index)
    on_disk = set(build_index(root, class_map=present, show_progress=False, headers=False).paths) if present else set()
    listed = [(m["file"], classes.index(m["class"])) for m in manifest.images]
    images, labels, files, missing, broken = [], [], [], [], []
    for rel, label in listed:
        if rel not in on_disk:
            missing.append(rel)
            continue
        try:
            images.append(decode_rgb(str(root / rel)))
        except DECODE_ERRORS as exc:
            broken.append(f"{rel} ({type(exc).__name__})")
            continue
        labels.append(label)
        files.append(rel)
    notes = []
    if missing:
        notes.append(f"{len(missing)} image(s) the manifest lists are missing and were left out: {_listed(missing)}")
    if broken:
        notes.append(f"{len(broken)} image(s) the manifest lists could not be decoded and were left out: {_listed(broken)}")
    stray = sorted(on_disk - {rel for rel, _ in listed})
    if stray:
        notes.append(f"{len(stray)} image(s) in the class folders are not in the manifest and were not used: {_listed(stray)}")
    if not images:
        raise UserError(f"--distilled {root}: none of the {len(listed)} images its manifest lists could be read; distill again")
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1 or images[0].shape[1] != images[0].shape[2]:
        raise UserError(f"{root}: images must all be square and the same size, found {sorted(sizes)[:3]}")
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    ipc = int(np.bincount(label_tensor.numpy()).max())
    return DistilledSet(root, torch.stack(images), label_tensor, files, classes, manifest.factor, ipc, manifest.raw, notes)
