"""The DatasetIndex: every image of a data source with its class and stored size, and how it is kept and completed.

An index is the first stage of the pipeline: it fixes the class order (sorted folder names, or an explicit class
map in observer output order) and records each image's size from its header, so the plan can draw crop boxes
without decoding anything. How a source is listed into one is its format's (rded_fast.formats: a tree's listing in
formats/folder.py, a converted source's sidecar); here are the index itself, its compact cache (.npz, reused by
later runs), the header reads that fill it in, and the class map.

Headers are read eagerly (`formats.folder.build_index(..., headers=True)`: every size known, unusable files dropped) for
the commands that use every image (convert, training), or lazily for `distill`, whose plan uses `mipc` of
each class's images: the listing holds every file with its size UNREAD, `read_headers` fills in the planned
ones (marking a file whose header fails UNUSABLE), and the cache keeps what was read for the next run. Each
read size is stamped with the file's byte size and modification time, so a file changed since (an image
saved again at another size) is read again, not planned from its old size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_bytes
from rded_fast.headers import image_size
from rded_fast.progress import progress

INDEX_VERSION = 3  # the .npz cache with lazily read sizes; version 2 (every size known) and 1 (JSON) are still read
READABLE_VERSIONS = (2, 3)
UNREAD = -1  # a size not read yet (lazy index)
UNUSABLE = -2  # a file whose header could not be read; it is listed in `skipped`
JSON_INDEX_VERSION = 1
UNLISTED_CLASS = "class folder not in the class map: not used"


@dataclass
class DatasetIndex:
    """Every usable image of a tree, with its class and stored size.

    `paths` are relative to `root`; `labels[i]` indexes `classes`; `sizes[i]` is (width, height) in
    stored pixels (EXIF orientation is not applied anywhere in rded-fast), or (UNREAD, UNREAD) in a lazy
    index until `read_headers` reads it, or (UNUSABLE, UNUSABLE) once its header failed. `skipped` lists
    files that were left out, each `{"path", "reason"}`. `stamps[i]` is (bytes, mtime in ns) of the file
    when its size was read ((0, 0): not known); None for a converted source, whose index is all there is.
    """

    root: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray  # [N] int64
    sizes: np.ndarray  # [N, 2] int64, (width, height)
    skipped: list[dict] = field(default_factory=list)
    stamps: np.ndarray | None = None  # [N, 2] int64
    # modification time (ns) of every folder listed, by path relative to `root` ("." is the root itself): a folder
    # whose entries changed since (an image or a class folder added, removed, renamed) has another one. 0: too close
    # to the listing to tell (rded_fast.formats.folder.folder_stamp); None: not known (a converted source, an older cache)
    folders: dict[str, int] | None = None
    # [N] int64: for a converted source, a token of each image's stored bytes (shards: its shard's sha256), so that a
    # resume sees a conversion made again from changed images; None for a tree (its files are stamped)
    content: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        """Images per class, less those known to be unusable (a lazy index may still hold some unread ones)."""
        return np.bincount(self.labels[self.sizes[:, 0] != UNUSABLE], minlength=self.num_classes)

    def empty_classes(self) -> list[str]:
        """Class folders that hold no image file at all."""
        return [self.classes[c] for c in np.flatnonzero(np.bincount(self.labels, minlength=self.num_classes) == 0)]

    def empty_note(self) -> str | None:
        """One line on the class folders that hold no image (they count as classes), or None when every one holds some."""
        empty = self.empty_classes()
        if not empty:
            return None
        shown = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
        return (
            f"{len(empty)} of the {self.num_classes} class folders hold no image ({shown}): remove them, or list the "
            "real classes in --class-map"
        )

    def usable(self, ids: np.ndarray) -> np.ndarray:
        """Which of the (read) images `ids` have a size."""
        return self.sizes[ids, 0] > 0

    def unread(self) -> int:
        return int(np.count_nonzero(self.sizes[:, 0] == UNREAD))

    def to_json(self) -> dict:
        return {
            "version": JSON_INDEX_VERSION,
            "root": self.root,
            "classes": self.classes,
            "paths": self.paths,
            "labels": self.labels.tolist(),
            "sizes": self.sizes.tolist(),
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, data: dict) -> "DatasetIndex":
        return cls(
            root=data["root"],
            classes=list(data["classes"]),
            paths=list(data["paths"]),
            labels=np.asarray(data["labels"], dtype=np.int64).reshape(-1),
            sizes=np.asarray(data["sizes"], dtype=np.int64).reshape(-1, 2),
            skipped=list(data.get("skipped", [])),
        )


def read_class_map(path: str | os.PathLike) -> list[str]:
    """Folder names, one per line, in the observer's output order (blank lines and # comments ignored)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read class map {path}: {exc.strerror}") from exc
    try:
        lines = raw.decode("utf-8-sig").splitlines()  # utf-8-sig: a BOM is not part of a name
    except UnicodeDecodeError as exc:
        what = "UTF-16 text" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else f"byte {exc.start} is 0x{raw[exc.start]:02x}"
        raise UserError(f"--class-map {path}: not UTF-8 ({what}); save it as UTF-8, one folder name per line") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise UserError(f"class map {path} names no classes; give one folder name per line")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"class map {path} names {dupes[0]!r} twice; each folder may appear once")
    return names


