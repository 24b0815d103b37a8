"""ImageFolder -> FFCV .beton + sidecar JSON (`rded-fast convert --format beton`).

The .beton is written by ffcv's own `DatasetWriter` with an `RGBImageField` (`image`) and an `IntField`
(`label`), so stock `ffcv.reader.Reader` and `ffcv.loader.Loader` read it. Every image goes through the
project's one pixel rule (`converters/sanitize.py`): CMYK, grayscale, palette and PNG-named-.JPEG files
become RGB; zero-byte files and non-images are skipped while indexing; images that do not decode fully
(truncated, corrupt) are skipped here. Skips are counted and listed in the summary and the sidecar.

ffcv's writer runs `workers` processes and waits for every sample: a sample that raised in a worker would
hang it. So a sample never raises: an image that fails to decode is written as a 1x1 placeholder with
label -1, found by reading the labels back, and the file is then written again without it (a second
pass only when some image failed). ffcv stores at most `max_resolution` pixels on the longer side
(OpenCV area resize); the stored sizes are read back from the .beton into the sidecar, so the loader can
scale the plan's boxes (original pixels) to the stored ones.

Both files are written under temporary names and renamed when complete, the .beton first; the sidecar
records the .beton's byte size, so a sidecar never describes a half-written or foreign .beton.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rded_fast.converters.sanitize import BadImage, rgb_array
from rded_fast.converters.source import claiming, index_source
from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write, atomic_write_text
from rded_fast.formats.beton import (
    BETON,
    FFCV_HEADER,
    IMAGE_FIELD,
    LABEL_FIELD,
    NAME,
    bookkeeping_record,
    is_beton,
    keep_torch_threads,
    sidecar_path,
    sidecar_record,
)
from rded_fast.index import DatasetIndex
from rded_fast.progress import progress

WRITE_MODES = ("jpg", "raw", "proportion")
MAX_SIDE = 65500  # JPEG's limit; ffcv also stores sizes as uint16
MIN_PAGE = 1 << 21  # ffcv's smallest page (2 MiB; its default 8 MiB bloats small files); grown to fit big images
PLACEHOLDER = np.zeros((1, 1, 3), dtype=np.uint8)


class _Samples:
    """The indexable dataset ffcv's writer workers read: index id -> (RGB [H, W, 3] uint8, label).

    Never raises (see the module docstring): a bad image gives (PLACEHOLDER, -1). In `proportion` mode
    ffcv picks JPEG or raw with numpy's global generator inside the worker, right after this call;
    seeding it with the image id makes that choice the same on every run and for every worker count."""

    def __init__(self, index: DatasetIndex, seed_per_image: bool):
        self.root, self.paths, self.labels = index.root, index.paths, index.labels
        self.seed_per_image = seed_per_image
        self.parent, self.bound = os.getpid(), False

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, image_id: int) -> tuple[np.ndarray, int]:
        if os.getpid() != self.parent:  # in one of ffcv's workers (ffcv gives no start hook: its first sample)
            if not self.bound:
                die_with_parent(self.parent)
                self.bound = True
            elif os.getppid() != self.parent:  # where PR_SET_PDEATHSIG is not available
                os._exit(1)
        if self.seed_per_image:
            np.random.seed(int(image_id))
        try:
            return rgb_array(os.path.join(self.root, self.paths[image_id])), int(self.labels[image_id])
        except Exception:  # the reason is found again in the main process; a worker must not die
            return PLACEHOLDER, -1


def die_with_parent(parent: int) -> None:
    """End this worker when `parent` ends, however it ends (Linux: PR_SET_PDEATHSIG; ffcv's workers are not daemons
    and would go on writing into the .beton's temporary file of a killed convert); at once if it has ended already."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: `_Samples` notices the parent's end at the next sample
        pass
    if os.getppid() != parent:
        os._exit(1)


def _why_bad(path: str) -> str:
    try:
        rgb_array(path)
    except BadImage as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    return "could not be converted (it decodes now: the file changed during conversion?)"


def stored_size(width: int, height: int, max_resolution: int) -> tuple[int, int]:
    """The size ffcv stores an image of (width, height) at: the longer side shrunk to `max_resolution`."""
    ratio = max_resolution / max(width, height)
    if ratio >= 1:
        return width, height
    return int(ratio * width), int(ratio * height)


def _page_size(index: DatasetIndex, max_resolution: int) -> int:
    """A power of two that holds the largest stored image twice over (raw bytes; JPEG is smaller in
    practice); ffcv's worker fails, and the writer waits forever, on a sample larger than a page."""
    if len(index) == 0:
        return MIN_PAGE
    largest = max(w * h * 3 for w, h in (stored_size(int(a), int(b), max_resolution) for a, b in index.sizes))
    return max(MIN_PAGE, 1 << math.ceil(math.log2(2 * largest + (1 << 20))))


@contextmanager
def _writer_progress(desc: str, show: bool) -> Iterator[None]:
    """Route ffcv's writer progress bar (a bare tqdm) through the project's bar, which is quiet off a terminal."""
    import ffcv.writer

    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = lambda total=None, **_: progress(None, total=total, desc=desc, disable=not show)
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def _write_beton(
    path: str,
    index: DatasetIndex,
    ids: np.ndarray,
    *,
    workers: int,
    write_mode: str,
    max_resolution: int,
    jpeg_quality: int,
    show_progress: bool,
) -> None:
    """Write index entries `ids` (in that order) as samples 0..len(ids)-1 of the .beton at `path`."""
    with keep_torch_threads():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

        fields = {
            IMAGE_FIELD: RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality),
            LABEL_FIELD: IntField(),
        }
        workers = workers if workers >= 1 else os.cpu_count() or 1
        writer = DatasetWriter(path, fields, page_size=_page_size(index, max_resolution), num_workers=workers)
        chunk = max(1, min(100, len(ids) // (4 * workers)))
        before = set(multiprocessing.active_children())
        try:
            with _writer_progress("ffcv convert", show_progress):
                writer.from_indexed_dataset(_Samples(index, write_mode == "proportion"), indices=ids.tolist(), chunksize=chunk)
        except BaseException:  # ffcv stops its workers and frees its shared metadata block only on success
            for worker in set(multiprocessing.active_children()) - before:
                worker.terminate()  # not left writing, nor joined at exit until the whole queue is done
                worker.join(5)
            shared = getattr(writer, "metadata_sm", None)
            if shared is not None and not isinstance(shared, int):
                shared.close()
                try:
                    shared.unlink()
                except FileNotFoundError:  # already freed
                    pass
            raise


def _read_back(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(labels [n] int64, stored sizes [n, 2] (width, height), the bookkeeping record of the sidecar) of a written
    .beton, by ffcv's own Reader."""
    with keep_torch_threads():
        from ffcv.reader import Reader

        reader = Reader(path)
    meta = reader.metadata
    names = reader.field_names
    image, label = meta[f"f{names.index(IMAGE_FIELD)}"], meta[f"f{names.index(LABEL_FIELD)}"]
    sizes = np.stack([image["width"].astype(np.int64), image["height"].astype(np.int64)], axis=1)
    head = FFCV_HEADER.itemsize + reader.field_descriptors.nbytes + reader.metadata.nbytes
    book = bookkeeping_record(path, int(head), int(reader.header["alloc_table_ptr"]))
    return np.asarray(label, dtype=np.int64).reshape(-1), sizes, book


def _check_args(out: Path, write_mode: str, max_resolution: int, jpeg_quality: int) -> None:
    if write_mode not in WRITE_MODES:
        raise UserError(f"--write-mode {write_mode}: choose one of {', '.join(WRITE_MODES)}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise UserError(f"--jpeg-quality {jpeg_quality}: must be in 1..100")
    if not 1 <= int(max_resolution) <= MAX_SIDE:
        raise UserError(f"--max-resolution {max_resolution}: must be in 1..{MAX_SIDE} (JPEG's and ffcv's limit)")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {out / 'train.beton'}")


def convert(
    data: str,
    out: str,
    *,
    class_map: str | os.PathLike | list[str] | None = None,
    workers: int = 4,
    show_progress: bool = True,
    max_resolution: int = 512,
    jpeg_quality: int = 90,
    write_mode: str = "jpg",
    overwrite: bool = False,
    overwrite_any: bool = False,
) -> dict:
    """Write the ImageFolder `data` as the FFCV file `out` (e.g. train.beton) plus `out`.json.

    `class_map` is a class-map file (or the list of folder names) giving the class order; `write_mode`
    is ffcv's (`jpg`: re-encoded at `jpeg_quality`; `raw`: pixels as decoded; `proportion`: half of the
    images each way, chosen per image reproducibly). An existing `out` is replaced only when it is a
    .beton of ours and `overwrite` is given (any file with `overwrite_any`; kept aside until success).
    Returns a summary for printing.
    """
    out_path = Path(out)
    _check_args(out_path, write_mode, max_resolution, jpeg_quality)
    sidecar = sidecar_path(out_path)
    if sidecar.exists() and not is_beton(out_path) and not overwrite_any:
        raise UserError(
            f"--out {out}: its sidecar {sidecar} exists and rded-fast did not write it; give a new path, "
            "or --overwrite-any to replace both"
        )
    with claiming(out, data, class_map, BETON, overwrite=overwrite, overwrite_any=overwrite_any) as replaced:
        summary = _convert(
            data,
            out_path,
            class_map=class_map,
            workers=workers,
            show_progress=show_progress,
            max_resolution=max_resolution,
            jpeg_quality=jpeg_quality,
            write_mode=write_mode,
        )
    return {**summary, "replaced": str(replaced[0]) if replaced else None}


def _convert(
    data: str,
    out_path: Path,
    *,
    class_map,
    workers: int,
    show_progress: bool,
    max_resolution: int,
    jpeg_quality: int,
    write_mode: str,
) -> dict:
    t0 = time.perf_counter()
    index = index_source(data, class_map, workers, show_progress)
    options = {"write_mode": write_mode, "max_resolution": int(max_resolution), "jpeg_quality": int(jpeg_quality)}
    write = dict(
        workers=workers,
        write_mode=write_mode,
        max_resolution=int(max_resolution),
        jpeg_quality=int(jpeg_quality),
        show_progress=show_progress,
    )

    written: dict = {}

    def write_checked(tmp: str) -> None:
        """Write, read back, and (rarely) write again without the images ffcv could not store."""
        ids = np.arange(len(index), dtype=np.int64)
        _write_beton(tmp, index, ids, **write)
        labels, sizes, book = _read_back(tmp)
        bad = ids[labels < 0]
        missing = {int(i): _why_bad(os.path.join(index.root, index.paths[i])) for i in bad}
        if len(bad):
            ids = ids[labels >= 0]
            _write_beton(tmp, index, ids, **write)
            labels, sizes, book = _read_back(tmp)
        if len(labels) != len(ids) or not np.array_equal(labels, index.labels[ids]):
            raise UserError(f"--data {data}: images changed while converting (labels read back differ); convert again")
        record = sidecar_record(index, ids, sizes, missing, os.path.getsize(tmp), {**options, "bookkeeping": book})
        written.update(ids=ids, sizes=sizes, record=record)

    atomic_write(out_path, write_checked)
    ids, sizes, record = written["ids"], written["sizes"], written["record"]
    atomic_write_text(sidecar_path(out_path), json.dumps(record))
    seconds = time.perf_counter() - t0
    return {
        "format": NAME,
        "out": str(out_path.resolve()),
        "sidecar": str(sidecar_path(out_path).resolve()),
        "images": len(index),
        "written": len(ids),
        "skipped": len(record["skipped"]),
        "skipped_examples": record["skipped"][:5],
        "write_mode": write_mode,
        "resized": int(np.any(sizes != index.sizes[ids], axis=1).sum()),
        "bytes": record["beton_bytes"],
        "seconds": round(seconds, 3),
        "images_per_second": round(len(ids) / seconds, 1),
    }
