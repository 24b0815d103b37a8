"""The ImageFolder tree (`root/<class>/**/<image>`): how it is listed into a DatasetIndex, and the index cache
kept for it (`--index`, `rded-fast index`).

Classes are the sorted folder names, or a class map's order; folders behind symlinks are never followed, a
file symlink only inside the root; files that are not images are listed as skipped. A listing leaves sizes
UNREAD for the plan to read (rded_fast.index.read_headers), or reads every header up front.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np

from rded_fast.errors import UserError
from rded_fast.formats.source import Source
from rded_fast.index import (
    UNLISTED_CLASS,
    UNREAD,
    UNUSABLE,
    DamagedIndex,
    DatasetIndex,
    is_index_cache,
    load_index,
    read_headers,
    save_index,
)
from rded_fast.outputs import check_separate, check_writable_file, note

NAME = "folder"  # the format's one name (rded_fast.formats)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# A folder modified less than this before it was listed may change again within the same tick of the file system's
# clock (coarse: milliseconds; a server's clock may also differ from ours) without its modification time changing:
# its stamp is recorded as 0 (not known), so that the next reuse of the cache lists it again.
RACY_NS = 2_000_000_000


def folder_stamp(path: str) -> int:
    """The modification time (ns) of folder `path`, taken just before it is listed; 0 when it is too recent to tell
    a later change from it (RACY_NS) or cannot be read."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return 0
    return mtime if time.time_ns() - mtime >= RACY_NS else 0


