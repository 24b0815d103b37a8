"""A cheap structural check of JPEG bytes, run before DALI sees them.

DALI's JPEG parser stops (and on some inputs has killed the whole process) on files whose marker
structure is broken, e.g. bytes overwritten in the middle. PIL only notices such damage by decoding.
This walks the marker segments instead: SOI; segment lengths that stay inside the file; a frame header
(SOFn) before the first scan (SOS); inside entropy-coded data only stuffed 0xFF00 bytes, restart
markers, and then a marker that may follow a scan (another table or scan, or EOI); EOI at the end.
It reads headers and searches the entropy data for 0xFF with numpy, so it costs a few microseconds
per image, far less than decoding.
"""

from __future__ import annotations

import numpy as np

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
# Frame headers: baseline, extended, progressive, lossless, with Huffman or arithmetic coding.
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Segments allowed between scans: tables (DHT, DAC, DQT), restart interval, line count, APPn, comments.
BETWEEN_SCANS = {0xC4, 0xCC, 0xDB, 0xDD, 0xDC, 0xFE, *range(0xE0, 0xF0)}
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length


def is_jpeg(data: bytes | np.ndarray) -> bool:
    """Whether the bytes start with a JPEG start-of-image marker."""
    return len(data) >= 2 and data[0] == 0xFF and data[1] == SOI


def jpeg_problem(data: bytes | memoryview | np.ndarray) -> str | None:
    """None when `data` is a structurally whole JPEG, else a short reason naming the byte offset."""
    b = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).reshape(-1)
    n = len(b)
    if not is_jpeg(b):
        return "not a JPEG (no start-of-image marker)"
    pos, seen_frame = 2, False
    while True:
        if pos >= n:
            return "ends inside the headers (truncated)"
        if b[pos] != 0xFF:
            return f"expected a marker at byte {pos}, found 0x{int(b[pos]):02X}"
        while pos < n and b[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return "ends inside the headers (truncated)"
        marker = int(b[pos])
        pos += 1
        if marker == EOI:
            return "ends before any image data" if not seen_frame else "no scan (SOS) before the end marker"
        if marker in STANDALONE:
            continue
        if marker == 0x00 or marker == SOI:
            return f"invalid marker 0xFF{marker:02X} at byte {pos - 2}"
        if pos + 2 > n:
            return "ends inside the headers (truncated)"
        length = (int(b[pos]) << 8) | int(b[pos + 1])
        if length < 2 or pos + length > n:
            return f"segment 0xFF{marker:02X} at byte {pos - 2} claims {length} bytes, past the end of the file"
        if marker in SOF:
            seen_frame = True
        elif marker != SOS and marker not in BETWEEN_SCANS:
            return f"invalid marker 0xFF{marker:02X} at byte {pos - 2}"
        pos += length
        if marker != SOS:
            continue
        if not seen_frame:
            return f"scan at byte {pos - length - 2} before any frame header"
        end = _scan_end(b, pos)
        if isinstance(end, str):
            return end
        pos, marker = end
        if marker == EOI:
            return None
        pos -= 2  # back to the 0xFF of the marker that follows the scan; parsed as a header above


def _scan_end(b: np.ndarray, start: int) -> tuple[int, int] | str:
    """After entropy-coded data from `start`: (position after the next real marker, the marker), or a reason."""
    ff = np.flatnonzero(b[start:-1] == 0xFF) + start
    if len(ff) == 0:
        return "image data has no end marker (truncated)"
    following = b[ff + 1]
    real = ff[(following != 0x00) & (following != 0xFF) & ((following < 0xD0) | (following > 0xD7))]
    if len(real) == 0:
        return "image data has no end marker (truncated)"
    p = int(real[0])
    marker = int(b[p + 1])
    if marker != EOI and marker != SOS and marker not in BETWEEN_SCANS:
        return f"invalid marker 0xFF{marker:02X} inside the image data at byte {p}"
    return p + 2, marker
