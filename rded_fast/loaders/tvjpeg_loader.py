"""The tvjpeg loader: torchvision's batched JPEG decoder on the scoring device (nvJPEG on CUDA, libjpeg-turbo on a
CPU), and the plan's boxes cut and resized there by exact matrix products (rded_fast/loaders/box_resize.py).
It needs nothing beyond torch and torchvision, so a GPU decodes JPEGs even where DALI is not installed.

Sources: an ImageFolder (each planned file read whole by a reader thread) or a shard folder written by
`convert --format shards` (bytes sliced from the memory-mapped tars, rded_fast/formats/shards.py). A reader
thread sorts each planned row by its bytes:
- a JPEG whose marker structure is broken (rded_fast/jpeg_check.py) is a failed row, named with the reason; it
  never reaches nvJPEG;
- an 8-bit baseline or extended JPEG with three YCbCr components goes to the device, in one
  `decode_jpeg(list, device=...)` call per batch;
- anything else (progressive, CMYK, grayscale, 12-bit, RGB-coded, a PNG named .JPEG) is decoded on that thread
  by PIL with the project's pixel rule (rded_fast/decode.py): only those rows take the slow path.
A batch the device decoder refuses is decoded again image by image; an image it refuses alone goes to PIL, and
one PIL refuses too is a failed row. Both paths' crops are cut by the same exact arithmetic, so they differ only
by their decoders (on a CPU not at all: torchvision and PIL run the same libjpeg-turbo). On a CPU, libjpeg's
warnings about a file it decodes all the same (e.g. "Corrupt JPEG data: premature end of data segment"), which
it prints on stderr naming no file, are caught, and a note names the files instead.

One decoding thread works up to `prefetch` batches ahead of the consumer. On CUDA it uses two streams of its
own: nvJPEG decodes with one that holds nothing else, the crops are cut on the other, and the consumer's stream
waits for each batch's event. nvJPEG's hardware engine writes its output as soon as it is called, whatever work
is still queued on the stream it was given (pytorch/vision#9606, meta-pytorch/torchcodec#1634), and the caching
allocator hands out blocks freed on a stream at once; so the decode stream is synchronised (host wait) before
every decode call, and every tensor that leaves a stream is marked as used by the stream that uses it.
GPU memory is bounded by the batch size: at most `prefetch` + 2 batches exist at a time, and nothing is cached.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import queue
import re
import sys
import tempfile
import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from rded_fast.decode import decode_rgb_array
from rded_fast.formats import FOLDER, SHARDS, Source
from rded_fast.formats.shards import ShardBytes
from rded_fast.jpeg_check import JpegFrame, frame_header, is_jpeg, jpeg_problem
from rded_fast.loaders.base import CropBatch, CropLoader, LoaderSpec, left_out_rows
from rded_fast.loaders.box_resize import resize_boxes
from rded_fast.outputs import note
from rded_fast.timing import Stopwatch

DEVICE_FRAMES = (0xC0, 0xC1)  # baseline and extended sequential, Huffman-coded: nvJPEG's hardware path
RGB_IDS = (ord("R"), ord("G"), ord("B"))  # component ids that make libjpeg read three components as RGB
DEVICE, PIL, FAILED = "device", "pil", "failed"  # what a reader thread makes of a row
NOTED = 5  # files named in a note when libjpeg warns (the passes' counts say how many in all)
_NOTED: set[str] = set()
_END = object()


def on_device(frame: JpegFrame | None) -> bool:
    """Whether a JPEG goes to the device decoder: 8-bit baseline or extended Huffman with three components
    stored as YCbCr. Everything else is PIL's (right for every file, only slower)."""
    return (
        frame is not None
        and frame.marker in DEVICE_FRAMES
        and frame.precision == 8
        and len(frame.components) == 3
        and frame.components != RGB_IDS
        and frame.adobe_transform != 0
    )


