"""How an output of ours is recognised and what a run of ours writes inside it: the `Layout` type and the helpers
around it (`read_json` for recognisers, `of_recorded` behind `Layout.written`, the temporary-name pattern).

Every output that rded_fast.outputs claims is claimed by its Layout: the formats declare theirs beside their readers
(`formats.beton.BETON`, `formats.shards.SHARD_FOLDER`); rded_fast.outputs declares the commands' other outputs (the
distilled set, a labels folder, the demo folder, an observer checkpoint, an evaluate result).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rded_fast.lock import LOCK_SUFFIX


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# fileio's temporary names (.NAME.XXXXXXXX.tmp) and the lock files of nested outputs (.NAME.rded-lock[.SUFFIX])
TEMPORARY = re.compile(r"(?P<dir>(?:.*/)?)\.(?P<name>[^/]+)\.[a-z0-9_]{8}\.tmp")
_LOCK = re.compile(rf"(?P<dir>(?:.*/)?)\.(?P<name>[^/]+){re.escape(LOCK_SUFFIX)}(?:\.[^/]+)?")


def of_recorded(names: set[str]) -> Callable[[str], bool]:
    """relative path -> written by a run of ours: a name in `names` (what our records list), or the temporary file
    or lock file of such a name. Nothing is judged by its look alone (rded_fast.records)."""

    def written(rel: str) -> bool:
        if rel in names:
            return True
        match = TEMPORARY.fullmatch(rel) or _LOCK.fullmatch(rel)
        return match is not None and match["dir"] + match["name"] in names

    return written


@dataclass(frozen=True)
class Layout:
    """One kind of output: a folder (`kind` "dir") or a file, how an earlier one of ours is recognised, and, for
    folders, `records(folder)`: the relative paths our records (manifest, journal, header, dataset.json...) say
    a run of ours wrote there. Everything else inside is the user's. A `shared` output is read by other runs (a
    converted source): its writer holds the exclusive lock of rded_fast.sharing, so that no reader meets it.
    `beside`: the files written next to the output, named NAME + suffix."""

    kind: str
    recognise: Callable[[Path], bool]
    records: Callable[[Path], set[str]] = lambda folder: set()
    shared: bool = False
    beside: tuple[str, ...] = ()  # suffixes of the files a run writes beside the output (a .beton's sidecar)
    beside_ours: Callable[[Path], bool] | None = None  # recognises them; one it does not is refused (None: not here)

    def written(self, folder: Path) -> Callable[[str], bool]:
        """relative path -> whether a run of ours wrote it in `folder` (its records, read now)."""
        return of_recorded(self.records(folder))