PROCESS_MIN_FILES = 20_000  # below this, threads: a process pool's start-up costs more than it saves


def _sizes_of(root: str, paths: list[str]) -> list[tuple[int, int] | str]:
    return [image_size(os.path.join(root, rel)) for rel in paths]


def file_stamp(path: str) -> tuple[int, int]:
    """(bytes, modification time in ns) of a file; (0, 0) when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0)
    return (st.st_size, st.st_mtime_ns)


def files_fingerprint(root: str, paths: list[str], fallback: np.ndarray | None = None) -> str:
    """A hash of files as they are now: each path (relative to `root`) with its byte size and modification time,
    or `fallback[i]` for a path that is not a file there (a converted source, whose index is all there is)."""
    h = hashlib.sha256()
    for i, path in enumerate(paths):
        stamp = file_stamp(os.path.join(root, path))
        h.update(json.dumps([path, fallback[i].tolist() if stamp == (0, 0) and fallback is not None else list(stamp)]).encode())
    return h.hexdigest()


def _forget_changed(index: DatasetIndex, ids: np.ndarray) -> None:
    """Mark UNREAD the read images among `ids` whose file changed since (or whose stamp is not known)."""
    known = ids[index.sizes[ids, 0] != UNREAD]
    changed = [i for i in known.tolist() if file_stamp(os.path.join(index.root, index.paths[i])) != tuple(index.stamps[i])]
    if changed:
        paths = {index.paths[i] for i in changed if index.sizes[i, 0] == UNUSABLE}
        index.skipped = [s for s in index.skipped if s["path"] not in paths]
        index.sizes[changed] = UNREAD


def read_sizes(
    root: str, paths: list[str], workers: int = 8, show_progress: bool = False, chunk: int = 4096, desc: str = "index"
) -> list[tuple[int, int] | str]:
    """Header sizes (or reasons) of `paths` under `root`, in order, in chunks of files over `workers` workers:
    processes for large trees (header parsing holds the GIL: threads are slower there than one), threads for small
    ones; either way the reads overlap where the page cache is cold."""
    pool_type = ProcessPoolExecutor if len(paths) >= PROCESS_MIN_FILES else ThreadPoolExecutor
    results: list[tuple[int, int] | str] = []
    with pool_type(max(1, workers)) as pool, progress(None, total=len(paths), desc=desc, disable=not show_progress) as bar:
        parts = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
        for part in pool.map(_sizes_of, [root] * len(parts), parts):
            results.extend(part)
            bar.update(len(part))
    return results


def read_headers(index: DatasetIndex, ids: np.ndarray, workers: int = 8, show_progress: bool = False) -> int:
    """Fill in the sizes of images `ids` not read yet, or changed since they were read (in place); a file whose
    header fails becomes UNUSABLE and is listed in `skipped`. Returns how many headers were read."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if index.stamps is not None:
        _forget_changed(index, ids)
    ids = ids[index.sizes[ids, 0] == UNREAD]
    if len(ids) == 0:
        return 0
    if index.stamps is not None:  # stamped before the read: a file changed meanwhile is read again next time
        index.stamps[ids] = [file_stamp(os.path.join(index.root, index.paths[i])) for i in ids.tolist()]
    results = read_sizes(index.root, [index.paths[i] for i in ids], workers, show_progress, desc="headers")
    for i, res in zip(ids.tolist(), results):
        if isinstance(res, str):
            index.sizes[i] = UNUSABLE
            index.skipped.append({"path": index.paths[i], "reason": res})
        else:
            index.sizes[i] = res
    return len(ids)


def require_class_order(index: DatasetIndex, class_map: list[str] | None, source: str | os.PathLike) -> DatasetIndex:
    """A converted source keeps the class order it was converted with; a different --class-map is an error."""
    if class_map is not None and list(class_map) != index.classes:
        raise UserError(
            f"--class-map differs from the class order {source} was converted with; convert the "
            "source again with the same --class-map, or leave --class-map out"
        )
    return index


def _blob(strings: list[str]) -> np.ndarray:
    return np.frombuffer("\0".join(strings).encode("utf-8", "surrogateescape"), np.uint8)


