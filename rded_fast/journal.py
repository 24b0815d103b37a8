"""The distill journal: per-class completion records that make a run resumable and mergeable.

A class's record is written (atomically, fsynced) only after all its images are on disk, so after a
crash every recorded class is complete and every unrecorded one is redone from the same plan, giving
the same bytes. Ranks of a torchrun job each write their classes' records; rank 0 merges them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_many, atomic_write_text
from rded_fast.index import files_fingerprint

JOURNAL_DIR = ".rded-journal"


def journal_dir(out: str | Path) -> Path:
    return Path(out) / JOURNAL_DIR


def write_run(out: str | Path, run: dict) -> None:
    """The parameters a resume must match (written once, when the output folder is created)."""
    atomic_write_text(journal_dir(out) / "run.json", json.dumps(run, indent=1, sort_keys=True))


def check_run(out: str | Path, run: dict) -> None:
    """Refuse a --resume whose run record (parameters, observer, versions, device) differs from the interrupted
    run's: one line naming what changed and the fix."""
    path = journal_dir(out) / "run.json"
    if not path.is_file():
        raise UserError(
            f"--resume: {out} holds no interrupted rded-fast run ({path} is missing); use an empty --out or --overwrite"
        )
    before = json.loads(path.read_text())
    changed = _difference(before, run)
    if changed is None:
        return
    key, was, now = changed
    fix = "resume with what the interrupted run used, or start a new --out (or replace it with --overwrite)"
    if key == "observer.weights_sha256":
        raise UserError(
            f"--resume: the observer's weights changed since the interrupted run (sha256 {str(was)[:12]} then, "
            f"{str(now)[:12]} now: --weights {run.get('weights')} was retrained or replaced); {fix}"
        )
    if key == "classes" and isinstance(was, list) and isinstance(now, list):
        raise UserError(f"--resume: {_class_order_change(was, now)}; {fix}")
    if was is None and isinstance(now, dict):
        raise UserError(f"--resume: the interrupted run recorded no {key} (an older rded-fast made it); {fix}")
    raise UserError(f"--resume: {key} was {was!r} in the interrupted run, now {now!r}; {fix}")


def _class_order_change(was: list[str], now: list[str]) -> str:
    """What changed in the class order (label -> folder) since the interrupted run, and the likely cause."""
    cause = "the --class-map file was edited, or class folders were added or removed"
    for label, (a, b) in enumerate(zip(was, now)):
        if a != b:
            return f"the class order changed since the interrupted run (class {label} was {a!r}, now {b!r}: {cause})"
    return f"the class order changed since the interrupted run ({len(was)} classes then, {len(now)} now: {cause})"


def _difference(before: dict, now: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """The first key (dotted into nested records) whose value differs, with both values; None when equal."""
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _difference(a, b, f"{prefix}{key}.")
            if inner is not None:
                return inner
        elif not _same_value(key, a, b):
            return f"{prefix}{key}", a, b
    return None


PATH_KEYS = ("data", "weights", "class_map")


def _same_value(key: str, a, b) -> bool:
    """Equal run parameters; paths are compared resolved (`data` and `/abs/path/data` are the same data)."""
    if a == b:
        return True
    if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and os.path.exists(a) == os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def sources_fingerprint(index, label: int) -> str:
    """A hash of class `label`'s source files as they are now: relative path with byte size and modification time
    (or, for converted sources, .beton and shards, whose index is all there is: the indexed size and the token of its
    stored bytes, `index.content`; a lazy index's sizes change as headers are read, so they are not part of a file's
    print). A resume redoes a finished class whose sources changed."""
    ids = np.flatnonzero(index.labels == label)
    fallback = index.sizes[ids] if index.content is None else np.column_stack([index.sizes[ids], index.content[ids]])
    return files_fingerprint(index.root, [index.paths[i] for i in ids], fallback)


def write_class(out: str | Path, label: int, record: dict, index=None) -> None:
    """Record class `label` as finished; with `index`, also the fingerprint of its sources (for --resume)."""
    if index is not None:
        record = {**record, "sources": sources_fingerprint(index, label)}
    atomic_write_text(journal_dir(out) / f"class_{label:06d}.json", json.dumps(record, indent=1))


def write_classes(out: str | Path, records: list[dict]) -> None:
    """Several classes' records with one durability pass (each record's "label" names its file)."""
    atomic_write_many(
        [(journal_dir(out) / f"class_{int(r['label']):06d}.json", json.dumps(r, indent=1).encode("utf-8")) for r in records]
    )


def still_current(out: str | Path, records: dict[int, dict], index) -> dict[int, dict]:
    """The finished classes whose sources are unchanged; the others are to be redone, and are listed in
    the journal's redone.json (for the manifest and the console)."""
    keep, redone = {}, []
    for label, record in records.items():
        if "sources" in record and label < index.num_classes and record["sources"] != sources_fingerprint(index, label):
            redone.append(record["class"])
        else:
            keep[label] = record
    path = journal_dir(out) / "redone.json"
    if redone:
        atomic_write_text(path, json.dumps(redone))
    else:
        path.unlink(missing_ok=True)
    return keep


def forget_classes(out: str | Path, records: list[dict]) -> None:
    """Before finished classes are redone: remove each one's journal record, then the image files it lists (only
    those, inside `out`), so that a redo giving fewer images, or none, leaves no old image beside the manifest."""
    root = Path(out).resolve()
    for record in records:
        (journal_dir(out) / f"class_{int(record['label']):06d}.json").unlink(missing_ok=True)
        for image in record.get("images", []):
            path = (root / image["file"]).resolve()
            if path.is_relative_to(root) and path.is_file():
                path.unlink()


def read_redone(out: str | Path) -> list[str]:
    """Classes the last --resume redid because their source images had changed."""
    path = journal_dir(out) / "redone.json"
    return json.loads(path.read_text()) if path.is_file() else []


def read_classes(out: str | Path) -> dict[int, dict]:
    """Every completed class's record, by label."""
    records = {}
    for path in sorted(journal_dir(out).glob("class_*.json")):
        record = json.loads(path.read_text())
        records[int(record["label"])] = record
    return records
