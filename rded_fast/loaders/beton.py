"""The layout of an FFCV .beton and its sidecar (written by `converters/ffcv_writer.py`), read without ffcv.

`rded-fast convert --format ffcv --out train.beton` writes `train.beton` (ffcv's own format: an RGB image
field `image` and an int field `label`, readable by stock `ffcv.reader.Reader` and `ffcv.loader.Loader`)
and `train.beton.json`, the sidecar. The sidecar carries the ImageFolder index of the source tree as it
was converted (class order, original relative paths, original sizes: so a plan made from it is the plan
the torch loader makes from the source tree) and, per indexed image, its sample position in the .beton
and its stored size (ffcv may shrink images to `max_resolution`), or, for an image left out at convert
time, why. This module is the one place that knows those names.

Importing ffcv sets torch's CPU thread count to 1 (ffcv's Compiler does it at import), which would slow
every later torch op in the process; `keep_torch_threads` guards every ffcv import and call that does so.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rded_fast.errors import UserError
from rded_fast.index import DatasetIndex, require_class_order
from rded_fast.loaders.base import read_sidecar

FORMAT_NAME = "rded-fast/ffcv-beton"
FORMAT_VERSION = 1
IMAGE_FIELD = "image"
LABEL_FIELD = "label"


def sidecar_path(beton: str | os.PathLike) -> Path:
    """`train.beton` -> `train.beton.json`."""
    return Path(str(beton) + ".json")


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit (ffcv's Compiler resets it on import and on every
    Loader construction and epoch)."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@dataclass
class BetonDataset:
    """A converted .beton: the source index and where each indexed image is stored.

    `index.root` is the .beton path; `index.paths`/`index.sizes` are the source tree's (original pixels).
    For index entry i: `position[i]` is its sample number in the .beton (-1 when it was left out at
    convert time, see `missing[i]`), `stored_sizes[i]` its stored (width, height) ((0, 0) when left out).
    """

    beton: str
    index: DatasetIndex
    position: np.ndarray  # [N] int64
    stored_sizes: np.ndarray  # [N, 2] int64, (width, height)
    missing: dict[int, str]
    num_samples: int
    source_root: str
    write_mode: str


def load_beton_dataset(beton: str | os.PathLike) -> BetonDataset:
    """Read `beton` + its sidecar; UserError naming the file and the fix when absent, foreign or stale."""
    beton = Path(beton).resolve()
    side = sidecar_path(beton)
    how = "make it with `rded-fast convert --format ffcv --data DIR --out FILE.beton`"
    if beton.is_dir():
        raise UserError(f"--data {beton}: --loader ffcv reads a .beton file, not a folder; {how}")
    if not beton.is_file():
        raise UserError(f"--data {beton}: no such .beton file; {how}")
    data = read_sidecar(side, FORMAT_NAME, FORMAT_VERSION, f"it is the sidecar of {beton.name}; {how}")
    size = beton.stat().st_size
    if size != data["beton_bytes"]:
        raise UserError(
            f"{beton}: {size} bytes but {side.name} records {data['beton_bytes']} (truncated, changed, "
            "or from another conversion); convert the data again"
        )
    index = DatasetIndex.from_json({**data["index"], "root": str(beton)})
    position = np.asarray(data["position"], dtype=np.int64)
    stored = np.asarray(data["stored_sizes"], dtype=np.int64).reshape(-1, 2)
    if len(position) != len(index) or len(stored) != len(index):
        raise UserError(f"{side}: per-image tables do not match its index; convert the data again")
    return BetonDataset(
        beton=str(beton),
        index=index,
        position=position,
        stored_sizes=stored,
        missing={int(k): v for k, v in data.get("missing", {}).items()},
        num_samples=int(data["num_samples"]),
        source_root=data["source_root"],
        write_mode=data["write_mode"],
    )


def open_beton_index(beton: str | os.PathLike, class_map: list[str] | None = None) -> DatasetIndex:
    """The index stored beside a .beton; a `class_map` must equal the class order it was converted with."""
    return require_class_order(load_beton_dataset(beton).index, class_map, beton)
