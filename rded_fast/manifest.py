"""manifest.json of a distilled set: its one schema, built in one place and read back in one place.

`build_manifest` turns a finished run (its parameters, the observer, the index and the journal's class
records) into the dict that `distill` writes; `read_manifest` reads a written one back into a `Manifest`
whose fields are what a caller needs to know about a run (the CLI's summary, a student's class order),
so no caller indexes the JSON by key. `summary_lines` is the human summary of what went wrong or was
left out: counts and the first few names, however large the run; the full lists stay in the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rded_fast.index import UNLISTED_CLASS, DatasetIndex
from rded_fast.recipe import CROP_RATIO, CROP_SCALE

SHOWN = 5  # names listed per note; the manifest has them all


def build_manifest(
    parameters: dict,
    versions: dict,
    observer: dict,
    index: DatasetIndex,
    records: list[dict],
    short_classes: dict[str, int],
    redone: list[str],
    seconds: dict,
    world_size: int,
    resumed: int,
    out: Path,
) -> dict:
    """The manifest of a finished run; `records` are the journal's class records in label order."""
    return {
        "tool": "rded-fast",
        "parameters": {
            **parameters,
            "crop_size": parameters["input_size"] // parameters["factor"],
            "cells_per_class": parameters["ipc"] * parameters["factor"] ** 2,
            "scale": list(parameters.get("crop_scale", CROP_SCALE)),
            "ratio": list(CROP_RATIO),
        },
        "versions": versions,
        "observer": observer,
        "data": {
            "root": index.root,
            "images": len(index),
            "classes": index.classes,
            "class_counts": index.class_counts().tolist(),
        },
        "short_classes": short_classes,
        "empty_classes": [name for name, count in short_classes.items() if count == 0],
        "skipped_classes": {r["class"]: r["skipped"] for r in records if r.get("skipped")},
        "fallback_cells": {r["class"]: r["fallback"] for r in records if r["fallback"]},
        "skipped_files": index.skipped,
        "decode_failures": [f for r in records for f in r["failures"]],
        "redone_classes": redone,
        "images": [m for r in records for m in r["images"]],
        "run": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "world_size": world_size,
            "resumed_classes": resumed,
            "out": str(out),
        },
    }


@dataclass
class Manifest:
    """A written manifest, read back: the facts callers use (`raw` keeps the whole dict)."""

    classes: list[str]
    factor: int
    images: list[dict]
    short_classes: dict[str, int] = field(default_factory=dict)
    empty_classes: list[str] = field(default_factory=list)
    skipped_classes: dict[str, str] = field(default_factory=dict)
    fallback_cells: dict[str, int] = field(default_factory=dict)
    skipped_files: list[dict] = field(default_factory=list)
    decode_failures: list[dict] = field(default_factory=list)
    redone_classes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read manifest.json (a KeyError or JSON error means it is not one of ours)."""
    return as_manifest(json.loads(Path(path).read_text()))


def as_manifest(data: dict) -> Manifest:
    """The Manifest of a manifest dict, as `build_manifest` makes it or manifest.json holds it."""
    return Manifest(
        classes=data["data"]["classes"],
        factor=int(data["parameters"]["factor"]),
        images=data["images"],
        short_classes=data.get("short_classes", {}),
        empty_classes=data.get("empty_classes", []),
        skipped_classes=data.get("skipped_classes", {}),
        fallback_cells=data.get("fallback_cells", {}),
        skipped_files=data.get("skipped_files", []),
        decode_failures=data.get("decode_failures", []),
        redone_classes=data.get("redone_classes", []),
        raw=data,
    )


def _names(items) -> str:
    return ", ".join(list(items)[:SHOWN])


def summary_lines(m: Manifest) -> list[str]:
    """One note per kind of thing left out or worked around, with its count and the first few names."""
    notes = []
    if m.short_classes:
        notes.append(
            f"{len(m.short_classes)} class(es) have fewer than --mipc images; all were used: "
            + _names(f"{k} ({v})" for k, v in m.short_classes.items())
        )
    if m.empty_classes:
        notes.append(
            f"{len(m.empty_classes)} class folder(s) have no usable images and get no output: " + _names(m.empty_classes)
        )
    unlisted = [s["path"] for s in m.skipped_files if s["reason"] == UNLISTED_CLASS]
    if unlisted:
        notes.append(f"{len(unlisted)} class folder(s) are not in --class-map and were NOT distilled: " + _names(unlisted))
    skipped = {k: v for k, v in m.skipped_classes.items() if k not in m.empty_classes}
    if skipped:
        name, why = next(iter(skipped.items()))
        notes.append(f"{len(skipped)} class(es) got NO output (too few usable images), e.g. {name}: {why}")
    if m.fallback_cells:
        notes.append(
            f"{len(m.fallback_cells)} class(es) have cells filled with further crops of an already used "
            "picture (fewer usable images than cells): " + _names(f"{k} ({v} cells)" for k, v in m.fallback_cells.items())
        )
    if m.redone_classes:
        notes.append(
            f"{len(m.redone_classes)} finished class(es) were redone because their source images changed "
            "since the interrupted run: " + _names(m.redone_classes)
        )
    if m.skipped_files:
        first = m.skipped_files[0]
        notes.append(
            f"{len(m.skipped_files)} file(s) skipped while indexing (listed in the manifest), e.g. "
            f"{first['path']}: {first['reason']}"
        )
    if m.decode_failures:
        first = m.decode_failures[0]
        notes.append(
            f"{len(m.decode_failures)} image(s) could not be decoded and were skipped, e.g. {first['path']}: {first['reason']}"
        )
    return notes


__all__ = ["Manifest", "as_manifest", "build_manifest", "read_manifest", "summary_lines"]
