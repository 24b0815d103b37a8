"""An opened data source (`rded_fast.formats.open`): its index and where each indexed image's bytes are.

One open reads a converted source's sidecar once and keeps both halves of it, so a loader never reopens the
container: a tree's images are files under `index.root`; a shard folder's are members of its tars
(rded_fast.formats.shards.ShardTable); a .beton's are samples of its image field (rded_fast.formats.beton.BetonTable).
"""

from __future__ import annotations

from dataclasses import dataclass

from rded_fast.index import DatasetIndex


@dataclass
class Source:
    """`kind`: the format's name (rded_fast.formats: FOLDER, SHARDS, BETON); `index`: class order, original paths and
    sizes; `table`: where a converted source keeps each indexed image (None for a tree: the files themselves)."""

    kind: str
    index: DatasetIndex
    table: object | None = None  # ShardTable | BetonTable (their modules build a Source: no import back from here)
