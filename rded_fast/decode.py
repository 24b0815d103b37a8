"""The one pixel rule for every loader and converter: any readable image -> H x W x 3 uint8 RGB.

Pixels are used as stored: EXIF orientation is not applied (the header sizes the plan uses are the
stored sizes too). 16-bit images are scaled to 8 bits (value * 255 / 65535, rounded) instead of being
clipped; CMYK, palette, gray and alpha images are converted to RGB by PIL.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8 of a loaded PIL image."""
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)


def decode_rgb_array(path: str | os.PathLike | BinaryIO) -> np.ndarray:
    """Fully decode `path` (a file name or an open binary file; raises on truncated or corrupt files) to [H, W, 3] uint8."""
    with Image.open(path) as im:
        im.load()
        return to_rgb8(im).copy()
