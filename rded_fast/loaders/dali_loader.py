"""The DALI loader: decode each planned image once with DALI and cut its planned boxes.

Sources: a shard folder from `rded-fast convert --format shards` (the planned samples' JPEG bytes are read
from the tars at the offsets in `dataset.json` and fed in through an external source, since DALI's
webdataset reader can only stream every sample in stored order, and a plan wants a subset, in plan
order), or a plain ImageFolder (DALI's file reader over the planned files, in plan order). Either way the
planned boxes come in through an external source beside the bytes, one contiguous [B, K, 4] array per
batch, so DALI cuts exactly the plan's boxes: per image one decode (`device="mixed"`: nvJPEG and the
hardware JPEG decoder on CUDA, `hw_decoder_load` settable; `device="cpu"`: libjpeg-turbo), then per crop
an integer slice of the box and a bilinear antialiased resize to p x p, which is torchvision's
`resized_crop` up to DALI's antialias filter (the two differ by a few grey levels on large downscales;
tests/test_dali.py measures it). A fused `resize` with a region of interest was left out: it reads pixels
outside the box, beyond the documented tolerance; the slice keeps the crop's edges the crop's own. Shard bytes go
in as a list of memory-mapped views, the fastest feed measured (benchmarks/README.md, "Timings the code quotes").

Every DALI batch is one batch of the loader (plan rows [i*B, (i+1)*B)), so crops reach torch as DALI made
them (DALIGenericIterator, on the decoding device, uint8) with no regrouping and no Python per sample.
A row DALI must not see (a broken JPEG, a file left out at convert time, a file name DALI cannot open)
keeps its place: a good row of the same batch is decoded in its stead and its crops are zeroed.

Broken JPEGs are found by rded_fast.loaders.jpeg_gate while DALI decodes earlier batches; the feed of a
batch waits for its rows' verdicts. A broken row found that way, or an image DALI fails on at run time
(its error names the sample; else each row is tried alone), ends the pipeline before that batch, and a
new one starts there with the row left out: every failure is a named, counted skip. All DALI types stay
inside this module.
"""

from __future__ import annotations

import functools
import inspect
import io
import math
import numbers
import os
import re
from collections.abc import Callable, Generator, Iterator

import numpy as np
import torch
from PIL import Image

from rded_fast.formats import FOLDER, SHARDS, Source
from rded_fast.formats.shards import ShardBytes
from rded_fast.loaders.base import CropBatch, CropLoader, LoaderOption, LoaderSpec, left_out_rows
from rded_fast.loaders.jpeg_gate import JpegGate

DECODE_DEVICES = ("auto", "cpu", "mixed")
_SAMPLE_IN_ERROR = re.compile(r"sample #(\d+)")
OUTPUTS = ["crops", "shape", "position", "reader_position"]
UNOPENABLE_NAME = "file name is not valid UTF-8, which DALI cannot open; rename the file or use --loader torch"


def failing_sample(message: str) -> int | None:
    """The batch position DALI names in a decode error ("Failed to decode sample #3"), or None."""
    found = _SAMPLE_IN_ERROR.search(message)
    return int(found.group(1)) if found else None


def import_dali() -> None:
    """Import DALI and its torch plugin: what this module uses of them is imported where it is used, so that listing
    the loaders (rded_fast.loaders) costs no DALI import, and a machine without DALI lists this loader all the same;
    this is the spec's preload hook."""
    import nvidia.dali  # noqa: F401
    import nvidia.dali.plugin.pytorch  # noqa: F401


@functools.cache
def has_dynamic_executor() -> bool:
    """Whether this DALI has the dynamic executor: `image.shape()` of a GPU ("mixed") decoder output needs it."""
    from nvidia.dali import Pipeline

    return "exec_dynamic" in inspect.signature(Pipeline.__init__).parameters


