"""The data formats rded-fast reads and writes, one module each, and the one place that tells them apart.

- `folder`: an ImageFolder tree (`root/<class>/**/<image>`) and its index cache;
- `shards`: webdataset tar shards with DALI index files and `dataset.json` (`convert --format shards`);
- `beton`: an FFCV `.beton` with its sidecar (`convert --format beton`).

Each module knows its layout: how to recognise it, its read and write schema (the names and records its converter
writes, rded_fast/converters), how to open it, and which names it writes (its `Layout`, for rded_fast.outputs).
Opening the data is one call, `open(data)`: a Source holding the index and where each image's bytes are, so that
a converted source's sidecar is read once per run and no loader reopens the container.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from rded_fast.formats import beton, folder, shards
from rded_fast.formats.source import Source
from rded_fast.index import DatasetIndex
from rded_fast.lock import check_not_held
from rded_fast.sharing import using

FOLDER, SHARDS, BETON = folder.NAME, shards.NAME, beton.NAME
WRITABLE = (SHARDS, BETON)  # what `convert --format` writes
ALIASES = {"dali": SHARDS, "ffcv": BETON}  # earlier spellings of `convert --format`, still accepted


def detect(data: str | os.PathLike) -> str:
    """Which format `data` is, from the data itself: a `.beton` file (by its name, or by its ffcv header under
    another name), a folder with our `dataset.json` (shards), or else an ImageFolder tree (whose listing says what
    is wrong when it is none)."""
    if os.path.isfile(data) and (str(data).endswith(".beton") or beton.looks_like_beton(data)):
        return BETON
    if shards.is_shard_dir(data):
        return SHARDS
    return FOLDER


def open(
    data: str | os.PathLike,
    class_map: list[str] | None = None,
    cache: str | os.PathLike | None = None,
    show_progress: bool = True,
    kind: str | None = None,
) -> Source:
    """`data` read as format `kind` (None: `detect(data)`). A converted source carries the index of the tree it was
    converted from (original paths and sizes, its class order) and where each image is stored, read from its sidecar
    once; a tree is listed, or its cache `cache` reused."""
    kind = kind or detect(data)
    if kind == BETON:
        return beton.open_beton(data, class_map)
    if kind == SHARDS:
        return shards.open_shards(data, class_map)
    shards.check_not_bare_shards(data)
    return folder.open_folder(data, class_map, cache, show_progress)


def reopen(data: str | os.PathLike, index: DatasetIndex) -> Source:
    """The Source of `data` around an `index` another process opened from it (a distill rank's copy of rank 0's, with
    the headers it read): a tree's images are its files; a converted source's byte table is read from its sidecar."""
    kind = detect(data)
    return Source(kind, index, None if kind == FOLDER else open(data, kind=kind).table)


def reading(data: str | os.PathLike, flag: str = "--data") -> AbstractContextManager:
    """Hold the shared lock of a converted source (shard folder, .beton) while a run reads it, so that `convert`
    does not rewrite it under the reader (rded_fast.sharing). Anything else needs no lock of its own (nothing is
    made beside the user's tree), but is refused while a run of ours writes there (a `convert --overwrite` has
    moved the shards aside and is writing new ones: not yet a shard folder)."""
    if detect(data) in (SHARDS, BETON):
        return using(data, flag, exclusive=False)
    check_not_held(Path(os.path.realpath(os.path.expanduser(data))), flag)
    return nullcontext()


__all__ = ["ALIASES", "BETON", "FOLDER", "SHARDS", "WRITABLE", "Source", "detect", "open", "reading", "reopen"]