def read_bytes(path: str) -> bytearray | str:
    """A file's bytes (writable, so torch can wrap them without a copy), or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            got = f.readinto(data)
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    return data if got == len(data) else data[:got]


# libjpeg's warnings (its JWRN_* messages): on a CPU torchvision lets libjpeg print them on stderr, naming no file
LIBJPEG_WARNING = re.compile(
    r"(Corrupt JPEG data|Premature end of JPEG file|Invalid SOS parameters|Inconsistent progression|Unknown Adobe|"
    r"Warning: (unknown JFIF|thumbnail)|Application transferred too many)"
)
_FD2 = threading.Lock()  # one capture of the process's stderr at a time


@contextlib.contextmanager
def libjpeg_warnings() -> Iterator[list[str]]:
    """Collect libjpeg's warnings printed (by C code, on file descriptor 2) during the block, instead of letting them
    reach the console unattributed; anything else written there meanwhile (another thread's output) is passed on."""
    said: list[str] = []
    with _FD2, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield said
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True):
                if LIBJPEG_WARNING.match(line):
                    said.append(line.strip())
                else:
                    sys.stderr.write(line)


def pil_decode(data: bytes | bytearray, name: str) -> tuple[str, torch.Tensor | str]:
    """(PIL, [3, H, W] uint8) by the project's pixel rule, or (FAILED, PIL's reason naming `name`)."""
    stream = io.BytesIO(data)
    try:
        return PIL, torch.from_numpy(decode_rgb_array(stream)).permute(2, 0, 1)
    except Exception as exc:  # one bad file must not stop the run
        return FAILED, f"{type(exc).__name__}: {exc}".replace(repr(stream), repr(name))


