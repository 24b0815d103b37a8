"""Fashion-MNIST as a 32x32 RGB PNG ImageFolder (train and test splits), the demo's real dataset.

Read from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/*.gz); where that is
absent, torchvision's downloader is tried. The tree is written once (atomically) and reused.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rded_fast.errors import UserError
from rded_fast.progress import progress

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "00_tshirt_top",
    "01_trouser",
    "02_pullover",
    "03_dress",
    "04_coat",
    "05_sandal",
    "06_shirt",
    "07_sneaker",
    "08_bag",
    "09_ankle_boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("RDED_FAST_DATA", Path.home() / ".cache" / "rded-fast"))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _raw_dir(cache: Path) -> Path:
    if all((DEBIAN_DIR / f).is_file() for pair in FILES.values() for f in pair):
        return DEBIAN_DIR
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache / "torchvision"), train=True, download=True)
        FashionMNIST(str(cache / "torchvision"), train=False, download=True)
    except Exception as exc:
        raise UserError(
            "Fashion-MNIST not found: install Debian's dataset-fashion-mnist (apt-get install "
            f"dataset-fashion-mnist) or allow torchvision to download it ({type(exc).__name__})"
        ) from exc
    return cache / "torchvision" / "FashionMNIST" / "raw"


def load_split(split: str, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64) of `split` ('train' or 'test')."""
    raw = _raw_dir(cache or default_data_dir())
    images_file, labels_file = FILES[split]
    images, labels = _read_idx(raw / images_file), _read_idx(raw / labels_file)
    return images, labels.astype(np.int64)


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """[N, 28, 28] gray -> [N, 32, 32, 3] RGB uint8 (bilinear upsampling, as CIFAR-sized input)."""
    x = torch.from_numpy(images).float()[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    return x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


def write_image_folder(
    out: Path, split: str, per_class: int | None = None, cache: Path | None = None, show_progress: bool = True
) -> Path:
    """Write `split` (optionally the first `per_class` images of each class) as out/<class>/<n>.png once."""
    if (out / ".complete").is_file():
        return out
    images, labels = load_split(split, cache)
    keep = np.arange(len(labels))
    if per_class is not None:
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])
        keep.sort()
    names = [f"{split}_{idx:05d}.png" for idx in keep]
    return write_rgb_folder(out, to_rgb32(images[keep]), labels[keep], CLASSES, names, f"fashion-mnist {split}", show_progress)


def write_rgb_folder(
    out: Path, rgb: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str], desc: str, show_progress: bool
) -> Path:
    """Write images [N, H, W, 3] uint8 as out/<classes[label]>/<name> PNGs, all at once: built in a hidden folder
    beside `out` and renamed into place with a `.complete` marker (a cut-short write is started again)."""
    stage = out.parent / f".{out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    for name in classes:
        (stage / name).mkdir(parents=True)
    for img, label, name in progress(zip(rgb, labels, names), total=len(names), desc=desc, disable=not show_progress):
        Image.fromarray(img).save(stage / classes[label] / name, compress_level=1)
    (stage / ".complete").write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    return out


def prepare(data_dir: Path | None = None, show_progress: bool = True) -> tuple[Path, Path]:
    """The cached train and test ImageFolders under `data_dir` (default ~/.cache/rded-fast)."""
    root = (data_dir or default_data_dir()) / "fashion-mnist-32"
    root.mkdir(parents=True, exist_ok=True)
    return (
        write_image_folder(root / "train", "train", cache=data_dir, show_progress=show_progress),
        write_image_folder(root / "test", "test", cache=data_dir, show_progress=show_progress),
    )
