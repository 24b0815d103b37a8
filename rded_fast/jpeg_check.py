"""A cheap structural check of JPEG bytes, run before DALI sees them.

DALI's JPEG parser stops (and on some inputs has killed the whole process) on files whose marker
structure is broken, e.g. bytes overwritten in the middle. PIL only notices such damage by decoding.
This walks the marker segments instead: SOI; segment lengths that stay inside the file; a frame header
(SOFn) before the first scan (SOS); inside entropy-coded data only stuffed 0xFF00 bytes, restart
markers, and then a marker that may follow a scan (another table or scan, or EOI); EOI at the end.
Headers are read from the bytes directly; the entropy data is searched with numpy for its first 0xFF
that is not stuffing (a short-circuiting argmax, not a list of every 0xFF), so the check costs tens of
microseconds per image, far less than decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
# Frame headers: baseline, extended, progressive, lossless, with Huffman or arithmetic coding.
SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Segments allowed between scans: tables (DHT, DAC, DQT), restart interval, line count, APPn, comments.
BETWEEN_SCANS = {0xC4, 0xCC, 0xDB, 0xDD, 0xDC, 0xFE, *range(0xE0, 0xF0)}
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length
RESTART = range(0xD0, 0xD8)
APP14 = 0xEE  # Adobe's segment: says whether 3 or 4 components are colour-transformed


def is_jpeg(data: bytes | np.ndarray) -> bool:
    """Whether the bytes start with a JPEG start-of-image marker."""
    return len(data) >= 2 and data[0] == 0xFF and data[1] == SOI


def _as_bytes(data: bytes | bytearray | memoryview | np.ndarray) -> bytes | bytearray:
    """Bytes whose items index as Python ints (ten times cheaper than numpy scalars in the header walks)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    return data.view(np.uint8).reshape(-1).tobytes() if isinstance(data, np.ndarray) else bytes(data)


def jpeg_problem(data: bytes | bytearray | memoryview | np.ndarray) -> str | None:
    """None when `data` is a structurally whole JPEG, else a short reason naming the byte offset."""
    raw = _as_bytes(data)
    n = len(raw)
    if not is_jpeg(raw):
        return "not a JPEG (no start-of-image marker)"
    pos, seen_frame = 2, False
    while True:
        if pos >= n:
            return "ends inside the headers (truncated)"
        if raw[pos] != 0xFF:
            return f"expected a marker at byte {pos}, found 0x{raw[pos]:02X}"
        while pos < n and raw[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return "ends inside the headers (truncated)"
        marker = raw[pos]
        pos += 1
        if marker == EOI:
            return "ends before any image data" if not seen_frame else "no scan (SOS) before the end marker"
        if marker in STANDALONE:
            continue
        if marker == 0x00 or marker == SOI:
            return f"invalid marker 0xFF{marker:02X} at byte {pos - 2}"
        if pos + 2 > n:
            return "ends inside the headers (truncated)"
        length = (raw[pos] << 8) | raw[pos + 1]
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
        end = _scan_end(raw, pos)
        if isinstance(end, str):
            return end
        pos, marker = end
        if marker == EOI:
            return None
        pos -= 2  # back to the 0xFF of the marker that follows the scan; parsed as a header above


def _scan_end(raw: bytes, start: int) -> tuple[int, int] | str:
    """After entropy-coded data from `start`: (position after the next real marker, the marker), or a reason.
    Stuffed 0xFF00 bytes are skipped by the mask; fill bytes (0xFFFF) and restart markers by the loop."""
    b = np.frombuffer(raw, np.uint8)
    candidate = (b[start:-1] == 0xFF) & (b[start + 1 :] != 0x00)
    off = 0
    while True:
        i = off + int(candidate[off:].argmax()) if off < len(candidate) else len(candidate)
        if i >= len(candidate) or not candidate[i]:
            return "image data has no end marker (truncated)"
        marker = raw[start + i + 1]
        if marker == 0xFF or marker in RESTART:
            off = i + 1
            continue
        p = start + i
        if marker != EOI and marker != SOS and marker not in BETWEEN_SCANS:
            return f"invalid marker 0xFF{marker:02X} inside the image data at byte {p}"
        return p + 2, marker


def source_problem(source: str | tuple[str, int, int], require_jpeg: bool = False) -> str | None:
    """Why the bytes of one source cannot go to DALI, or None: `source` is a file path, or (tar path, byte
    offset, length) inside a shard. An empty or unreadable source fails; other formats than JPEG pass unless
    `require_jpeg` (shards hold only JPEG; DALI decodes the other formats a folder may hold)."""
    try:
        if isinstance(source, str):
            with open(source, "rb") as f:
                data = f.read()
        else:
            path, offset, length = source
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    if not data:
        return "empty file (0 bytes)"
    if require_jpeg or is_jpeg(data):
        found = jpeg_problem(data)
        return None if found is None else f"corrupt JPEG structure: {found}"
    return None


def sources_problems(sources: list, require_jpeg: bool = False) -> list[str | None]:
    """`source_problem` of each source, in order (one task of a worker pool: a module-level function)."""
    return [source_problem(s, require_jpeg) for s in sources]


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's headers say about its pixels: the frame marker (0xC0 baseline, 0xC1 extended, 0xC2
    progressive, ...), sample precision in bits, height, width, the component ids, and the transform flag of
    an Adobe APP14 segment (0: components stored as they are, RGB or CMYK; 1: YCbCr; 2: YCCK), None without one."""

    marker: int
    precision: int
    height: int
    width: int
    components: tuple[int, ...]
    adobe_transform: int | None


def frame_header(data: bytes | bytearray | memoryview | np.ndarray) -> JpegFrame | None:
    """The frame of JPEG bytes (headers up to the first scan are read), or None when there is no frame header
    before the first scan or the headers are cut short. Meant for bytes `jpeg_problem` accepted."""
    b = _as_bytes(data)
    n, pos = len(b), 2
    frame, adobe = None, None
    while pos + 1 < n and b[pos] == 0xFF:
        while pos < n and b[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos + 2 >= n:
            return None
        marker = b[pos]
        pos += 1
        if marker in STANDALONE:
            continue
        if marker in (SOS, EOI):
            break
        length = (b[pos] << 8) | b[pos + 1]
        body = b[pos + 2 : pos + length]
        if marker in SOF and len(body) >= 6 and len(body) >= 6 + 3 * body[5]:
            ids = tuple(body[6 + 3 * c] for c in range(body[5]))
            frame = (marker, body[0], (body[1] << 8) | body[2], (body[3] << 8) | body[4], ids)
        elif marker == APP14 and len(body) >= 12 and body[:5] == b"Adobe":
            adobe = body[11]
        pos += length
    return None if frame is None else JpegFrame(*frame, adobe_transform=adobe)
