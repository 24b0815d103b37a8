"""manifest.json of a distilled set: its one schema, its records built here from plain data, read back here.

distill builds every record through this module: `class_record` (the journal's record of a finished class, merged
into the manifest at the end), `image_record` and `cell_record` (each output image and its cells), `run_parameters`,
`versions`, `observer_record`, `run_record` (the journal's run.json, which a --resume must match) and
`build_manifest` (the whole file); `manifest_json` writes it. `read_manifest` reads a written one back into a
`Manifest` whose fields are what callers need (the CLI's summary, a student's class order and factor, the
benchmarks' timings), so no caller indexes the JSON by key. `summary_lines` is the human summary of what went
wrong or was left out: counts and the first few names, however large the run; the full lists stay in the file.

The schema (a new field: its record function here, the line below, and the one place that knows its value):

| key | what |
|---|---|
| tool | "rded-fast" (`TOOL`: how outputs recognise a distilled set of ours) |
| parameters | the output-relevant DistillConfig fields (`run_parameters`; loader options each as its own key) plus crop_size, cells_per_class, scale, ratio |
| versions | rded_fast, python, torch, torchvision, numpy, pillow (`versions`) |
| observer | the model's record (BuiltModel.manifest) with check (accuracy, chance, threshold, images; null for a baseline), head_rows (class -> head row), scoring (amp, compile, device, cpu) |
| data | root, images, classes (label order), class_counts |
| short_classes | class -> images, for classes with fewer than --mipc |
| empty_classes | classes with no usable image |
| skipped_classes | class -> why it got no output |
| fallback_cells | class -> cells filled with further crops of a used image |
| skipped_files | {path, reason} of files left out while indexing |
| decode_failures | {path, reason} of planned images that could not be decoded |
| redone_classes | finished classes a --resume redid (their sources changed) |
| images | one `image_record` per output image: file, class, label, cells (`cell_record`: cell, cell_box, rank, source, source_size, box, crop, score, group and group_size for rded-cover, the loader's extra facts) |
| run | created, seconds (by stage), world_size, resumed_classes, out: the one section that differs between runs |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_text
from rded_fast.recipe import CROP_RATIO, CROP_SCALE

if TYPE_CHECKING:
    from rded_fast.index import DatasetIndex

TOOL = "rded-fast"
SHOWN = 5  # names listed per note; the manifest has them all
# Config fields that do not change the output: they may differ between an interrupted run and its resume.
NOT_OUTPUT_RELEVANT = ("out", "overwrite", "overwrite_any", "resume", "show_progress", "workers", "index", "prefetch")


def run_parameters(config: dict) -> dict:
    """The output-relevant parameters of a run's config fields (`config`: name -> value, in field order) as JSON gives
    them back (tuples as lists), so a resume compares like with like; `loader_options` (a mapping) is recorded as a
    parameter per option, in its place."""
    parameters = {}
    for key, value in config.items():
        if key == "loader_options":
            parameters.update(value)
        elif key not in NOT_OUTPUT_RELEVANT:
            parameters[key] = list(value) if isinstance(value, tuple) else value
    return parameters


def versions() -> dict:
    """The versions of this package and of the libraries that decide the output bytes."""
    import platform

    import PIL
    import torch
    import torchvision

    from rded_fast.version import __version__

    return {
        "rded_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def run_record(parameters: dict, paths: dict, classes: list[str], observer: dict, scored_on: dict) -> dict:
    """The journal's run record: everything that decides the output besides the source images (whose changes the
    class records catch): the parameters, the resolved paths (so a resume from another working directory matches),
    the class order, the observer's weights, factory and class rows (`observer`), the library versions (less python)
    and where and in which precision the observer scores (`scored_on`). A --resume must match all of it."""
    return {
        **parameters,
        **paths,
        "classes": list(classes),
        "observer": observer,
        "versions": {k: v for k, v in versions().items() if k != "python"},
        "scored_on": scored_on,
    }


def observer_record(model: dict, check: dict | None, head_rows: dict[str, int], scoring: dict) -> dict:
    """The manifest's `observer`: the model's own record, its check, its head row per class and how it scored."""
    return {**model, "check": check, "head_rows": head_rows, "scoring": scoring}


def class_record(
    label: int,
    name: str,
    planned: int,
    decoded: int,
    failures: list[dict],
    images: list[dict],
    fallback: int = 0,
    skipped: str | None = None,
    sources: str | None = None,
) -> dict:
    """The journal's record of a finished class (the manifest merges them): planned and decoded images, the decode
    failures ({path, reason}), its `image_record`s, fallback cells, why it got no output (`skipped`) and the print of
    its source files (`sources`, for --resume; journal.write_class adds it when not given)."""
    record = {"label": label, "class": name, "planned": planned, "decoded": decoded, "failures": failures}
    if sources is not None:
        record["sources"] = sources
    record.update(images=images, fallback=fallback)
    if skipped is not None:
        record["skipped"] = skipped
    return record


def image_record(file: str, name: str, label: int, cells: list[dict]) -> dict:
    """One output image: its file (relative to the set), class name, label and its cells (`cell_record`)."""
    return {"file": file, "class": name, "label": label, "cells": cells}


def cell_record(
    cell: int, cell_box: list[int], rank: int, source: str, source_size: list[int], box: list[int], crop: int, **more
) -> dict:
    """One cell of an output image: where it sits (`cell_box`), its rank in the class's selection, the source image
    and its size, the crop `box` cut from it and that crop's index; `more`: score, then the selection's and the
    loader's extra facts (group, group_size; e.g. ffcv's stored size)."""
    return {
        "cell": cell,
        "cell_box": cell_box,
        "rank": rank,
        "source": source,
        "source_size": source_size,
        "box": box,
        "crop": crop,
        **more,
    }


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
        "tool": TOOL,
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


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def manifest_json(manifest: dict) -> str:
    """manifest.json's text: indented as json.dumps(indent=1) writes it, except that each distilled image is one
    line. The images are most of the file and one line each keeps them greppable while json's C encoder writes them
    (json's indented encoder is Python, slower: benchmarks/README.md, "Timings the code quotes"); the JSON is the same."""
    pretty = json.JSONEncoder(indent=1, default=_json_default, allow_nan=True)
    line = json.JSONEncoder(default=_json_default, allow_nan=True)
    parts = []
    for key, value in manifest.items():
        if key == "images" and value:
            text = "[\n  " + ",\n  ".join(line.encode(item) for item in value) + "\n ]"
        else:
            text = pretty.encode(value).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}"


