"""The layout of an FFCV .beton and its sidecar (written by `converters/beton.py`): its read and write schema, read
without ffcv.

`rded-fast convert --format beton --out train.beton` writes `train.beton` (ffcv's own format: an RGB image
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

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rded_fast.errors import UserError
from rded_fast.formats.sidecar import read_sidecar
from rded_fast.formats.source import Source
from rded_fast.index import DatasetIndex, require_class_order
from rded_fast.layout import Layout, read_json

NAME = "beton"  # the format's one name (rded_fast.formats, `convert --format`, converters/beton.py)
FORMAT_NAME = "rded-fast/ffcv-beton"
FORMAT_VERSION = 1
IMAGE_FIELD = "image"
LABEL_FIELD = "label"
FIELDS = {IMAGE_FIELD: "RGBImageField", LABEL_FIELD: "IntField"}  # the .beton's fields, by ffcv's class names
# ffcv's file header (ffcv.types.HeaderType) at offset 0, and the only version its Reader accepts.
FFCV_HEADER = np.dtype(
    [("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")],
    align=True,
)
FFCV_VERSION = 2


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


def bookkeeping_sha256(beton: str | os.PathLike, head_bytes: int, alloc_table_ptr: int) -> str:
    """sha256 of ffcv's bookkeeping in `beton`: the header, field descriptors and per-sample metadata (its first
    `head_bytes`) and the allocation table (from `alloc_table_ptr` to the end). The sidecar records it, so that
    damage there is named before ffcv's reader trips over it; damaged image bytes fail as they decode."""
    h = hashlib.sha256()
    with open(beton, "rb") as f:
        h.update(f.read(head_bytes))
        f.seek(alloc_table_ptr)
        h.update(f.read())
    return h.hexdigest()


def looks_like_beton(path: str | os.PathLike) -> bool:
    """Whether the file `path` begins with an ffcv file header (its version, a few fields, a power-of-two page size,
    an allocation table inside the file): a .beton under another name is still recognised by its content."""
    try:
        with open(path, "rb") as f:
            raw = f.read(FFCV_HEADER.itemsize)
        size = os.path.getsize(path)
    except OSError:
        return False
    if len(raw) < FFCV_HEADER.itemsize:
        return False
    header = np.frombuffer(raw, FFCV_HEADER)[0]
    page = int(header["page_size"])
    return (
        int(header["version"]) == FFCV_VERSION
        and 1 <= int(header["num_fields"]) <= 64
        and page >= 512
        and page & (page - 1) == 0
        and FFCV_HEADER.itemsize <= int(header["alloc_table_ptr"]) < size
    )


def check_intact(beton: Path, size: int, data: dict, side: Path) -> None:
    """Refuse a .beton whose ffcv header does not say what its sidecar does, or, where the sidecar records it,
    whose bookkeeping hash differs (the same size passed the size check)."""
    with open(beton, "rb") as f:
        raw = f.read(FFCV_HEADER.itemsize)
    book = data.get("bookkeeping")
    damaged = len(raw) < FFCV_HEADER.itemsize
    if not damaged:
        header = np.frombuffer(raw, FFCV_HEADER)[0]
        damaged = (
            int(header["version"]) != FFCV_VERSION
            or int(header["num_fields"]) != 2
            or int(header["num_samples"]) != int(data["num_samples"])
            or not int(header["alloc_table_ptr"]) < size
            or (book is not None and int(header["alloc_table_ptr"]) != book["alloc_table_ptr"])
        )
    if not damaged and book is not None:
        damaged = bookkeeping_sha256(beton, book["head_bytes"], book["alloc_table_ptr"]) != book["sha256"]
    if damaged:
        raise UserError(
            f"--data {beton}: damaged (its ffcv header or sample tables differ from what {side.name} recorded); "
            "convert the data again with `rded-fast convert --format beton`"
        )


@dataclass
class BetonTable:
    """Where each indexed image is stored in a .beton (its index is the Source's; `index.sizes` are original pixels).

    For index entry i: `position[i]` is its sample number in the .beton (-1 when it was left out at convert time,
    see `missing[i]`), `stored_sizes[i]` its stored (width, height) ((0, 0) when left out).
    """

    beton: str
    position: np.ndarray  # [N] int64
    stored_sizes: np.ndarray  # [N, 2] int64, (width, height)
    missing: dict[int, str]
    num_samples: int