def dali_can_open(name: str) -> bool:
    """Whether DALI's file reader can take this path: its arguments are UTF-8 strings, and a name that is not
    (undecodable bytes, kept by Python as surrogates) makes it refuse the whole file list."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def crop_pipeline(*args, **kwargs):
    """The DALI pipeline of `crop_graph` (DALI's `pipeline_def`, seed 0): the graph's arguments, then the pipeline's
    (batch_size, num_threads, device_id, ...)."""
    from nvidia.dali import pipeline_def

    return pipeline_def(seed=0)(crop_graph)(*args, **kwargs)


def crop_graph(
    feed: Callable, files: list[str] | None, root: str | None, num_crop: int, crop_size: int, decode_device: str, decoder: dict
):
    """One decode per image, then `num_crop` slice+resize crops. `feed(info)` gives per batch the sample positions
    [B, 1] int32 and the boxes [B, K, 4] int32 (top, left, height, width), and first the encoded bytes when
    `files` is None; else DALI's file reader reads `files` (relative to `root`). Outputs: crops [K, 3, p, p]
    uint8, the decoded shape [3] (H, W, C), the fed position and the position the file reader reports (the
    same node when bytes are fed; the loader checks that the two streams stay in step)."""
    from nvidia.dali import fn, types

    if files is None:
        encoded, position, boxes = fn.external_source(source=feed, num_outputs=3, batch=True, batch_info=True)
        reader_position = position
    else:
        encoded, reader_position = fn.readers.file(file_root=root, files=files, random_shuffle=False, name="files")
        position, boxes = fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True)
    image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False, **decoder)
    crops = []
    for k in range(num_crop):
        patch = fn.slice(image, boxes[k, 0:2], boxes[k, 2:4], axis_names="HW", out_of_bounds_policy="pad")
        crops.append(fn.resize(patch, size=[crop_size, crop_size], antialias=True, interp_type=types.INTERP_LINEAR))
    stacked = fn.transpose(fn.stack(*crops), perm=[0, 3, 1, 2])
    return stacked, image.shape(), position, reader_position


def decoder_options(decode_device: str, hw_decoder_load: float | None, size_hint: tuple[int, int]) -> dict:
    """`fn.decoders.image` options: on the GPU, the CPU decoders' chroma upsampling (jpeg_fancy_upsampling, what
    PIL does too), the decoder split, and a typical planned image size `size_hint` (width, height) as the hardware
    decoder's preallocation hint, so it allocates once for most images instead of growing."""
    if decode_device != "mixed":
        return {}
    options = {"jpeg_fancy_upsampling": True}
    if hw_decoder_load is not None:
        options["hw_decoder_load"] = hw_decoder_load
    if size_hint[0] > 0 and size_hint[1] > 0:
        options["preallocate_width_hint"], options["preallocate_height_hint"] = int(size_hint[0]), int(size_hint[1])
    return options