def write_manifest(path: Path, manifest: dict) -> None:
    atomic_write_text(path, manifest_json(manifest))


def is_manifest(data: object) -> bool:
    """Whether parsed JSON is a manifest rded-fast wrote."""
    return isinstance(data, dict) and data.get("tool") == TOOL


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
    class_counts: list[int] = field(default_factory=list)  # images per class in the data
    seconds: dict[str, float] = field(default_factory=dict)  # the run's time by stage
    raw: dict = field(default_factory=dict, repr=False)


def read_manifest(path: str | os.PathLike, flag: str = "manifest") -> Manifest:
    """Read manifest.json; one line naming `flag` (the argument that gave its folder) when it is damaged or is not a
    manifest of ours."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # also UnicodeDecodeError
        raise UserError(f"{flag} {path.parent}: {path.name} is damaged ({exc}); distill again") from None
    try:
        return as_manifest(data)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{flag} {path.parent}: {path.name} is not a manifest of `rded-fast distill`; distill again") from None


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
        class_counts=data["data"].get("class_counts", []),
        seconds=data.get("run", {}).get("seconds", {}),
        raw=data,
    )


def _names(items) -> str:
    return ", ".join(list(items)[:SHOWN])


def summary_lines(m: Manifest) -> list[str]:
    """One note per kind of thing left out or worked around, with its count and the first few names."""
    from rded_fast.index import UNLISTED_CLASS  # here: rded_fast.outputs reads manifests without the index

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


__all__ = [
    "TOOL",
    "Manifest",
    "as_manifest",
    "build_manifest",
    "cell_record",
    "class_record",
    "image_record",
    "is_manifest",
    "manifest_json",
    "observer_record",
    "read_manifest",
    "run_parameters",
    "run_record",
    "summary_lines",
    "versions",
    "write_manifest",
]
