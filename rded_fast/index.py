"""Index an ImageFolder tree: what images exist, their class, and their stored size.

The index is the first stage of the pipeline: it fixes the class order (sorted folder names, or an
explicit class map in observer output order) and records each image's size from its header, so the
plan can draw crop boxes without decoding anything. It is saved as JSON and reused by later runs.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_text
from rded_fast.progress import progress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
INDEX_VERSION = 1
UNLISTED_CLASS = "class folder not in the class map: not used"


@dataclass
class DatasetIndex:
    """Every usable image of a tree, with its class and stored size.

    `paths` are relative to `root`; `labels[i]` indexes `classes`; `sizes[i]` is (width, height) in
    stored pixels (EXIF orientation is not applied anywhere in rded-fast). `skipped` lists files that
    were left out, each `{"path", "reason"}`.
    """

    root: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray  # [N] int64
    sizes: np.ndarray  # [N, 2] int64, (width, height)
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def to_json(self) -> dict:
        return {
            "version": INDEX_VERSION,
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
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # utf-8-sig: a BOM is not part of a name
    except OSError as exc:
        raise UserError(f"cannot read class map {path}: {exc.strerror}") from exc
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not names:
        raise UserError(f"class map {path} names no classes; give one folder name per line")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"class map {path} names {dupes[0]!r} twice; each folder may appear once")
    return names


def _image_size(path: str) -> tuple[int, int] | str:
    """(width, height) from the file header, or a reason string when it is not a readable image."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            w, h = im.size
    except Image.DecompressionBombError as exc:
        return f"too large to decode safely ({exc})"
    except Exception as exc:  # PIL raises many types for non-images
        return f"not a readable image ({type(exc).__name__}: {exc})"
    if w <= 0 or h <= 0:
        return f"image header gives size {w}x{h}"
    return int(w), int(h)


def _list_class_folder(folder: Path, root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files, [(skipped file, reason)]) below one class folder, sorted.

    Symlinks: folders behind links are never followed (no loops, no escapes); a file link is used only
    when it resolves to a file inside the data root."""
    images, skipped = [], []
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                skipped.append((os.path.join(dirpath, name), "symlinked folder not followed"))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                try:
                    target = Path(full).resolve(strict=True)
                except (OSError, RuntimeError):
                    skipped.append((full, "broken or looping symlink"))
                    continue
                if not target.is_relative_to(real_root) or not target.is_file():
                    skipped.append((full, "symlink to outside the data root not followed"))
                    continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(full)
            else:
                skipped.append((full, "not an image file extension"))
    return images, skipped


def build_index(
    root: str | os.PathLike,
    class_map: list[str] | None = None,
    workers: int = 8,
    show_progress: bool = True,
) -> DatasetIndex:
    """Scan `root/<class>/**/<image>` and read every image's header.

    Classes are the sorted sub-folder names unless `class_map` gives them (in observer output order);
    a class-map name with no folder is an error, and a folder the class map leaves out is not used and
    is listed in `skipped` (reason UNLISTED_CLASS). Files that are not images are skipped and listed.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise UserError(f"--data {root}: not a directory; give an ImageFolder root (one folder per class)")
    folders = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))
    if class_map is not None:
        missing = [c for c in class_map if not (root_path / c).is_dir() or (root_path / c).is_symlink()]
        if missing:
            raise UserError(
                f"class map names {len(missing)} folder(s) missing under {root}, e.g. {missing[0]!r}; "
                "fix the class map or the data root"
            )
        classes = list(class_map)
        listed = set(classes)
        unlisted = [{"path": name, "reason": UNLISTED_CLASS} for name in folders if name not in listed]
    else:
        classes = folders
    if not classes:
        raise UserError(f"--data {root}: no class folders found; expected {root}/<class>/<image files>")

    files: list[tuple[int, str]] = []
    skipped: list[dict] = list(unlisted) if class_map is not None else []
    for label, name in enumerate(classes):
        images, others = _list_class_folder(root_path / name, root_path)
        files.extend((label, f) for f in images)
        skipped.extend({"path": os.path.relpath(f, root_path), "reason": reason} for f, reason in others)
    skipped.extend({"path": p.name, "reason": "symlinked class folder not followed"}
                   for p in sorted(root_path.iterdir()) if p.is_symlink() and p.is_dir() and class_map is None)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(
            progress(pool.map(_image_size, [f for _, f in files]), total=len(files), desc="index", disable=not show_progress)
        )

    paths, labels, sizes = [], [], []
    for (label, f), res in zip(files, results):
        rel = os.path.relpath(f, root_path)
        if isinstance(res, str):
            skipped.append({"path": rel, "reason": res})
            continue
        paths.append(rel)
        labels.append(label)
        sizes.append(res)
    return DatasetIndex(
        root=str(root_path.resolve()),
        classes=classes,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        sizes=np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        skipped=skipped,
    )


def require_class_order(index: DatasetIndex, class_map: list[str] | None, source: str | os.PathLike) -> DatasetIndex:
    """A converted source keeps the class order it was converted with; a different --class-map is an error."""
    if class_map is not None and list(class_map) != index.classes:
        raise UserError(f"--class-map differs from the class order {source} was converted with; convert the "
                        "source again with the same --class-map, or leave --class-map out")
    return index


def save_index(index: DatasetIndex, path: str | os.PathLike) -> None:
    atomic_write_text(path, json.dumps(index.to_json()))


def load_index(path: str | os.PathLike) -> DatasetIndex:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read index {path}: {exc}; delete it to rebuild") from exc
    if data.get("version") != INDEX_VERSION:
        raise UserError(f"index {path} has version {data.get('version')}, expected {INDEX_VERSION}; delete it to rebuild")
    return DatasetIndex.from_json(data)


def load_or_build_index(
    root: str | os.PathLike,
    cache_path: str | os.PathLike | None,
    class_map: list[str] | None = None,
    show_progress: bool = True,
) -> DatasetIndex:
    """Reuse `cache_path` when it indexes the same root and class order; otherwise build and save it."""
    if cache_path is not None and Path(cache_path).is_file():
        index = load_index(cache_path)
        same_root = index.root == str(Path(root).resolve())
        same_classes = class_map is None or index.classes == list(class_map)
        if same_root and same_classes:
            return index
    index = build_index(root, class_map=class_map, show_progress=show_progress)
    if cache_path is not None:
        save_index(index, cache_path)
    return index