def _pil_reason(data: bytes | str) -> str | None:
    """Why PIL cannot fully decode a file or byte string, or None when it can."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class DaliCropLoader(CropLoader):
    """Executes `plan` over `source` with DALI; yields CropBatch of up to `batch_size` rows in plan order.

    `source` is a shard folder (see rded_fast/formats/shards.py) or an ImageFolder. `device`:
    `mixed` (GPU decode on CUDA device `device_id`, default the current one, so that decoding happens on
    the GPU that scores), `cpu`, or `auto` (mixed when CUDA is available). `workers` is DALI's CPU
    thread count, `prefetch` its queue depth. `hw_decoder_load` is the fraction of each batch nvJPEG
    sends to the hardware JPEG decoder (the rest goes to its CUDA decoder); the two decoders' pixels
    can differ, and which one an image gets depends on its position in the batch unless the split is
    pinned to 0 or 1, so only a pinned split gives the same bytes across batch sizes and resumes.
    `check_processes`: force (True) or forbid (False) worker processes for the JPEG check
    (rded_fast.loaders.jpeg_gate; None: by plan size). After a pass, `timings()` has the check's seconds.
    """

    def __init__(
        self,
        *args,
        device: str = "auto",
        hw_decoder_load: float | None = None,
        device_id: int | None = None,
        prefetch: int = 2,
        check_processes: bool | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if device not in DECODE_DEVICES:
            raise ValueError(f"device {device!r}: choose one of {DECODE_DEVICES}")
        if device == "auto":
            device = "mixed" if torch.cuda.is_available() else "cpu"
        if device == "mixed" and not has_dynamic_executor():
            raise RuntimeError("GPU decoding needs a DALI with the dynamic executor (exec_dynamic); upgrade DALI")
        if (why := check_share(hw_decoder_load)) is not None:
            raise ValueError(f"hw_decoder_load {hw_decoder_load}: {why}")
        self.workers, self.prefetch = max(1, self.workers), max(1, int(prefetch))
        self.decode_device, self.hw_decoder_load = device, hw_decoder_load
        self.device_id = None if device != "mixed" else (torch.cuda.current_device() if device_id is None else int(device_id))
        self.rows = np.arange(len(self.plan), dtype=np.int64)
        self.shards = self.source.table if self.source.kind == SHARDS else None
        self.check_processes = check_processes
        sizes = self.index.sizes[self.plan.image_ids]  # [M, 2] (width, height) by plan row
        self._expected_hw = torch.from_numpy(np.ascontiguousarray(sizes[:, ::-1]))  # what DALI's shape reports
        self._boxes = np.ascontiguousarray(self.plan.boxes, dtype=np.int32)
        # the 90th percentile, not the largest: one huge image must not make the decoder preallocate for it per sample
        self._size_hint = tuple(int(v) for v in np.percentile(sizes[self.rows], 90, axis=0)) if len(self.rows) else (0, 0)
        self._out_device = torch.device("cuda", self.device_id) if device == "mixed" else torch.device("cpu")
        self._seconds: dict[str, float] = {}

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def timings(self) -> dict[str, float]:
        return dict(self._seconds)

    def _image_id(self, row: int) -> int:
        return int(self.plan.image_ids[row])

    def _source(self, row: int) -> str | tuple[str, int, int]:
        """Where a row's bytes are: its file, or (tar, offset, length) in a shard."""
        image_id = self._image_id(row)
        if self.shards is None:
            return os.path.join(self.index.root, self.index.paths[image_id])
        shards = self.shards
        return shards.tars[int(shards.shard[image_id])], int(shards.offset[image_id]), int(shards.nbytes[image_id])

    def _never_decoded(self) -> dict[int, str]:
        """Rows DALI is never given, with the reason: images left out at convert time (shards), file names DALI
        cannot open (folder)."""
        ids = self.plan.image_ids[self.rows]
        if self.shards is not None:
            return left_out_rows(self.rows, ids, self.shards.shard[ids] >= 0, self.shards.missing)
        paths = self.index.paths  # an ASCII name always opens: only the others are encoded (seconds at ImageNet scale)
        rows = zip(self.rows.tolist(), ids.tolist())
        return {r: UNOPENABLE_NAME for r, i in rows if not paths[i].isascii() and not dali_can_open(paths[i])}

    def __iter__(self) -> Iterator[CropBatch]:
        bad = self._never_decoded()
        todo = np.asarray([r for r in self.rows.tolist() if r not in bad], dtype=np.int64)
        gate = JpegGate(todo, self._source, self.shards is not None, self.workers, self.check_processes)
        reader = ShardBytes(self.shards) if self.shards is not None else None
        b = self.batch_size
        chunks = [self.rows[i : i + b] for i in range(0, len(self.rows), b)]
        try:
            start = 0
            while start < len(chunks):
                start = yield from self._segment(chunks, start, bad, gate, reader)
        finally:
            gate.close()
            if reader is not None:
                reader.close()
            self._seconds = gate.seconds()

    def _decoded_rows(self, chunk: np.ndarray, bad: dict[int, str], size: int) -> np.ndarray | None:
        """The `size` rows DALI decodes for one loader batch: the chunk's own, with a good row of the chunk in place
        of each bad one and as padding; None when no row of the chunk can be decoded."""
        if not bad:
            return np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk))])
        rows = chunk.tolist()
        good = [r for r in rows if r not in bad]
        if not good:
            return None
        stand_in = good[0]
        return np.asarray([stand_in if r in bad else r for r in rows] + [stand_in] * (size - len(rows)), dtype=np.int64)

    def _segment(
        self, chunks: list[np.ndarray], start: int, bad: dict[int, str], gate: JpegGate, reader: ShardBytes | None
    ) -> Generator[CropBatch, None, int]:
        """Yield the batches of chunks[start:] from one DALI pipeline. Returns the chunk at which a new pipeline
        must start (a failure found there was added to `bad`), or len(chunks) when all are done."""
        bad.update(gate.known())
        decoded = {c: self._decoded_rows(chunks[c], bad, self.batch_size) for c in range(start, len(chunks))}
        batches = [rows for rows in decoded.values() if rows is not None]
        at = [c for c, rows in decoded.items() if rows is not None]

        def admit(j: int) -> bool:  # the feed's gate: batch j goes to DALI only once its rows are known good
            found = {r: why for r, why in gate.verdicts(chunks[at[j]]).items() if r not in bad}
            bad.update(found)
            return not found

        before = len(bad)

        outputs = self._run(batches, reader, admit)
        try:
            for c in range(start, len(chunks)):
                if decoded[c] is None:
                    yield self._failed_batch(chunks[c], bad)
                    continue
                try:
                    out = next(outputs)
                except StopIteration:  # the feed stopped here: the check found a broken row in this batch
                    if len(bad) == before:
                        raise _OutOfStep(f"DALI stopped before batch {c} of {len(chunks)} with no failure found") from None
                    return c
                except _OutOfStep:
                    raise
                except Exception as exc:  # DALI failed on an image of this batch: find it; go on from here
                    outputs.close()
                    self._blame(chunks[c], decoded[c], str(exc), reader, bad)
                    return c
                yield self._batch(chunks[c], decoded[c], out, bad)
            return len(chunks)
        finally:
            outputs.close()

    def _run(self, batches: list[np.ndarray], reader: ShardBytes | None, admit: Callable[[int], bool]) -> Iterator[dict]:
        """One DALI pipeline over `batches` (rows to decode, each of one size); yields DALIGenericIterator's
        outputs per batch. It stops before batch j when `admit(j)` is False."""
        size = len(batches[0]) if batches else 1
        positions = np.arange(size * len(batches), dtype=np.int32).reshape(-1, size, 1)
        files = None
        if reader is None:
            paths, ids = self.index.paths, self.plan.image_ids
            files = [paths[i] for i in ids[np.concatenate(batches)].tolist()] if batches else []

        def feed(info):
            j = info.iteration
            if j >= len(batches) or not admit(j):
                raise StopIteration
            rows = batches[j]
            if reader is None:
                return positions[j], self._boxes[rows]
            return [reader.get(self._image_id(r)) for r in rows.tolist()], positions[j], self._boxes[rows]

        if not batches:
            return
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        executor = {"exec_dynamic": True} if has_dynamic_executor() else {}
        pipe = crop_pipeline(
            feed,
            files,
            self.index.root if files is not None else None,
            self.plan.num_crop,
            self.crop_size,
            self.decode_device,
            decoder_options(self.decode_device, self.hw_decoder_load, self._size_hint),
            batch_size=size,
            num_threads=self.workers,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            **executor,
        )
        iterator = DALIGenericIterator([pipe], OUTPUTS, size=-1, prepare_first_batch=False)
        try:
            for out in iterator:
                yield out[0]
        finally:
            del iterator, pipe

    def _batch(self, chunk: np.ndarray, decoded: np.ndarray, out: dict, bad: dict[int, str]) -> CropBatch:
        """The loader batch of `chunk` from DALI's outputs for `decoded` (its rows with stand-ins): crops as DALI
        made them, a row's crops zeroed where it is bad or decoded to another size than indexed."""
        n = len(chunk)
        if not torch.equal(out["position"][:n].view(-1), out["reader_position"][:n].view(-1).to(torch.int32)):
            raise _OutOfStep("DALI file reader and box feed out of step")  # never expected; fail loudly
        crops = out["crops"][:n]
        shape = out["shape"][:n, :2].cpu()  # a CPU output already (shape metadata): no copy, no sync
        differs = (shape != self._expected_hw[torch.from_numpy(decoded[:n])]).any(1)
        reasons = {int(r): bad[int(r)] for r in chunk.tolist() if int(r) in bad} if bad else {}
        for i in torch.nonzero(differs).view(-1).tolist():
            row = int(chunk[i])
            if row not in reasons:
                h, w = (int(v) for v in shape[i])
                eh, ew = (int(v) for v in self._expected_hw[row])
                reasons[row] = f"decoded size {w}x{h} differs from indexed {ew}x{eh}"
        ok = torch.ones(n, dtype=torch.bool)
        if reasons:
            failed = torch.from_numpy(np.flatnonzero(np.isin(chunk, list(reasons))))
            ok[failed] = False
            crops[failed.to(crops.device)] = 0
        return CropBatch(rows=torch.from_numpy(chunk.copy()), crops=crops, ok=ok, reasons=reasons)

    def _failed_batch(self, chunk: np.ndarray, bad: dict[int, str]) -> CropBatch:
        k, p = self.plan.num_crop, self.crop_size
        return CropBatch(
            rows=torch.from_numpy(chunk.copy()),
            crops=torch.zeros((len(chunk), k, 3, p, p), dtype=torch.uint8, device=self._out_device),
            ok=torch.zeros(len(chunk), dtype=torch.bool),
            reasons={int(r): bad[int(r)] for r in chunk.tolist()},
        )

    def _blame(self, chunk: np.ndarray, decoded: np.ndarray, message: str, reader: ShardBytes | None, bad: dict) -> None:
        """Add to `bad` the rows of `chunk` that made DALI fail with `message`: the sample DALI's error names, else
        those found by halving the batch (at most 2 log2(B) runs for one bad row, not B), else every row of the
        chunk, so the run always moves on."""
        position = failing_sample(message)
        if position is not None and position < len(decoded) and int(decoded[position]) not in bad:
            row = int(decoded[position])
            bad[row] = self._pil_reason(row, reader) or "DALI: " + _decode_error_line(message)
            return
        found = self._failing(sorted(set(decoded.tolist()) - set(bad)), reader, message)
        bad.update(found)
        if not found:
            bad.update({int(r): "DALI: " + _decode_error_line(message) for r in chunk.tolist() if int(r) not in bad})

    def _pil_reason(self, row: int, reader: ShardBytes | None) -> str | None:
        image_id = self._image_id(row)
        data = bytes(reader.get(image_id)) if reader is not None else os.path.join(self.index.root, self.index.paths[image_id])
        return _pil_reason(data)

    def _failing(self, rows: list[int], reader: ShardBytes | None, message: str | None) -> dict[int, str]:
        """{row: reason} for the rows of `rows` a DALI run fails on, by halving. `message`: the error of a run of
        these rows when it is known to fail (None: not known yet, so they are run); a half that decodes clears
        the other half of doubt, so one bad row costs one or two runs per halving."""
        if not rows:
            return {}
        if message is None:
            message = self._error(rows, reader)
            if message is None:
                return {}
        if len(rows) == 1:
            return {rows[0]: self._pil_reason(rows[0], reader) or "DALI: " + _decode_error_line(message)}
        half = len(rows) // 2
        left = self._failing(rows[:half], reader, None)
        return {**left, **self._failing(rows[half:], reader, None if left else message)}

    def _error(self, rows: list[int], reader: ShardBytes | None) -> str | None:
        """The error of one DALI run over `rows`, or None when they all decode."""
        try:
            for _ in self._run([np.asarray(rows, dtype=np.int64)], reader, lambda j: True):
                pass
        except _OutOfStep:
            raise
        except Exception as exc:
            return str(exc)
        return None