def _unblob(array: np.ndarray) -> list[str]:
    text = array.tobytes().decode("utf-8", "surrogateescape")
    return text.split("\0") if text else []


def save_index(index: DatasetIndex, path: str | os.PathLike) -> None:
    """Write the index compactly (numpy .npz: names as one NUL-separated UTF-8 blob, int32 labels and sizes):
    an ImageNet-sized index loads several times faster than a JSON of it (benchmarks/README.md)."""
    buf = io.BytesIO()
    stamps = {} if index.stamps is None else {"stamps": index.stamps.astype(np.int64)}
    if index.content is not None:
        stamps["content"] = index.content.astype(np.int64)
    if index.folders is not None:
        stamps.update(folders=_blob(list(index.folders)), folder_stamps=np.asarray(list(index.folders.values()), np.int64))
    np.savez(
        buf,
        version=np.int64(INDEX_VERSION),
        root=_blob([index.root]),
        classes=_blob(index.classes),
        paths=_blob(index.paths),
        labels=index.labels.astype(np.int32),
        sizes=index.sizes.astype(np.int32),
        skipped=np.frombuffer(json.dumps(index.skipped).encode("utf-8", "surrogateescape"), np.uint8),
        **stamps,
    )
    atomic_write_bytes(path, buf.getvalue())


class DamagedIndex(UserError):
    """An index cache that rded-fast wrote but that cannot be read (truncated, damaged): it may be rebuilt.
    `what` names the file and what is wrong with it, without the fix."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}; {fix}")
        self.what = what


def _npz_signature(path: str | os.PathLike) -> bool:
    """Whether `path` begins as `save_index` writes an .npz: a zip whose first member is `version.npy` (read from
    the first local header, so a truncated file that lost its zip directory is still recognised as ours)."""
    with open(path, "rb") as f:
        head = f.read(30 + len("version.npy"))
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return False
    name_length = int.from_bytes(head[26:28], "little")
    return head[30 : 30 + name_length] == b"version.npy"


def is_index_cache(path: str | os.PathLike) -> bool:
    """Whether `path` is an index written by `save_index` (any version), whole or damaged: an .npz with its arrays
    (or that begins as ours does), or the JSON of version 1. An unreadable file raises OSError."""
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"{":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError:
            return False
        return isinstance(data, dict) and {"version", "paths", "sizes"} <= set(data)
    try:
        with zipfile.ZipFile(path) as z:
            return {"version.npy", "paths.npy", "sizes.npy"} <= set(z.namelist())
    except zipfile.BadZipFile:
        return _npz_signature(path)


def load_index(path: str | os.PathLike, flag: str = "index") -> DatasetIndex:
    """Read an index written by `save_index` (or the JSON of earlier versions). A file that is not one is
    refused in one line that never suggests deleting it: rded-fast did not write it."""
    if not is_index_cache(path):
        raise UserError(f"{flag} {path}: not an index cache of rded-fast (rded-fast did not write it); give another path")
    rebuild = "delete it (rded-fast wrote it) to rebuild it, or give another path"
    try:
        with open(path, "rb") as f:
            if f.read(1) == b"{":
                f.seek(0)
                return _load_json_index(path, json.loads(f.read()), flag)
        with np.load(path, allow_pickle=False) as data:
            version = int(data["version"])
            if version not in READABLE_VERSIONS:
                raise UserError(f"{flag} {path}: an index cache of another rded-fast version ({version}); {rebuild}")
            return DatasetIndex(
                root=_unblob(data["root"])[0],
                classes=_unblob(data["classes"]),
                paths=_unblob(data["paths"]),
                labels=data["labels"].astype(np.int64),
                sizes=data["sizes"].astype(np.int64).reshape(-1, 2),
                skipped=json.loads(data["skipped"].tobytes().decode("utf-8", "surrogateescape")),
                stamps=data["stamps"].astype(np.int64).reshape(-1, 2) if "stamps" in data.files else None,
                folders=_folders(data),
                content=data["content"].astype(np.int64) if "content" in data.files else None,
            )
    except (ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as exc:
        raise DamagedIndex(
            f"{flag} {path}: a damaged or truncated index cache of rded-fast ({type(exc).__name__})", rebuild
        ) from exc


def _folders(data) -> dict[str, int] | None:
    if "folders" not in data.files:
        return None
    return dict(zip(_unblob(data["folders"]), data["folder_stamps"].astype(np.int64).tolist()))


def _load_json_index(path: str | os.PathLike, data: dict, flag: str) -> DatasetIndex:
    if data.get("version") != JSON_INDEX_VERSION:
        raise UserError(
            f"{flag} {path}: an index cache of another rded-fast version ({data.get('version')}); give another path, "
            "or delete it (rded-fast wrote it) to rebuild"
        )
    return DatasetIndex.from_json(data)
