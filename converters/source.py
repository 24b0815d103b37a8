"""What every converter starts from: the ImageFolder's index in the class order asked for."""

from __future__ import annotations

import os

from rded_fast.errors import UserError
from rded_fast.formats.folder import build_index
from rded_fast.index import DatasetIndex, read_class_map


def index_source(data: str, class_map: str | os.PathLike | list[str] | None, workers: int, show_progress: bool) -> DatasetIndex:
    """Index `data` (a class-map file or list of folder names gives the class order); refuse a tree with no
    readable image, naming the layout expected."""
    names = read_class_map(class_map) if isinstance(class_map, (str, os.PathLike)) else class_map
    index = build_index(data, class_map=names, workers=max(1, workers), show_progress=show_progress)
    if len(index) == 0:
        raise UserError(f"--data {data}: no readable images found; expected {data}/<class>/<image files>")
    return index
