"""The layout of a DALI shard folder (written by `converters/dali_shards.py`), read without DALI.

A shard folder holds webdataset tar shards (`shard-00000.tar`, ...), one DALI index file per shard
(`shard-00000.idx`), a per-shard record of what it holds (`shard-00000.meta.json`) and one
`dataset.json`. The dataset JSON carries the ImageFolder index of the source tree as it was converted
(class order, original relative paths and original sizes), so a plan made from it is the plan the torch
loader makes from the source tree, plus, per indexed image, where its bytes are (shard, data offset,
length) or, for an image left out at convert time, why. This module is the one place that knows those
names; the converter writes them and the DALI loader reads them.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rded_fast.errors import UserError
from rded_fast.formats.sidecar import read_sidecar
from rded_fast.index import DatasetIndex, require_class_order
from rded_fast.layout import Layout, read_json

DATASET_FILE = "dataset.json"
FORMAT_NAME = "rded-fast/webdataset-shards"
FORMAT_VERSION = 1
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
    """True when `path` is a complete shard folder to read (its dataset.json exists); `is_shard_folder` is the
    looser test of an earlier output of ours, finished or not, that a new convert may replace."""
    return (Path(path) / DATASET_FILE).is_file()


def check_not_bare_shards(path: str | os.PathLike) -> None:
    """Refuse a folder of tar shards or DALI index files without `dataset.json` (read as an ImageFolder it would
    have no class folders): name the missing file."""
    if not os.path.isdir(path) or is_shard_dir(path):
        return
    with os.scandir(path) as it:
        shards = sorted(
            (e.name for e in it if e.is_file() and e.name.endswith((".tar", ".idx"))), key=lambda n: (not n.endswith(".tar"), n)
        )
    if shards:
        raise UserError(
            f"--data {path}: holds tar shards ({shards[0]}{', ...' if len(shards) > 1 else ''}) but no {DATASET_FILE}, "
            "which rded-fast reads them by; convert the ImageFolder again with `rded-fast convert --format dali`"
        )


@dataclass
class ShardDataset:
    """A converted shard folder: its index and where each indexed image's JPEG bytes are.

    `index.root` is the shard folder; `index.paths` and `index.sizes` are the source tree's. For index
    entry i: `shard[i]` (-1 when it was left out at convert time, see `missing[i]`), `offset[i]` (byte
    offset of the JPEG data in that tar) and `nbytes[i]`. `tars` are absolute paths, by shard number.
    """

    index: DatasetIndex
    tars: list[str]
    shard: np.ndarray  # [N] int64
    offset: np.ndarray  # [N] int64
    nbytes: np.ndarray  # [N] int64
    missing: dict[int, str]
    source_root: str


def load_shard_dataset(folder: str | os.PathLike) -> ShardDataset:
    """Read `folder/dataset.json`; UserError naming the file and the fix when it is absent or foreign."""
    folder = Path(folder).resolve()
    path = folder / DATASET_FILE
    data = read_sidecar(
        path, FORMAT_NAME, FORMAT_VERSION, "make the folder with `rded-fast convert --format dali --data DIR --out FOLDER`"
    )
    index = DatasetIndex.from_json({**data["index"], "root": str(folder)})
    samples = data["samples"]
    missing = {int(k): v for k, v in data.get("missing", {}).items()}
    tars = [str(folder / s["tar"]) if s["tar"] else "" for s in data["shards"]]
    for tar, shard in zip(tars, data["shards"]):
        if tar and not os.path.isfile(tar):
            raise UserError(f"{tar}: listed in {path} but absent; rerun the convert command to rewrite it")
        if tar and os.path.getsize(tar) != shard["bytes"]:
            raise UserError(
                f"{tar}: {os.path.getsize(tar)} bytes but {path} records {shard['bytes']} (truncated or "
                "changed); rerun the convert command to rewrite it"
            )
    return ShardDataset(
        index=index,
        tars=tars,
        shard=np.asarray(samples["shard"], dtype=np.int64),
        offset=np.asarray(samples["offset"], dtype=np.int64),
        nbytes=np.asarray(samples["nbytes"], dtype=np.int64),
        missing=missing,
        source_root=data["source_root"],
    )


def open_shard_index(folder: str | os.PathLike, class_map: list[str] | None = None) -> DatasetIndex:
    """The index stored in a shard folder; a `class_map` must equal the class order it was converted with."""
    return require_class_order(load_shard_dataset(folder).index, class_map, folder)


class ShardBytes:
    """JPEG bytes of index entries, sliced from memory-mapped tars at the offsets of dataset.json; each tar
    is mapped once, on first use, and `get` may be called from several threads."""

    def __init__(self, shards: ShardDataset):
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


# ---- the output of `convert --format dali`: how an earlier one is recognised, and what it holds ----


def is_shard_folder(path: Path) -> bool:
    """A folder written by `convert --format dali`, finished or not (our dataset.json, or shards named as ours
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
