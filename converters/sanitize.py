"""Shared image sanitising for every converter: what a file really is, and how to make it RGB.

Converters call this one module so that odd inputs (CMYK, grayscale, PNG-named-.JPEG, truncated, zero
bytes, non-images) get the same treatment everywhere: converted to RGB when the pixels are readable,
skipped with a reason when they are not.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rded_fast.decode import decode_rgb_array

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class ImageInfo:
    """What a file holds: `format` as PIL reads it (JPEG, PNG, ...), `mode` (RGB, L, CMYK, ...), size."""

    format: str
    mode: str
    width: int
    height: int

    @property
    def is_plain_jpeg(self) -> bool:
        """A JPEG whose bytes every decoder reads as RGB or gray as they are (no re-encoding needed)."""
        return self.format == "JPEG" and self.mode in ("RGB", "L")


class BadImage(Exception):
    """The file cannot be used; the message says why (for the skip list)."""


def inspect(path: str | os.PathLike) -> ImageInfo:
    """Header facts of `path`; raises BadImage for empty, non-image or unreadable files."""
    if os.path.getsize(path) == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            return ImageInfo(im.format or "", im.mode, int(im.size[0]), int(im.size[1]))
    except Image.DecompressionBombError as exc:
        raise BadImage(f"too large to decode safely ({exc})") from exc
    except Exception as exc:
        raise BadImage(f"not a readable image ({type(exc).__name__}: {exc})") from exc


def rgb_array(path: str | os.PathLike) -> np.ndarray:
    """Fully decode `path` to [H, W, 3] uint8 RGB (pixels as stored); raises BadImage if truncated/corrupt."""
    try:
        return decode_rgb_array(path)
    except Exception as exc:
        raise BadImage(f"cannot decode ({type(exc).__name__}: {exc})") from exc


def jpeg_bytes(path: str | os.PathLike, quality: int = 95) -> tuple[bytes, bool]:
    """JPEG bytes for `path`: the original bytes when it is a plain RGB/gray JPEG that decodes fully,
    otherwise an RGB re-encoding at `quality`. Returns (bytes, reencoded)."""
    info = inspect(path)
    pixels = rgb_array(path)  # proves the file decodes completely (catches truncation)
    if info.is_plain_jpeg:
        with open(path, "rb") as f:
            data = f.read()
        if data.startswith(JPEG_MAGIC):
            return data, False
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), True
