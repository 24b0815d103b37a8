"""A fast, lossless PNG encoder for the distilled images (8-bit RGB or grayscale).

PIL's encoder tries every PNG filter on every row and deflates at level 6: about 8 ms for a 224 px image
on a 2-core AVX2 CPU, which made PNG output the host stage's bottleneck beside a GPU (a class of 10
images cost 80 ms of CPU against ~25 ms of GPU scoring). This one applies the "Up" filter to the whole
image at once (one numpy subtraction; encoding a filter needs only the raw pixels, so it vectorises) and
deflates at level 1 with zlib, which releases the GIL: about 3 ms per image, files ~20 % larger, the same
pixels. Any PNG reader decodes it. The bytes depend only on the pixels and the level (deterministic).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_UP = 2
DEFAULT_LEVEL = 1
_COLOR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (grayscale, truecolour)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, level: int = DEFAULT_LEVEL) -> bytes:
    """[H, W, C] (C = 1 or 3) or [H, W] uint8 -> PNG bytes, Up-filtered, deflated at zlib `level` (0-9)."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"encode_png: expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    if channels not in _COLOR_TYPE:
        raise ValueError(f"encode_png: expected 1 or 3 channels, got {channels}")
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    scanlines = np.empty((height, width * channels + 1), np.uint8)
    scanlines[:, 0] = FILTER_UP
    scanlines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])  # uint8 arithmetic wraps mod 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE[channels], 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


__all__ = ["DEFAULT_LEVEL", "encode_png"]