def _decode_error_line(message: str) -> str:
    """The line of a DALI pipeline error that says what failed (not its traceback of our code): the one naming
    the sample, else the first after DALI's "encountered:", else the first line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    named = next((line for line in lines if _SAMPLE_IN_ERROR.search(line)), None)
    if named is not None:
        return named
    after = lines[lines.index("encountered:") + 1 :] if "encountered:" in lines else []
    cause = next((line for line in after if not line.startswith("Current pipeline object")), None)
    return cause or (lines[0] if lines else "decode failed")


class _OutOfStep(RuntimeError):
    """The file reader's and the box feed's sample positions differ: a bug, never an image problem."""


def check_share(value) -> str | None:
    """Why `value` is no share of the hardware decoder (None: DALI's own split, or a number in 0..1), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return "must be a number"
    if not math.isfinite(value):
        return "must be a finite number"
    return None if 0.0 <= value <= 1.0 else "must be in 0..1"


HW_DECODER_LOAD = LoaderOption(
    flag="--hw-decoder-load",
    dest="hw_decoder_load",
    type=float,
    default=1.0,
    help="DALI on CUDA: share of JPEGs for the hardware decoder (default 1; 0 or 1 keep output bytes independent of batch size)",
    check=check_share,
)


def build(source: Source, plan, crop_size: int, *, batch_size, workers, device, prefetch, reuse_buffers, hw_decoder_load):
    """The DALI loader as rded_fast.loaders.make_loader builds it: GPU decoding ("mixed") on the scoring device when
    that is CUDA, else on the CPU."""
    target = torch.device(device)
    decode = "mixed" if target.type == "cuda" else "cpu"
    device_id = (target.index if target.index is not None else torch.cuda.current_device()) if decode == "mixed" else None
    return DaliCropLoader(
        source, plan, crop_size, batch_size=batch_size, workers=workers, device=decode, device_id=device_id,
        prefetch=prefetch, hw_decoder_load=hw_decoder_load,
    )  # fmt: skip


SPEC = LoaderSpec(
    "dali",
    reads=(FOLDER, SHARDS),
    build=build,
    auto_order={"cpu": 1, "cuda": 0},
    options=(HW_DECODER_LOAD,),
    library="nvidia.dali",
    preload=import_dali,
)
