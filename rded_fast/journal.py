"""The distill journal: per-class completion records that make a run resumable and mergeable.

A class's record is written (atomically, fsynced) only after all its images are on disk, so after a
crash every recorded class is complete and every unrecorded one is redone from the same plan, giving
the same bytes. Ranks of a torchrun job each write their classes' records; rank 0 merges them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_text

JOURNAL_DIR = ".rded-journal"


def journal_dir(out: str | Path) -> Path:
    return Path(out) / JOURNAL_DIR


def write_run(out: str | Path, run: dict) -> None:
    """The parameters a resume must match (written once, when the output folder is created)."""
    atomic_write_text(journal_dir(out) / "run.json", json.dumps(run, indent=1, sort_keys=True))


def check_run(out: str | Path, run: dict) -> None:
    path = journal_dir(out) / "run.json"
    if not path.is_file():
        raise UserError(f"--resume: {out} holds no interrupted rded-fast run ({path} is missing); "
                        "use an empty --out or --overwrite")
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(before) | set(run) if _same_value(k, before.get(k), run.get(k)) is False)
    if changed:
        k = changed[0]
        raise UserError(f"--resume: {k} was {before.get(k)!r} in the interrupted run, now {run.get(k)!r}; "
                        "resume with the same arguments or start a new --out")


PATH_KEYS = ("data", "weights", "class_map")


def _same_value(key: str, a, b) -> bool:
    """Equal run parameters; paths are compared resolved (`data` and `/abs/path/data` are the same data)."""
    if a == b:
        return True
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and os.path.exists(a) == os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def write_class(out: str | Path, label: int, record: dict) -> None:
    atomic_write_text(journal_dir(out) / f"class_{label:06d}.json", json.dumps(record, indent=1))


def read_classes(out: str | Path) -> dict[int, dict]:
    """Every completed class's record, by label."""
    records = {}
    for path in sorted(journal_dir(out).glob("class_*.json")):
        record = json.loads(path.read_text())
        records[int(record["label"])] = record
    return records
