"""Which head row scores which class: RDED's first rows, ImageNet WNIDs, or a `--class-map`.

`imagenet_wnids.txt` (shipped with the package) lists the 1000 ImageNet-1K WordNet IDs in torchvision's
output order (sorted WNIDs, the order of every torchvision and timm ImageNet-1K head). Data whose class
folders are WNIDs (ImageNette, ImageWoof, ImageNet-100, ...) scored by a 1000-way head use the rows of
their WNIDs. A class map lists the observer's classes in output order and may name classes the data
lacks; every class folder of the data must be in it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from rded_fast.errors import UserError

WNID_FILE = Path(__file__).with_name("imagenet_wnids.txt")


@functools.cache
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1K WNIDs, index = torchvision's output row."""
    lines = [line.split("\t")[0] for line in WNID_FILE.read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1000, f"{WNID_FILE} should list 1000 WNIDs"
    return tuple(lines)


def choose_head_rows(
    classes: Sequence[str], head_size: int, class_map: Sequence[str] | None = None, label_offset: int = 0
) -> tuple[list[int], str]:
    """(row of the head for each class, the rule used: "class-map", "imagenet-wnid" or "first-rows").

    `label_offset`: outputs before the first ImageNet class (1 for heads with a background row)."""
    classes = list(classes)
    if class_map is not None:
        position = {c: i for i, c in enumerate(class_map)}
        unnamed = [c for c in classes if c not in position]
        if unnamed:
            raise UserError(
                f"--class-map does not name the class folder {unnamed[0]!r} ({len(unnamed)} in all); "
                "it must list every class of the data (and may list more)"
            )
        if len(class_map) > head_size:
            raise UserError(
                f"--class-map lists {len(class_map)} classes but the observer head has {head_size} "
                "outputs; the map must list the observer's classes in output order"
            )
        return [position[c] for c in classes], "class-map"
    wnids = imagenet_wnids()
    if head_size == len(wnids) + label_offset and classes and set(classes) <= set(wnids):
        row = {w: i + label_offset for i, w in enumerate(wnids)}
        return [row[c] for c in classes], "imagenet-wnid"
    return list(range(len(classes))), "first-rows"


def _class_folders(data: str) -> list[str]:
    root = Path(data)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith("."))


def unlisted_folders(class_map: Sequence[str], data: str) -> list[str]:
    """The class folders of the ImageFolder `data` that `class_map` does not name, sorted."""
    return sorted(set(_class_folders(data)) - set(class_map))


def restrict_class_map(class_map: Sequence[str], data: str) -> list[str]:
    """The class map's names that are class folders of the ImageFolder `data`, in map order.

    Every class folder must be named. A `data` that is not a folder of class folders (a .beton, shards)
    gets the map unchanged: its converted class order is checked where it is opened."""
    folders = _class_folders(data)
    present = [c for c in class_map if c in set(folders)]
    if not present:
        return list(class_map)
    unnamed = unlisted_folders(class_map, data)
    if unnamed:
        raise UserError(
            f"--class-map does not name the class folder {unnamed[0]!r} of {data} ({len(unnamed)} in all); "
            "list every class folder (the map may also name classes the data lacks)"
        )
    return present
