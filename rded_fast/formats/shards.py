"""The layout of a shard folder (written by `converters/shards.py`): its read and write schema, read without DALI.

A shard folder holds webdataset tar shards (`shard-00000.tar`, ...), one DALI index file per shard
(`shard-00000.idx`), a per-shard record of what it holds (`shard-00000.meta.json`) and one
`dataset.json`. The dataset JSON carries the ImageFolder index of the source tree as it was converted
(class order, original relative paths and original sizes), so a plan made from it is the plan the torch
loader makes from the source tree, plus, per indexed image, where its bytes are (shard, data offset,
length) or, for an image left out at convert time, why. This module is the one place that knows those
names; the converter writes them and the DALI loader reads them.

What is checked when a shard folder is opened: each tar's size, and its first and last images (their tar headers,
which name the sample key, and their bytes: `ends_sha256`, two reads per shard) against what dataset.json records,
so shards swapped, replaced or left from another conversion are refused even at the same size. What a resume
compares per class (`content_tokens`): each shard's print of the source files it was converted from, its size and
that digest, so a class whose shards were converted again from changed images is redone.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rded_fast.errors import UserError
from rded_fast.formats.sidecar import read_sidecar
from rded_fast.formats.source import Source
from rded_fast.index import DatasetIndex, files_fingerprint, require_class_order
from rded_fast.layout import Layout, read_json

NAME = "shards"  # the format's one name (rded_fast.formats, `convert --format`, converters/shards.py)
DATASET_FILE = "dataset.json"
FORMAT_NAME = "rded-fast/webdataset-shards"
FORMAT_VERSION = 2  # 2: each shard's source print and its first and last images' digest (1 recorded only sizes)
# how our dataset.json begins (json.dumps of a dict whose first key is "format"): a folder is taken for shards only
# when its dataset.json is ours, not a file of the same name in a user's ImageFolder
SIGNATURE = b'{"format": "' + FORMAT_NAME.encode() + b'"'
TAR_HEADER = 512
IMAGE_EXT = "jpg"  # the webdataset component names of one sample
LABEL_EXT = "cls"
META_EXT = "json"


def shard_stem(number: int) -> str:
    """`shard-00012` for shard 12; tar, index and meta files add `.tar`, `.idx`, `.meta.json`."""
    return f"shard-{number:05d}"


def sample_key(image_id: int) -> str:
    """The webdataset key of index entry `image_id`: digits only, so no dot can split it."""
    return f"{image_id:09d}"


def is_shard_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a complete shard folder to read: its dataset.json exists and begins with our format's
    SIGNATURE (a user's own dataset.json in an ImageFolder is not ours); `is_shard_folder` is the looser test of an
    earlier output of ours, finished or not, that a new convert may replace."""
    try:
        with open(Path(path) / DATASET_FILE, "rb") as f:
            return f.read(len(SIGNATURE)) == SIGNATURE
    except OSError:
        return False


SHARD_FILE = re.compile(r"shard-\d{5}\.(tar|idx)")


def check_not_bare_shards(path: str | os.PathLike) -> None:
    """Refuse a folder of our tar shards or DALI index files (named as ours: `shard-00000.tar`) without our
    `dataset.json` (read as an ImageFolder it would have no class folders): name the missing file. A stray `.tar`
    of another name is no shard of ours."""
    if not os.path.isdir(path) or is_shard_dir(path):
        return
    with os.scandir(path) as it:
        shards = sorted(
            (e.name for e in it if e.is_file() and SHARD_FILE.fullmatch(e.name)), key=lambda n: (not n.endswith(".tar"), n)
        )
    if shards:
        raise UserError(
            f"--data {path}: holds tar shards ({shards[0]}{', ...' if len(shards) > 1 else ''}) but no {DATASET_FILE}, "
            "which rded-fast reads them by; convert the ImageFolder again with `rded-fast convert --format shards`"
        )


@dataclass
class ShardTable:
    """Where each indexed image's JPEG bytes are in a shard folder (its index is the Source's).

    For index entry i: `shard[i]` (-1 when it was left out at convert time, see `missing[i]`), `offset[i]` (byte
    offset of the JPEG data in that tar) and `nbytes[i]`. `tars` are absolute paths, by shard number.
    """

    tars: list[str]
    shard: np.ndarray  # [N] int64
    offset: np.ndarray  # [N] int64
    nbytes: np.ndarray  # [N] int64
    missing: dict[int, str]


def ends_sha256(tar: str | os.PathLike, first: tuple[int, int], last: tuple[int, int]) -> str:
    """sha256 of a shard's first and last images as stored: each one's tar header (which names its sample key, the
    image's index id) and its bytes, given as (data offset, length). Two reads: what the open of a shard folder checks
    against dataset.json (another tar of the same size differs there)."""
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        for offset, nbytes in (first, last):
            f.seek(offset - TAR_HEADER)
            h.update(f.read(TAR_HEADER + nbytes))
    return h.hexdigest()


