"""The data formats rded-fast reads, one module each, and the one place that tells them apart.

- `folder`: an ImageFolder tree (`root/<class>/**/<image>`) and its index cache;
- `shards`: a DALI shard folder (`convert --format dali`: webdataset tars, DALI index files, dataset.json);
- `beton`: an FFCV `.beton` with its sidecar (`convert --format ffcv`).

Each module knows its layout: how to recognise it, how to read its index (class order, original paths and
sizes) and which names it writes (its `Layout`, for rded_fast.outputs). Loaders only execute plans over an
index opened here; opening the data is one call: `open_index(data)`.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from rded_fast.formats.beton import looks_like_beton, open_beton_index
from rded_fast.formats.folder import load_or_build_index
from rded_fast.formats.shards import check_not_bare_shards, is_shard_dir, open_shard_index
from rded_fast.index import DatasetIndex
from rded_fast.lock import check_not_held
from rded_fast.sharing import using

FOLDER, SHARDS, BETON = "folder", "shards", "beton"


def detect(data: str | os.PathLike) -> str:
    """Which format `data` is, from the data itself: a `.beton` file (by its name, or by its ffcv header under
    another name), a folder with our `dataset.json` (shards), or else an ImageFolder tree (whose listing says what
    is wrong when it is none)."""
    if os.path.isfile(data) and (str(data).endswith(".beton") or looks_like_beton(data)):
        return BETON
    if is_shard_dir(data):
        return SHARDS
    return FOLDER


def open_index(
    data: str | os.PathLike,
    class_map: list[str] | None = None,
    cache: str | os.PathLike | None = None,
    show_progress: bool = True,
    kind: str | None = None,
) -> DatasetIndex:
    """The index of `data` read as format `kind` (None: `detect(data)`). A converted source carries the index of
    the tree it was converted from (original paths and sizes, its class order); a tree is listed, or its cache
    `cache` reused."""
    kind = kind or detect(data)
    if kind == BETON:
        return open_beton_index(data, class_map)
    if kind == SHARDS:
        return open_shard_index(data, class_map)
    check_not_bare_shards(data)
    return load_or_build_index(data, cache, class_map=class_map, show_progress=show_progress)


def reading(data: str | os.PathLike, flag: str = "--data") -> AbstractContextManager:
    """Hold the shared lock of a converted source (shard folder, .beton) while a run reads it, so that `convert`
    does not rewrite it under the reader (rded_fast.sharing). Anything else needs no lock of its own (nothing is
    made beside the user's tree), but is refused while a run of ours writes there (a `convert --overwrite` has
    moved the shards aside and is writing new ones: not yet a shard folder)."""
    if detect(data) in (SHARDS, BETON):
        return using(data, flag, exclusive=False)
    check_not_held(Path(os.path.realpath(os.path.expanduser(data))), flag)
    return nullcontext()
