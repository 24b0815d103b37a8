"""The JSON record a converter writes beside its output (a .beton's sidecar, a shard folder's dataset.json)."""

from __future__ import annotations

import json
from pathlib import Path

from rded_fast.errors import UserError


def read_sidecar(path: Path, format_name: str, version: int, unreadable: str) -> dict:
    """The JSON a converter wrote beside its output (a .beton's sidecar, the shards' dataset.json), checked to be
    of `format_name` and `version`; a UserError naming the file and the fix otherwise (`unreadable`: what to say
    when it cannot be read at all)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}); {unreadable}") from exc
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); convert the data again") from exc
    if data.get("format") != format_name or data.get("version") != version:
        raise UserError(
            f"{path}: format {data.get('format')!r} version {data.get('version')!r}, expected "
            f"{format_name!r} version {version}; convert the data again with this rded-fast"
        )
    return data