def open_beton(beton: str | os.PathLike, class_map: list[str] | None = None) -> Source:
    """Read the sidecar of `beton` once into its index and byte table, the .beton checked against it; a `class_map`
    must equal the class order it was converted with. UserError naming the file and the fix when absent, foreign or
    stale."""
    beton = Path(beton).resolve()
    side = sidecar_path(beton)
    how = "make it with `rded-fast convert --format beton --data DIR --out FILE.beton`"
    if beton.is_dir():
        raise UserError(f"--data {beton}: --loader ffcv reads a .beton file, not a folder; {how}")
    if not beton.is_file():
        raise UserError(f"--data {beton}: no such .beton file; {how}")
    if not side.exists() and not beton.name.endswith(".beton"):
        raise UserError(
            f"--data {beton}: an FFCV .beton (by its content) under another name, without the sidecar rded-fast reads it "
            f"by ({side.name}); give it by the name it was converted to (NAME.beton beside NAME.beton.json), read with "
            "--loader ffcv (or auto)"
        )
    data = read_sidecar(side, FORMAT_NAME, FORMAT_VERSION, f"it is the sidecar of {beton.name}; {how}")
    size = beton.stat().st_size
    if size != data["beton_bytes"]:
        raise UserError(
            f"{beton}: {size} bytes but {side.name} records {data['beton_bytes']} (truncated, changed, "
            "or from another conversion); convert the data again"
        )
    check_intact(beton, size, data, side)
    index = DatasetIndex.from_json({**data["index"], "root": str(beton)})
    position = np.asarray(data["position"], dtype=np.int64)
    stored = np.asarray(data["stored_sizes"], dtype=np.int64).reshape(-1, 2)
    if len(position) != len(index) or len(stored) != len(index):
        raise UserError(f"{side}: per-image tables do not match its index; convert the data again")
    if data.get("bookkeeping"):  # a token of the stored bytes, per image: a resume redoes classes after a new conversion
        index.content = np.where(position >= 0, int(data["bookkeeping"]["sha256"][:15], 16), 0).astype(np.int64)
    missing = {int(k): v for k, v in data.get("missing", {}).items()}
    table = BetonTable(
        beton=str(beton), position=position, stored_sizes=stored, missing=missing, num_samples=int(data["num_samples"])
    )
    return Source(NAME, require_class_order(index, class_map, beton), table)


# ---- the write schema: what `convert --format beton` writes (converters/beton.py), the sidecar read above ----


def bookkeeping_record(beton: str | os.PathLike, head_bytes: int, alloc_table_ptr: int) -> dict:
    """The sidecar's `bookkeeping`: where ffcv's bookkeeping lies in `beton` and its digest (`bookkeeping_sha256`),
    which `check_intact` compares and whose first 60 bits are each stored image's content token."""
    return {
        "head_bytes": head_bytes,
        "alloc_table_ptr": alloc_table_ptr,
        "sha256": bookkeeping_sha256(beton, head_bytes, alloc_table_ptr),
    }


def sidecar_record(
    index: DatasetIndex, ids: np.ndarray, sizes: np.ndarray, missing: dict[int, str], beton_bytes: int, options: dict
) -> dict:
    """The sidecar JSON: the source index, per indexed image its .beton position and stored size, and
    per sample (in .beton order) its original path, label, original and stored size; skips and counts."""
    n = len(index)
    position = np.full(n, -1, np.int64)
    position[ids] = np.arange(len(ids))
    stored = np.zeros((n, 2), np.int64)
    stored[ids] = sizes
    skipped = index.skipped + [{"path": index.paths[i], "reason": r} for i, r in sorted(missing.items())]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "beton_bytes": beton_bytes,
        "source_root": index.root,
        "classes": index.classes,
        "class_counts": np.bincount(index.labels[ids], minlength=index.num_classes).tolist(),
        "num_samples": len(ids),
        **options,
        "fields": FIELDS,
        "index": index.to_json(),
        "position": position.tolist(),
        "stored_sizes": stored.tolist(),
        "samples": [
            {
                "path": index.paths[i],
                "label": int(index.labels[i]),
                "original_size": index.sizes[i].tolist(),
                "stored_size": stored[i].tolist(),
            }
            for i in ids.tolist()
        ],
        "missing": {str(i): r for i, r in sorted(missing.items())},
        "skipped": skipped,
    }


# ---- the output of `convert --format beton`: how an earlier one is recognised ----


def is_beton(path: Path) -> bool:
    """A .beton written by `convert --format beton`: its sidecar names our format."""
    record = read_json(sidecar_path(path))
    return record is not None and record.get("format") == FORMAT_NAME


BETON = Layout("file", is_beton, shared=True, beside=(".json",))  # sidecar_path
