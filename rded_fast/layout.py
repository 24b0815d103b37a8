"""How an output of ours is recognised and what a run of ours writes inside it: the `Layout` every writer
declares for its output (rded_fast.outputs acts on layouts; the formats and writers own theirs)."""

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


# fileio's temporary names (.NAME.XXXXXXXX.tmp) and the lock files of nested outputs are ours too
_TEMPORARY = re.compile(r"(?P<dir>(?:.*/)?)\.(?P<name>[^/]+)\.[a-z0-9_]{8}\.tmp")
_LOCK = re.compile(rf"(?:.*/)?\.[^/]+{re.escape(LOCK_SUFFIX)}(\.[^/]+)?")


def names_rule(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """relative path -> written by a run of ours (it matches `patterns`, or is a temporary or lock file of it)."""
    names = re.compile("|".join(f"(?:{p})" for p in patterns))

    def written(rel: str) -> bool:
        if _LOCK.fullmatch(rel):
            return True
        tmp = _TEMPORARY.fullmatch(rel)
        return names.fullmatch(tmp["dir"] + tmp["name"] if tmp else rel) is not None

    return written


@dataclass(frozen=True)
class Layout:
    """One kind of output: a folder (`kind` "dir") or a file, how an earlier one of ours is recognised, and,
    for folders, which entries (relative paths) a run of ours writes there; everything else is the user's."""

    kind: str
    recognise: Callable[[Path], bool]
    written: Callable[[str], bool] = lambda rel: True