def _list_class_folder(
    root: str, folder: str, real_root: Path, folders: dict[str, int]
) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files, [(skipped file, reason)]) below the class folder `folder`, as paths relative to `root`,
    in os.walk's order (a folder's files sorted, then its sub-folders, sorted, depth first); `folders` gets the
    stamp of every folder listed (`folder_stamp`).

    Symlinks: folders behind links are never followed (no loops, no escapes); a file link is used only
    when it resolves to a file inside the data root. One scandir per folder: no stat per plain file."""
    images, skipped = [], []
    stack = [folder]
    while stack:
        rel_dir = stack.pop()
        folders[rel_dir] = folder_stamp(os.path.join(root, rel_dir))
        with os.scandir(os.path.join(root, rel_dir)) as it:
            entries = sorted(it, key=lambda e: e.name)
        dirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
        linked = {e.name for e in entries if e.is_symlink() and os.path.isdir(e.path)}
        skipped.extend((os.path.join(rel_dir, name), "symlinked folder not followed") for name in sorted(linked))
        for e in entries:
            if e.name in linked or e.is_dir(follow_symlinks=False):
                continue
            rel = os.path.join(rel_dir, e.name)
            if e.is_symlink() and (reason := _link_problem(e.path, real_root)):
                skipped.append((rel, reason))
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(rel)
            else:
                skipped.append((rel, "not an image file extension"))
        stack.extend(os.path.join(rel_dir, e.name) for e in reversed(dirs))
    return images, skipped


def _link_problem(path: str, real_root: Path) -> str | None:
    """Why a file symlink is not used (broken, looping, or leading outside the data root), or None."""
    try:
        target = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return "broken or looping symlink"
    if not target.is_relative_to(real_root) or not target.is_file():
        return "symlink to outside the data root not followed"
    return None


def _index_classes(
    root_path: Path, class_map: list[str] | None, flag: str = "--data", classes_from: str | None = None
) -> tuple[list[str], list[dict]]:
    """The class order (sorted folders, or the class map) and the folders left out, as skipped entries; `flag` and
    `classes_from` word the messages for the caller (`build_index`)."""
    folders = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    skipped = [
        {"path": p.name, "reason": "symlinked class folder not followed"}
        for p in sorted(root_path.iterdir())
        if p.is_symlink() and p.is_dir() and class_map is None
    ]
    if class_map is None:
        classes = folders
    else:
        missing = [c for c in class_map if not (root_path / c).is_dir() or (root_path / c).is_symlink()]
        if missing and classes_from is not None:
            raise UserError(
                f"{flag} {root_path} lacks {len(missing)} class folder(s) of {classes_from}, e.g. {missing[0]!r}; give "
                f"{flag} a folder for every class of {classes_from}"
            )
        if missing:
            raise UserError(
                f"class map names {len(missing)} folder(s) missing under {root_path}, e.g. {missing[0]!r}; "
                "fix the class map or the data root"
            )
        classes = list(class_map)
        listed = set(classes)
        skipped = [{"path": name, "reason": UNLISTED_CLASS} for name in folders if name not in listed]
    if not classes:
        raise UserError(f"{flag} {root_path}: no class folders found; expected {root_path}/<class>/<image files>")
    return classes, skipped


def build_index(
    root: str | os.PathLike,
    class_map: list[str] | None = None,
    workers: int = 8,
    show_progress: bool = True,
    headers: bool = True,
    flag: str = "--data",
    classes_from: str | None = None,
) -> DatasetIndex:
    """Scan `root/<class>/**/<image>`; with `headers`, read every image's header (rded_fast.headers) and leave
    out the files whose header fails, else leave every size UNREAD for `read_headers`.

    Classes are the sorted sub-folder names unless `class_map` gives them (in observer output order);
    a class-map name with no folder is an error, and a folder the class map leaves out is not used and
    is listed in `skipped` (reason UNLISTED_CLASS). Files that are not images are skipped and listed.
    Messages name `root` as the argument `flag`; `classes_from` says where `class_map` came from when it is no
    class map of the user's (evaluate: "the distilled set", giving "--val DIR lacks 2 class folder(s) of the
    distilled set, e.g. ...").
    """
    root_path = Path(root)
    if not root_path.is_dir():
        converted = ", a shard folder or a .beton of `rded-fast convert`" if flag == "--data" else ""
        raise UserError(f"{flag} {root}: not a directory; give an ImageFolder root (one folder per class){converted}")
    folders = {".": folder_stamp(str(root_path))}
    classes, class_skips = _index_classes(root_path, class_map, flag, classes_from)
    real_root, files, skipped = root_path.resolve(), [], []
    for label, name in enumerate(classes):
        images, others = _list_class_folder(str(root_path), name, real_root, folders)
        files.extend((label, rel) for rel in images)
        skipped.extend({"path": rel, "reason": reason} for rel, reason in others)
    skipped = (class_skips + skipped) if class_map is not None else (skipped + class_skips)
    index = DatasetIndex(
        root=str(real_root),
        classes=classes,
        paths=[rel for _, rel in files],
        labels=np.asarray([label for label, _ in files], dtype=np.int64),
        sizes=np.full((len(files), 2), UNREAD, dtype=np.int64),
        skipped=skipped,
        stamps=np.zeros((len(files), 2), dtype=np.int64),
        folders=folders,
    )
    if not headers:
        return index
    read_headers(index, np.arange(len(index)), workers, show_progress)
    keep = index.sizes[:, 0] > 0
    paths = [rel for rel, kept in zip(index.paths, keep.tolist()) if kept]
    return DatasetIndex(
        index.root, classes, paths, index.labels[keep], index.sizes[keep], index.skipped, index.stamps[keep], folders
    )


def changed_folders(index: DatasetIndex) -> tuple[list[str], bool]:
    """The folders listed into `index` whose entries changed since (their modification time differs, or they are
    gone), and whether some could not be told (stamped 0, or an older cache without stamps): either way the tree
    must be listed again. One stat per folder (1,001 for ImageNet's flat tree), no file is touched."""
    if index.folders is None:
        return [], True
    changed, unknown = [], False
    for rel, stamp in index.folders.items():
        if stamp == 0:
            unknown = True
            continue
        try:
            now = os.stat(os.path.join(index.root, rel)).st_mtime_ns
        except OSError:
            now = None
        if now != stamp:
            changed.append(rel)
    return changed, unknown


def carry_headers(old: DatasetIndex, new: DatasetIndex) -> int:
    """Copy into the fresh listing `new` the sizes `old` had read (with their stamps, so a file changed since is read
    again) for the files it still holds, and the reasons of those found unusable; returns how many."""
    if old.stamps is None:
        return 0
    where = {p: i for i, p in enumerate(old.paths)}
    reasons = {s["path"]: s for s in old.skipped}
    carried = 0
    for j, rel in enumerate(new.paths):
        i = where.get(rel)
        if i is None or old.sizes[i, 0] == UNREAD:
            continue
        new.sizes[j], new.stamps[j] = old.sizes[i], old.stamps[i]
        if old.sizes[i, 0] == UNUSABLE and rel in reasons:
            new.skipped.append(reasons[rel])
        carried += 1
    return carried


def load_or_build_index(
    root: str | os.PathLike,
    cache_path: str | os.PathLike | None,
    class_map: list[str] | None = None,
    show_progress: bool = True,
    flag: str = "--index",
) -> DatasetIndex:
    """Reuse `cache_path` when it indexes the same root and class order and no folder of the tree changed since
    (`changed_folders`; a cached size is used only while its file is unchanged: `read_headers`). A tree that changed
    is listed again, keeping the sizes already read (a note says so); a damaged cache of ours is rebuilt (a note);
    otherwise the tree is listed (sizes UNREAD: the plan reads the headers it needs). The listing is saved there."""
    cached = None
    if cache_path is not None and Path(cache_path).is_file():
        try:
            cached = load_index(cache_path, flag)
        except DamagedIndex as exc:
            note(f"{exc.what}; it is rebuilt")
    if (
        cached is not None
        and cached.root == str(Path(root).resolve())
        and (class_map is None or cached.classes == list(class_map))
    ):
        if cached.stamps is None:  # a cache from before stamps: each planned size is read again, once
            cached.stamps = np.zeros((len(cached), 2), dtype=np.int64)
        changed, unknown = changed_folders(cached)
        if not changed and not unknown:
            return cached
        index = build_index(root, class_map=class_map, show_progress=show_progress, headers=False)
        carried = carry_headers(cached, index)
        if changed:
            shown = ", ".join("the data root" if c == "." else c for c in changed[:3]) + (", ..." if len(changed) > 3 else "")
            note(
                f"{flag} {cache_path}: {len(changed)} folder(s) of {root} changed since the cache was written ({shown}); "
                f"listed again, keeping the {carried} image size(s) already read"
            )
    else:
        index = build_index(root, class_map=class_map, show_progress=show_progress, headers=False)
    if cache_path is not None:
        keep_index_cache(index, cache_path, flag)
    return index


def open_folder(
    root: str | os.PathLike,
    class_map: list[str] | None = None,
    cache: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> Source:
    """The tree `root` as a Source: its listing (or its index cache `cache`, `load_or_build_index`); its images are
    the files under the index's root."""
    return Source(NAME, load_or_build_index(root, cache, class_map=class_map, show_progress=show_progress))


def keep_index_cache(index: DatasetIndex, cache_path: str | os.PathLike, flag: str = "--index") -> None:
    """Write the index cache `cache_path`; on read-only storage (or a folder this process may not write) it is used
    as it was, with a note that this run's listing and headers are not kept in it."""
    try:
        save_index(index, cache_path)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        note(f"{flag} {cache_path}: cannot be rewritten ({exc.strerror}); used as it is, without this run's changes")


def write_index_cache(
    root: str | os.PathLike, cache_path: str | os.PathLike, class_map: list[str] | None = None, show_progress: bool = True
) -> DatasetIndex:
    """Read every header of `root` once into the index cache `cache_path` (`rded-fast index`), so that a later
    `distill --index cache_path` plans any seed and mipc without reading a header. The cache is written
    atomically, never into the data, and replaces only an index cache."""
    check_separate(cache_path, "--out", {"--data": root}, "file")
    check_writable_file(cache_path, "--out")
    if Path(cache_path).is_file() and not is_index_cache(cache_path):
        raise UserError(f"--out {cache_path}: exists and is not an index cache of rded-fast; give a new path")
    index = build_index(root, class_map=class_map, show_progress=show_progress)
    save_index(index, cache_path)
    return index
