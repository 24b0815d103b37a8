"""Format writers: an ImageFolder -> webdataset shards with DALI index files (`shards`) or an FFCV .beton (`beton`),
one module per writable format of rded_fast.formats, named as the format is; what each writes (names, records,
sidecar keys) is that format's module's, in rded_fast/formats.

`convert(fmt, data, out, **options)` is the one entry point; image sanitising lives in `sanitize`.
"""

from __future__ import annotations

import importlib

from rded_fast.device import check_workers
from rded_fast.errors import UserError
from rded_fast.formats import ALIASES, WRITABLE
from rded_fast.outputs import check_name_length


def convert(fmt: str, data: str, out: str, **options) -> dict:
    """Convert the ImageFolder `data` into format `fmt` (a name of `WRITABLE`, or an earlier spelling of `ALIASES`) at
    `out` with the writer `converters/<fmt>.py`'s `convert`; returns a summary (counts, skips, seconds)."""
    name = ALIASES.get(fmt, fmt)
    if name not in WRITABLE:
        raise UserError(f"--format {fmt}: choose one of {', '.join(WRITABLE)}")
    check_workers(options.get("workers"))
    check_name_length(out, "--out")  # before the format's own checks look at the path
    return importlib.import_module(f"{__name__}.{name}").convert(data, out, **options)
