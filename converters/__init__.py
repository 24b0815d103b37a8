"""Format writers: an ImageFolder -> FFCV .beton (`ffcv_writer`) or DALI-readable shards (`dali_shards`).

`convert(fmt, data, out, **options)` is the one entry point; image sanitising lives in `sanitize`.
"""

from __future__ import annotations

from rded_fast.device import check_workers
from rded_fast.errors import UserError
from rded_fast.outputs import check_name_length

FORMATS = ("ffcv", "dali")


def convert(fmt: str, data: str, out: str, **options) -> dict:
    """Convert the ImageFolder `data` into format `fmt` at `out`; returns a summary (counts, skips, seconds)."""
    check_workers(options.get("workers"))
    check_name_length(out, "--out")  # before the format's own checks look at the path
    if fmt == "ffcv":
        from rded_fast.converters.ffcv_writer import convert_ffcv

        return convert_ffcv(data, out, **options)
    if fmt == "dali":
        from rded_fast.converters.dali_shards import convert_dali

        return convert_dali(data, out, **options)
    raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