def _check_shards(folder: Path, path: Path, shards: list[dict]) -> None:
    """Each listed tar present, of its recorded size, holding its recorded first and last images."""
    rerun = "rerun the convert command to rewrite it (complete shards are kept)"
    for shard in shards:
        if not shard["tar"]:
            continue
        tar = folder / shard["tar"]
        if not tar.is_file():
            raise UserError(f"{tar}: listed in {path} but absent; {rerun}")
        if tar.stat().st_size != shard["bytes"]:
            raise UserError(
                f"{tar}: {tar.stat().st_size} bytes but {path} records {shard['bytes']} (truncated or changed); {rerun}"
            )
        ends = shard["ends"]
        if ends_sha256(tar, ends["first"], ends["last"]) != ends["sha256"]:
            raise UserError(
                f"{tar}: its first and last images are not those {path.name} records (shards swapped, replaced, or "
                f"from another conversion); {rerun}"
            )


def content_tokens(shard: np.ndarray, shards: list[dict]) -> np.ndarray:
    """Per index entry, a token of what its shard holds (60 bits of a hash of the shard's source print, size and ends
    digest; 0 for an image left out). A resume compares them per class, so a class whose shard was converted again
    from changed images is redone, while one converted again from the same files (the same bytes) is kept."""

    def token(s: dict) -> int:
        if not s["tar"]:
            return 0
        return int(hashlib.sha256(json.dumps([s["sources"], s["bytes"], s["ends"]["sha256"]]).encode()).hexdigest()[:15], 16)

    tokens = np.asarray([token(s) for s in shards] + [0], dtype=np.int64)
    return tokens[np.where(shard >= 0, shard, len(shards))]


def open_shards(folder: str | os.PathLike, class_map: list[str] | None = None) -> Source:
    """Read `folder/dataset.json` once into the folder's index and byte table, its shards checked; a `class_map` must
    equal the class order it was converted with. UserError naming the file and the fix when it is absent or foreign."""
    folder = Path(folder).resolve()
    path = folder / DATASET_FILE
    data = read_sidecar(
        path, FORMAT_NAME, FORMAT_VERSION, "make the folder with `rded-fast convert --format shards --data DIR --out FOLDER`"
    )
    index = DatasetIndex.from_json({**data["index"], "root": str(folder)})
    samples = data["samples"]
    missing = {int(k): v for k, v in data.get("missing", {}).items()}
    tars = [str(folder / s["tar"]) if s["tar"] else "" for s in data["shards"]]
    _check_shards(folder, path, data["shards"])
    shard = np.asarray(samples["shard"], dtype=np.int64)
    index.content = content_tokens(shard, data["shards"])
    offset, nbytes = (np.asarray(samples[key], dtype=np.int64) for key in ("offset", "nbytes"))
    table = ShardTable(tars=tars, shard=shard, offset=offset, nbytes=nbytes, missing=missing)
    return Source(NAME, require_class_order(index, class_map, folder), table)


class ShardBytes:
    """JPEG bytes of index entries, sliced from memory-mapped tars at the offsets of dataset.json; each tar
    is mapped once, on first use, and `get` may be called from several threads."""

    def __init__(self, shards: ShardTable):
        self.shards = shards
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _map(self, number: int) -> mmap.mmap:
        with self._lock:
            if number not in self._maps:
                with open(self.shards.tars[number], "rb") as f:
                    self._maps[number] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._maps[number]

    def get(self, image_id: int) -> np.ndarray:
        """The stored JPEG of index entry `image_id` (an entry the converter kept): a read-only view."""
        number = int(self.shards.shard[image_id])
        return np.frombuffer(
            self._map(number), np.uint8, count=int(self.shards.nbytes[image_id]), offset=int(self.shards.offset[image_id])
        )

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                m.close()
            self._maps.clear()


# ---- the write schema: what `convert --format shards` writes (converters/shards.py), the records read above ----


def sample_record(index: DatasetIndex, image_id: int, reencoded: bool) -> dict:
    """The `<key>.json` member of index entry `image_id`'s sample: its original path, size and class, and whether its
    JPEG was re-encoded."""
    label = int(index.labels[image_id])
    width, height = (int(v) for v in index.sizes[image_id])
    return {
        "path": index.paths[image_id],
        "width": width,
        "height": height,
        "label": label,
        "class": index.classes[label],
        "reencoded": reencoded,
    }


def planned_record(number: int, ids: list[int], index: DatasetIndex) -> dict:
    """What shard `number`'s record (`shard-NNNNN.meta.json`) holds before its files are written, and what a rerun
    compares to keep it: the source folder, the index entries it holds (ids, paths, labels) and their files' print."""
    paths = [index.paths[i] for i in ids]
    return {
        "shard": number,
        "source_root": index.root,
        "ids": ids,
        "paths": paths,
        "labels": [int(index.labels[i]) for i in ids],
        "sources": files_fingerprint(index.root, paths),
    }


