"""The decoded validation set, kept across runs: every `evaluate` of a sweep tests on the same real images.

Decoding a validation split (resize the shorter side to size * 8/7, centre crop, RDED.md section 3) is the
largest fixed cost of an evaluation (ImageNet-1K: 50,000 JPEGs). It is done once per (file list, each file's
bytes and modification time, class mapping, transform) and kept in two places:
- in this process (a benchmark's many students share one split), and
- on disk, under `$RDED_FAST_CACHE` (default `$XDG_CACHE_HOME/rded-fast`, else `~/.cache/rded-fast`), in
  `val/<key>/` (`images.npy` [N, 3, S, S] uint8, `labels.npy`, `record.json` written last). At most
  `$RDED_FAST_CACHE_GB` GiB (default 16) are kept: the entries used least recently are removed first, and a split
  larger than the bound is not stored. `RDED_FAST_CACHE=off` turns the disk cache off.
A changed, added or removed file changes the key, so the split is decoded again; only folders this module wrote
(with its record) are ever removed, and only inside the cache's own `val/` folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rded_fast.fileio import atomic_write_text
from rded_fast.index import DatasetIndex
from rded_fast.train.memory_dataset import load_tensor_dataset

TRANSFORM = "resize-shorter-8/7-center-crop-v1"  # changes when the decode or the transform changes
RECORD = "record.json"
DEFAULT_LIMIT_GB = 16.0
log = logging.getLogger(__name__)
_IN_PROCESS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def cache_dir() -> Path | None:
    """The disk cache's folder, or None when `RDED_FAST_CACHE=off`."""
    place = os.environ.get("RDED_FAST_CACHE", "")
    if place.lower() == "off":
        return None
    if place:
        return Path(place)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rded-fast"


def cache_limit() -> int:
    """The disk cache's bound in bytes (`RDED_FAST_CACHE_GB`, default 16 GiB)."""
    try:
        return int(float(os.environ.get("RDED_FAST_CACHE_GB", DEFAULT_LIMIT_GB)) * 2**30)
    except ValueError:
        return int(DEFAULT_LIMIT_GB * 2**30)


def split_key(index: DatasetIndex, size: int, resize_to: int) -> str:
    """What the decoded split depends on: every file's path, class, bytes and modification time, the class
    names, and the transform. A changed file changes the key."""
    stats = [os.stat(os.path.join(index.root, p)) for p in index.paths]
    parts = [
        TRANSFORM,
        size,
        resize_to,
        str(index.root),
        index.classes,
        index.paths,
        index.labels.tolist(),
        [(s.st_size, s.st_mtime_ns) for s in stats],
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _read(entry: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        images = np.load(entry / "images.npy")
        labels = np.load(entry / "labels.npy")
        record = json.loads((entry / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if record.get("images") != len(images) or len(labels) != len(images):
        return None
    with contextlib.suppress(OSError):  # most recently used; a cache this user may read but not write still serves
        os.utime(entry / RECORD)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _entries(folder: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of every complete entry of ours in `folder`, oldest first."""
    found = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        record = entry / RECORD
        if entry.is_dir() and record.is_file():
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            found.append((record.stat().st_mtime, size, entry))
    return sorted(found)


def _store(folder: Path, key: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write one entry (under a temporary name, renamed when complete), then trim the cache to its bound."""
    need, limit = images.numel() + labels.numel() * 8, cache_limit()
    if need > limit:
        log.warning("the decoded validation split (%.1f GiB) is larger than the cache's bound; not kept", need / 2**30)
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    try:
        np.save(tmp / "images.npy", images.numpy())
        np.save(tmp / "labels.npy", labels.numpy())
        atomic_write_text(tmp / RECORD, json.dumps({"images": len(images), "written": time.time(), "by": "rded-fast"}))
        os.rename(tmp, folder / key)
    except OSError:  # another process stored the same split first, or the disk is full: the split is in memory
        shutil.rmtree(tmp, ignore_errors=True)
        return
    except BaseException:  # interrupted mid-write: no half entry left behind, which no trim would ever count
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(size for _, size, _ in _entries(folder))
    for _, size, entry in _entries(folder):
        if total <= limit or entry.name == key:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size


def load_val(index: DatasetIndex, size: int, show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, str]:
    """([N, 3, size, size] uint8, [N] int64, where it came from: "memory", "disk" or "decoded") for the split."""
    resize_to = size // 7 * 8
    key = split_key(index, size, resize_to)
    if key in _IN_PROCESS:
        return (*_IN_PROCESS[key], "memory")
    folder = cache_dir()
    cached = _read(folder / "val" / key) if folder is not None else None
    source = "disk"
    if cached is None:
        cached = load_tensor_dataset(index, size, resize_to=resize_to, show_progress=show_progress, desc="load val")
        source = "decoded"
        if folder is not None:
            try:
                _store(folder / "val", key, *cached)
            except OSError as exc:  # an unwritable cache costs the next run a decode, not this run
                log.warning("could not keep the decoded validation split in %s: %s", folder, exc)
    _IN_PROCESS.clear()
    _IN_PROCESS[key] = cached
    return (*cached, source)
