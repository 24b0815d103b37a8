"""Progress bars for long work (tqdm on stderr), silenced in non-interactive use when asked."""
from __future__ import annotations

from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", disable: bool = False, initial: int = 0) -> Iterable[T]:
    return tqdm(items, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, initial=initial)
