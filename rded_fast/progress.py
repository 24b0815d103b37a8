"""Progress bars for long work (tqdm on stderr), shown only on a terminal so logs stay readable."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], total: int | None = None, desc: str = "", disable: bool = False, initial: int = 0
) -> Iterable[T]:
    quiet = disable or not sys.stderr.isatty()
    return tqdm(items, total=total, desc=desc, disable=quiet, leave=False, dynamic_ncols=True, initial=initial)