def tar_ends(tar: Path, samples: list[dict]) -> dict:
    """What a reader checks of a shard's contents (rded_fast.formats.shards): where its first and last images are and
    the digest of their tar headers and bytes."""
    first = min(samples, key=lambda r: r["offset"])
    last = max(samples, key=lambda r: r["offset"])
    ends = [[first["offset"], first["nbytes"]], [last["offset"], last["nbytes"]]]
    return {"first": ends[0], "last": ends[1], "sha256": ends_sha256(tar, *ends)}


def dataset_record(index: DatasetIndex, records: list[dict], limit: int) -> dict:
    """The dataset JSON: the source index, per-image shard/offset/length, shards, counts and skips."""
    n = len(index)
    shard, offset, nbytes = np.full(n, -1, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    reencoded = np.zeros(n, bool)
    missing, convert_skipped = {}, []
    for rec in records:
        for s in rec["samples"]:
            shard[s["id"]], offset[s["id"]], nbytes[s["id"]], reencoded[s["id"]] = (
                rec["shard"],
                s["offset"],
                s["nbytes"],
                s["reencoded"],
            )
        for s in rec["skipped"]:
            missing[str(s["id"])] = s["reason"]
            convert_skipped.append({"path": s["path"], "reason": s["reason"]})
    written = shard >= 0
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source_root": index.root,
        "classes": index.classes,
        "class_counts": np.bincount(index.labels[written], minlength=index.num_classes).tolist(),
        "num_samples": int(written.sum()),
        "num_reencoded": int(reencoded.sum()),
        "shard_size": limit,
        "shards": [
            {
                "tar": r["tar"],
                "idx": r["idx"],
                "samples": len(r["samples"]),
                "bytes": r["tar_bytes"],
                "sources": r["sources"],
                **({"ends": r["ends"]} if r["tar"] else {}),
            }
            for r in records
        ],
        "index": index.to_json(),
        "samples": {
            "shard": shard.tolist(),
            "offset": offset.tolist(),
            "nbytes": nbytes.tolist(),
            "reencoded": reencoded.tolist(),
        },
        "missing": missing,
        "skipped": index.skipped + convert_skipped,
    }


# ---- the output of `convert --format shards`: how an earlier one is recognised, and what it holds ----


def is_shard_folder(path: Path) -> bool:
    """A folder written by `convert --format shards`, finished or not (our dataset.json, or shards named as ours
    write them): what `convert --overwrite` may replace. A folder to read is `is_shard_dir`."""
    record = read_json(path / DATASET_FILE)
    return (record is not None and record.get("format") == FORMAT_NAME) or any(path.glob("shard-[0-9][0-9][0-9][0-9][0-9].*"))


def shard_record(folder: Path, number: int) -> dict | None:
    """The record `shard-NNNNN.meta.json` of shard `number` in `folder` when it is one of ours (it names its shard and
    source), else None. The converter writes it before the shard's files (planned) and again when they are complete."""
    record = read_json(folder / f"{shard_stem(number)}.meta.json")
    if record is None or record.get("shard") != number or not isinstance(record.get("source_root"), str):
        return None
    return record


def recorded_shards(folder: Path) -> dict[int, dict]:
    """shard number -> its record, for every shard record of ours in `folder`."""
    found = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        stem = path.name.removesuffix(".meta.json")
        if stem != path.name and stem.startswith("shard-") and stem[6:].isdigit() and stem == shard_stem(int(stem[6:])):
            record = shard_record(folder, int(stem[6:]))
            if record is not None:
                found[record["shard"]] = record
    return found


def shard_files(record: dict, number: int) -> set[str]:
    """The tar and DALI index the record of shard `number` (its record, or its dataset.json entry) names; only
    the names that shard's files have, so that no record can point elsewhere."""
    stem = shard_stem(number)
    return {record[k] for k, ext in (("tar", ".tar"), ("idx", ".idx")) if record.get(k) == stem + ext}


def shard_records(folder: Path) -> set[str]:
    """What the records of a shard folder say a run of ours wrote there: dataset.json, every shard record and
    the files each names, and the shards dataset.json lists (rded_fast.records: names alone decide nothing)."""
    names = {DATASET_FILE}
    dataset = read_json(folder / DATASET_FILE)
    if dataset is not None and dataset.get("format") == FORMAT_NAME and isinstance(dataset.get("shards"), list):
        for number, entry in enumerate(dataset["shards"]):
            names |= shard_files(entry, number) if isinstance(entry, dict) else set()
    for number, record in recorded_shards(folder).items():
        names |= {f"{shard_stem(number)}.meta.json", *shard_files(record, number)}
    return names


SHARD_FOLDER = Layout("dir", is_shard_folder, shard_records, shared=True)