class TvJpegCropLoader(CropLoader):
    """Executes `plan` over `source` (an ImageFolder or a shard folder) with torchvision's JPEG decoder on
    `device`; yields CropBatch of up to `batch_size` rows in plan order, crops on `device`.

    `workers`: reader threads (file reads, the JPEG check, PIL decodes); `prefetch`: batches decoded ahead.
    `counts` holds the last pass's rows by path: decoded on the device, by PIL (including those the device
    refused), failed; `watch.seconds` its seconds: `read` (summed over the reader threads), and in the decoding
    thread `read_wait` (for the readers), `decode`, `cut` (host time; on CUDA the crops' kernels run after) and
    `put_wait` (for the consumer)."""

    def __init__(self, *args, device: str | torch.device = "cpu", prefetch: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = max(1, int(prefetch))
        self.shards = self.source.table if self.source.kind == SHARDS else None
        self.counts: Counter = Counter()
        self.watch = Stopwatch()

    def __len__(self) -> int:
        return math.ceil(len(self.plan) / self.batch_size)

    def _name(self, row: int) -> str:
        return os.path.join(self.index.root, self.index.paths[int(self.plan.image_ids[row])])

    def _prepare(self, rows: list[int], reader: ShardBytes | None, missing: dict[int, str]) -> list[tuple]:
        """What a reader thread makes of `rows`: (DEVICE, encoded bytes), (PIL, decoded image) or (FAILED, reason)."""
        out = []
        for row in rows:
            if row in missing:
                out.append((FAILED, missing[row]))
                continue
            image_id = int(self.plan.image_ids[row])
            data = read_bytes(self._name(row)) if reader is None else bytearray(reader.get(image_id))
            if isinstance(data, str):
                out.append((FAILED, data))
            elif not is_jpeg(data):
                out.append(pil_decode(data, self._name(row)))
            elif (problem := jpeg_problem(data)) is not None:
                out.append((FAILED, f"corrupt JPEG structure: {problem}"))
            elif on_device(frame_header(data)):
                out.append((DEVICE, torch.frombuffer(data, dtype=torch.uint8)))
            else:
                out.append(pil_decode(data, self._name(row)))
        return out

    def _decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """Device-decoded [3, H, W] uint8 per encoded image, in one call; where that call fails, image by image,
        with the decoder's error for each image it refuses alone."""
        try:
            return self._decode_call(encoded)
        except RuntimeError:
            out: list[torch.Tensor | str] = []
            for data in encoded:
                try:
                    out.append(self._decode_call([data])[0])
                except RuntimeError as exc:
                    out.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            return out

    def _decode_call(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cuda":  # nvJPEG's hardware engine ignores stream order: drain the stream first
            torch.cuda.current_stream(self.device).synchronize()
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def _decode_rows(self, chunk: list[int], items: list[tuple], stream) -> dict[int, torch.Tensor]:
        """Device-decode the DEVICE items of a batch (on `stream` when CUDA): {position: [3, H, W] uint8}. An
        image the decoder refuses becomes a PIL item in `items`."""
        on_dev = [i for i, (kind, _) in enumerate(items) if kind == DEVICE]
        if not on_dev:
            return {}
        encoded = [items[i][1] for i in on_dev]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            with libjpeg_warnings() if self.device.type == "cpu" else contextlib.nullcontext([]) as said:
                decoded = self._decode(encoded)
        if said:  # libjpeg decoded them anyway, as PIL does for the torch loader: say which files it warned about
            self._note_warnings([self._name(chunk[i]) for i in on_dev], encoded)
        images = {}
        for i, image in zip(on_dev, decoded):
            if isinstance(image, str):
                self.counts["device_refused"] += 1
                items[i] = pil_decode(items[i][1].numpy().tobytes(), self._name(chunk[i]))
            else:
                images[i] = image
        return images

    def _note_warnings(self, names: list[str], encoded: list[torch.Tensor]) -> None:
        """Decode each image again alone to find those libjpeg warns about; a note names the first few (every one is
        counted in `counts["libjpeg_warnings"]`, and the pass's total is noted at its end)."""
        for name, data in zip(names, encoded):
            with libjpeg_warnings() as said, contextlib.suppress(RuntimeError):
                decode_jpeg([data], mode=ImageReadMode.RGB, device=self.device)
            if said:
                self.counts["libjpeg_warnings"] += 1
                if name not in _NOTED and len(_NOTED) < NOTED:  # once per file (the observer check reads some again)
                    _NOTED.add(name)
                    note(f"{name}: libjpeg: {'; '.join(said)} (decoded all the same, as PIL decodes it)")

    def _cut(self, chunk: list[int], items: list[tuple], images: dict[int, torch.Tensor], stream) -> CropBatch:
        """The batch of `chunk`: device-decoded `images` and the PIL items moved to the device, each size checked
        against the index, then every box cut (on `stream` when CUDA); failed rows get zeros and their reason."""
        reasons = {chunk[i]: value for i, (kind, value) in enumerate(items) if kind == FAILED}
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for image in images.values():
                if stream is not None:
                    image.record_stream(stream)  # made on the decode stream, read and freed on this one
            images.update({i: value.to(self.device) for i, (kind, value) in enumerate(items) if kind == PIL})
            for i, image in list(images.items()):
                w, h = (int(v) for v in self.index.sizes[int(self.plan.image_ids[chunk[i]])])
                if tuple(image.shape[1:]) != (h, w):
                    reasons[chunk[i]] = f"decoded size {image.shape[2]}x{image.shape[1]} differs from indexed {w}x{h}"
                    del images[i]
            k, p = self.plan.num_crop, self.crop_size
            crops = torch.zeros((len(chunk), k, 3, p, p), dtype=torch.uint8, device=self.device)
            good = sorted(images)
            if good:
                boxes = self.plan.boxes[np.asarray(chunk)[good]]
                crops[torch.as_tensor(good, device=self.device)] = resize_boxes([images[i] for i in good], boxes, p)
        self.counts.update(items[i][0] for i in good)
        self.counts[FAILED] += len(reasons)
        ok = torch.tensor([row not in reasons for row in chunk], dtype=torch.bool)
        return CropBatch(rows=torch.tensor(chunk, dtype=torch.int64), crops=crops, ok=ok, reasons=reasons)

    def _missing(self) -> dict[int, str]:
        """Rows whose image a converter left out of the shards, with the converter's reason."""
        if self.shards is None:
            return {}
        ids = self.plan.image_ids
        return left_out_rows(np.arange(len(ids)), ids, self.shards.shard[ids] >= 0, self.shards.missing)

    def _read_ahead(self, pool: ThreadPoolExecutor, reader: ShardBytes | None) -> Iterator[tuple[list[int], list[tuple]]]:
        """(plan rows, their items) per batch in plan order, read `prefetch` + 1 batches ahead on the reader pool;
        each batch is split so each reader thread takes a contiguous run of rows."""
        missing = self._missing()
        rows = np.arange(len(self.plan))
        chunks = [rows[s : s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
        pending: deque = deque()
        for chunk in chunks:
            parts = np.array_split(chunk, min(len(chunk), max(1, self.workers)))
            prepare = self.watch.timed("read", self._prepare)
            pending.append((chunk.tolist(), [pool.submit(prepare, p.tolist(), reader, missing) for p in parts]))
            while len(pending) > self.prefetch or (pending and chunk is chunks[-1]):
                rows, futures = pending.popleft()
                yield rows, [item for f in futures for item in f.result()]

    def _produce(self, results: queue.Queue, stop: threading.Event) -> None:
        """The decoding thread: decodes and cuts each batch the readers have prepared, and puts (CropBatch, event
        or None) on `results` in plan order, then _END (or the exception that ended it)."""
        reader = ShardBytes(self.shards) if self.shards is not None else None
        pool = ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="tvjpeg-read")
        cuda = self.device.type == "cuda"
        try:
            with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
                decode_stream, crop_stream = (
                    (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)) if cuda else (None, None)
                )
                watch = self.watch
                for chunk, items in watch.waiting("read_wait", self._read_ahead(pool, reader)):
                    if stop.is_set():
                        return
                    images = watch.timed("decode", self._decode_rows)(chunk, items, decode_stream)
                    if cuda:
                        crop_stream.wait_stream(decode_stream)  # torchvision makes the decode stream wait for nvJPEG
                    batch = watch.timed("cut", self._cut)(chunk, items, images, crop_stream)
                    if not watch.timed("put_wait", _put)(results, (batch, crop_stream.record_event() if cuda else None), stop):
                        return
            _put(results, _END, stop)
        except BaseException as exc:  # handed to the consumer, which raises it
            _put(results, exc, stop)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if reader is not None:
                reader.close()

    def __iter__(self) -> Iterator[CropBatch]:
        self.counts, self.watch = Counter(), Stopwatch()
        results: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(results, stop), name="tvjpeg-decode", daemon=True)
        thread.start()
        try:
            while (item := results.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:  # the consumer's stream waits for the crops, and the allocator for its use
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    batch.crops.record_stream(stream)
                yield batch
        finally:  # the decoding thread sees `stop` before its next batch, or within 0.1 s while it waits to put
            stop.set()
            thread.join()
            if self.counts["libjpeg_warnings"] > NOTED:
                note(
                    f"libjpeg warned about {self.counts['libjpeg_warnings']} image(s) in all (at most {NOTED} files are named, once per process)"
                )


def _put(results: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` on `results` unless the consumer stopped (then False)."""
    while not stop.is_set():
        try:
            results.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def build(source: Source, plan, crop_size: int, *, batch_size, workers, device, prefetch, reuse_buffers) -> CropLoader:
    """The tvjpeg loader as rded_fast.loaders.make_loader builds it: decoding on the scoring device."""
    return TvJpegCropLoader(source, plan, crop_size, batch_size=batch_size, workers=workers, device=device, prefetch=prefetch)


SPEC = LoaderSpec("tvjpeg", reads=(FOLDER, SHARDS), build=build, auto_order={"cpu": 2, "cuda": 1})
