"""What every converter starts from: the ImageFolder's index in the class order asked for, and its claim on --out."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rded_fast.errors import UserError
from rded_fast.formats.folder import build_index
from rded_fast.index import DatasetIndex, read_class_map
from rded_fast.layout import Layout
from rded_fast.outputs import claim_output


def index_source(data: str, class_map: str | os.PathLike | list[str] | None, workers: int, show_progress: bool) -> DatasetIndex:
    """Index `data` (a class-map file or list of folder names gives the class order); refuse a tree with no
    readable image, naming the layout expected."""
    names = read_class_map(class_map) if isinstance(class_map, (str, os.PathLike)) else class_map
    index = build_index(data, class_map=names, workers=max(1, workers), show_progress=show_progress)
    if len(index) == 0:
        raise UserError(f"--data {data}: no readable images found; expected {data}/<class>/<image files>")
    return index


@contextmanager
def claiming(
    out: str, data: str, class_map, layout: Layout, *, overwrite: bool, overwrite_any: bool, resume: bool = False
) -> Iterator[list]:
    """Claim the converter's `--out` (rded_fast.outputs.claim_output) for the block, as `layout` describes it; yields
    the list that gets the path of what was replaced, if anything was."""
    replaced: list = []
    with claim_output(
        out,
        "--out",
        {"--data": data, "--class-map": class_map if isinstance(class_map, (str, os.PathLike)) else None},
        layout,
        overwrite=overwrite,
        overwrite_any=overwrite_any,
        resume=resume,
        replace_hint="pass --overwrite to replace it",
        on_replace=replaced.append,
    ):
        yield replaced
