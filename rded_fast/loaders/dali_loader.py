"""The DALI loader: decode each planned image once with DALI and cut its planned boxes.

Sources: a shard folder from `rded-fast convert --format dali` (the planned samples' JPEG bytes are read
from the tars at the offsets in `dataset.json` and fed in through an external source, since DALI's
webdataset reader can only stream every sample in stored order, and a plan wants a subset, in plan
order), or a plain ImageFolder (DALI's file reader over the planned files, in plan order). Either
way the planned boxes come in through an external source beside the bytes, so DALI cuts exactly the
plan's boxes: per image one decode (`device="mixed"`: nvJPEG and the hardware JPEG decoder on CUDA,
`hw_decoder_load` settable; `device="cpu"`: libjpeg-turbo), then per crop an integer slice of the box
and a bilinear antialiased resize to p x p, which is torchvision's `resized_crop` up to DALI's
antialias filter (the two differ by a few grey levels on large downscales; tests/test_dali.py
measures it). Crops reach torch through DALIGenericIterator on the decoding device, uint8.

DALI stops a whole pipeline on one undecodable file; this loader then finds the culprit in the
failing batch (PIL, then one-image DALI runs), reports it as a failed row, and restarts after it.
All DALI types stay inside this module.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image

from rded_fast.jpeg_check import is_jpeg, jpeg_problem
from rded_fast.loaders.base import CropBatch, CropLoader, left_out_rows
from rded_fast.loaders.shards import ShardBytes, is_shard_dir, load_shard_dataset

DECODE_DEVICES = ("auto", "cpu", "mixed")
# `image.shape()` of a GPU ("mixed") decoder output is only available under DALI's dynamic executor.
HAS_DYNAMIC_EXECUTOR = "exec_dynamic" in inspect.signature(Pipeline.__init__).parameters
_SAMPLE_IN_ERROR = re.compile(r"sample #(\d+)")


def failing_sample(message: str) -> int | None:
    """The batch position DALI names in a decode error ("Failed to decode sample #3"), or None."""
    found = _SAMPLE_IN_ERROR.search(message)
    return int(found.group(1)) if found else None


def shard_rows(num_rows: int, shard_id: int, num_shards: int) -> np.ndarray:
    """Plan rows of shard `shard_id` of `num_shards`: a contiguous block, DALI readers' split rule."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is not in 0..{num_shards - 1}")
    return np.arange(num_rows * shard_id // num_shards, num_rows * (shard_id + 1) // num_shards, dtype=np.int64)


@pipeline_def(seed=0)
def crop_pipeline(
    feed: Callable, files: list[str] | None, num_crop: int, crop_size: int, decode_device: str, hw_decoder_load: float | None
):
    """One decode per image, then `num_crop` slice+resize crops: outputs crops [K, 3, p, p] uint8, the
    decoded shape [3] (H, W, C), the position in the segment fed by `feed`, and the position the file
    reader reports (equal to the former; the loader checks that both streams stay in step)."""
    if files is None:
        encoded, anchors, extents, position = fn.external_source(source=feed, num_outputs=4, batch=True, batch_info=True)
        reader_position = position
    else:
        encoded, reader_position = fn.readers.file(files=files, random_shuffle=False, pad_last_batch=True, name="files")
        anchors, extents, position = fn.external_source(source=feed, num_outputs=3, batch=True, batch_info=True)
    options = {}
    if decode_device == "mixed":
        options["jpeg_fancy_upsampling"] = True  # the CPU decoders' (and PIL's) chroma upsampling
        if hw_decoder_load is not None:
            options["hw_decoder_load"] = hw_decoder_load
    image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, adjust_orientation=False, **options)
    crops = []
    for k in range(num_crop):
        patch = fn.slice(image, anchors[k], extents[k], axis_names="HW", out_of_bounds_policy="pad")
        crops.append(fn.resize(patch, size=[crop_size, crop_size], antialias=True, interp_type=types.INTERP_LINEAR))
    stacked = fn.transpose(fn.stack(*crops), perm=[0, 3, 1, 2])
    return stacked, image.shape(), position, reader_position


def _pil_reason(data: bytes | str) -> str | None:
    """Why PIL cannot fully decode a file or byte string, or None when it can."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class DaliCropLoader(CropLoader):
    """Executes `plan` over `index` with DALI; yields CropBatch of up to `batch_size` rows in plan order.

    `index.root` is a shard folder (see rded_fast/loaders/shards.py) or an ImageFolder root. `device`:
    `mixed` (GPU decode on CUDA device `device_id`, default the current one, so that decoding happens on
    the GPU that scores), `cpu`, or `auto` (mixed when CUDA is available). `workers` is DALI's CPU
    thread count, `prefetch` its queue depth. `hw_decoder_load` is the fraction of each batch nvJPEG
    sends to the hardware JPEG decoder (the rest goes to its CUDA decoder); the two decoders' pixels
    can differ, and which one an image gets depends on its position in the batch unless the split is
    pinned to 0 or 1, so only a pinned split gives the same bytes across batch sizes and resumes.
    `shard_id`/`num_shards` restrict the loader to one contiguous block of plan rows (for one process
    per GPU).
    """

    def __init__(
        self,
        *args,
        device: str = "auto",
        hw_decoder_load: float | None = None,
        shard_id: int = 0,
        num_shards: int = 1,
        device_id: int | None = None,
        prefetch: int = 2,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if device not in DECODE_DEVICES:
            raise ValueError(f"device {device!r}: choose one of {DECODE_DEVICES}")
        if device == "auto":
            device = "mixed" if torch.cuda.is_available() else "cpu"
        if device == "mixed" and not HAS_DYNAMIC_EXECUTOR:
            raise RuntimeError("GPU decoding needs a DALI with the dynamic executor (exec_dynamic); upgrade DALI")
        if hw_decoder_load is not None and not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load {hw_decoder_load}: must be in 0..1")
        self.workers, self.prefetch = max(1, self.workers), max(1, int(prefetch))
        self.decode_device, self.hw_decoder_load = device, hw_decoder_load
        self.device_id = None if device != "mixed" else (torch.cuda.current_device() if device_id is None else int(device_id))
        self.rows = shard_rows(len(self.plan), shard_id, num_shards)
        self.shards = load_shard_dataset(self.index.root) if is_shard_dir(self.index.root) else None

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def _missing(self) -> dict[int, str]:
        """Rows that cannot be read at all (left out at convert time), or whose JPEG structure is broken
        (rded_fast.jpeg_check; DALI's parser fails, or crashes, on those), with the reason."""
        if self.shards is None:
            return broken_jpeg_rows(self.rows, lambda r: _file_bytes(self._path(r)), workers=self.workers)
        ids = self.plan.image_ids[self.rows]
        missing = left_out_rows(self.rows, ids, self.shards.shard[ids] >= 0, self.shards.missing)
        reader = ShardBytes(self.shards)
        try:
            rows = [r for r in self.rows if int(r) not in missing]
            return {
                **missing,
                **broken_jpeg_rows(rows, lambda r: reader.get(int(self.plan.image_ids[r])), require=True, workers=self.workers),
            }
        finally:
            reader.close()

    def _path(self, row: int) -> str:
        return os.path.join(self.index.root, self.index.paths[int(self.plan.image_ids[row])])

    def _groups(self, remaining: list[int]) -> list[list[int]]:
        """DALI batches over `remaining` rows. Bytes fed from shards: one batch per plan chunk, so
        batches line up with the chunks the loader yields (no regrouping copy). The file reader always
        fills `batch_size`: consecutive blocks."""
        b = self.batch_size
        if self.shards is None:
            return [remaining[i : i + b] for i in range(0, len(remaining), b)]
        first, groups = int(self.rows[0]), {}
        for r in remaining:
            groups.setdefault((r - first) // b, []).append(r)
        return list(groups.values())

    def _segment(self, groups: list[list[int]], reader: ShardBytes | None) -> Iterator[tuple]:
        """Run one DALI pipeline, one batch per group; yields (rows, crops [n, K, 3, p, p], shapes [n, 3])."""
        plan = self.plan
        batch_size = max(len(g) for g in groups)
        boxes = plan.boxes.astype(np.int32)  # [M, K, 4] (top, left, height, width)
        files = None
        if reader is None:
            files = [os.path.join(self.index.root, self.index.paths[int(plan.image_ids[r])]) for g in groups for r in g]
        starts = np.cumsum([0] + [len(g) for g in groups])

        def feed(info):
            i = info.iteration
            if i >= len(groups):
                raise StopIteration
            rows = list(groups[i])
            positions = list(range(int(starts[i]), int(starts[i + 1])))
            if files is not None:  # the file reader repeats its last file to fill the last batch; so do we
                rows += [rows[-1]] * (batch_size - len(rows))
                positions += [positions[-1]] * (batch_size - len(positions))
            anchors = [np.ascontiguousarray(boxes[r, :, 0:2]) for r in rows]
            extents = [np.ascontiguousarray(boxes[r, :, 2:4]) for r in rows]
            pos = [np.array([p], dtype=np.int32) for p in positions]
            if reader is None:
                return anchors, extents, pos
            return [reader.get(int(plan.image_ids[r])) for r in rows], anchors, extents, pos

        executor = {"exec_dynamic": True} if HAS_DYNAMIC_EXECUTOR else {}
        pipe = crop_pipeline(
            feed,
            files,
            plan.num_crop,
            self.crop_size,
            self.decode_device,
            self.hw_decoder_load,
            batch_size=batch_size,
            num_threads=self.workers,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            **executor,
        )
        iterator = DALIGenericIterator([pipe], ["crops", "shape", "position", "reader_position"], size=-1)
        try:
            for i, out in enumerate(iterator):
                out = out[0]
                n = len(groups[i])
                if not torch.equal(out["position"][:n].view(-1), out["reader_position"][:n].view(-1).to(torch.int32)):
                    raise _OutOfStep("DALI file reader and box feed out of step")  # never expected; fail loudly
                yield groups[i], out["crops"][:n], out["shape"][:n].cpu()
        finally:
            del iterator, pipe

    def _probe(self, row: int, reader: ShardBytes | None) -> str | None:
        """Why one row fails: PIL's reason, else the error of a one-image DALI run, else None."""
        image_id = int(self.plan.image_ids[row])
        data = bytes(reader.get(image_id)) if reader is not None else os.path.join(self.index.root, self.index.paths[image_id])
        reason = _pil_reason(data)
        if reason is not None:
            return reason
        try:
            for _ in self._segment([[row]], reader):
                pass
        except _OutOfStep:
            raise
        except Exception as exc:
            return "DALI: " + str(exc).strip().splitlines()[0]
        return None

    def _named_failure(self, rows: list[int], message: str, reader: ShardBytes | None) -> dict[int, str]:
        """{row: reason} for the sample DALI's error names, when it names one of `rows`: no probing needed."""
        position = failing_sample(message)
        if position is None or position >= len(rows):
            return {}
        row = rows[position]
        image_id = int(self.plan.image_ids[row])
        data = bytes(reader.get(image_id)) if reader is not None else os.path.join(self.index.root, self.index.paths[image_id])
        return {row: _pil_reason(data) or "DALI: " + _decode_error_line(message)}

    def _stream(self, good: list[int]) -> Iterator[tuple[list[int], torch.Tensor | None, dict[int, str]]]:
        """DALI results over `good` rows, in pieces (rows, crops or None, {row: failure reason})."""
        reader = ShardBytes(self.shards) if self.shards is not None else None
        sizes = self.index.sizes
        remaining = good
        try:
            while remaining:
                groups = self._groups(remaining)
                done = 0
                try:
                    for rows, crops, shapes in self._segment(groups, reader):
                        reasons = {}
                        for i, row in enumerate(rows):
                            w, h = (int(v) for v in sizes[int(self.plan.image_ids[row])])
                            if (int(shapes[i, 0]), int(shapes[i, 1])) != (h, w):
                                reasons[row] = (
                                    f"decoded size {int(shapes[i, 1])}x{int(shapes[i, 0])} differs from indexed {w}x{h}"
                                )
                        done += 1
                        yield rows, crops, reasons
                    remaining = []
                except _OutOfStep:
                    raise
                except Exception as exc:  # one undecodable image stops a DALI pipeline: find it, go on
                    failed = groups[done]
                    bad = self._named_failure(failed, str(exc), reader)
                    bad = bad or {r: reason for r in failed if (reason := self._probe(r, reader))}
                    if not bad:  # nothing fails alone: give up on this batch rather than loop
                        bad = {r: "DALI: " + str(exc).strip().splitlines()[0] for r in failed}
                    yield sorted(bad), None, bad
                    finished = {r for g in groups[:done] for r in g} | set(bad)
                    remaining = [r for r in remaining if r not in finished]
        finally:
            if reader is not None:
                reader.close()

    def __iter__(self) -> Iterator[CropBatch]:
        missing = self._missing()
        stream = self._stream([int(r) for r in self.rows if int(r) not in missing])
        pending: dict[int, torch.Tensor | str] = {}  # DALI results not yet handed out
        try:
            for start in range(0, len(self.rows), self.batch_size):
                chunk = self.rows[start : start + self.batch_size].tolist()
                if not pending and not any(r in missing for r in chunk):
                    rows, crops, reasons = next(stream)
                    if rows == chunk and crops is not None and not reasons:  # the usual case: DALI's batch as it is
                        yield CropBatch(
                            rows=torch.tensor(chunk, dtype=torch.int64), crops=crops, ok=torch.ones(len(chunk), dtype=torch.bool)
                        )
                        continue
                    _buffer(pending, rows, crops, reasons)
                while any(r not in pending and r not in missing for r in chunk):
                    _buffer(pending, *next(stream))
                items = [missing[r] if r in missing else pending.pop(r) for r in chunk]
                yield CropBatch(
                    rows=torch.tensor(chunk, dtype=torch.int64),
                    crops=self._assemble(items),
                    ok=torch.tensor([not isinstance(x, str) for x in items], dtype=torch.bool),
                    reasons={row: item for row, item in zip(chunk, items) if isinstance(item, str)},
                )
        finally:
            stream.close()

    def _assemble(self, items: list) -> torch.Tensor:
        """[n, K, 3, p, p] uint8 from per-row crops, zeros for failed rows. On the CPU through numpy:
        a torch copy here would compete with DALI's threads for the cores (measured 100x slower)."""
        k, p = self.plan.num_crop, self.crop_size
        device = next((x.device for x in items if isinstance(x, torch.Tensor)), torch.device("cpu"))
        if device.type == "cpu":
            out = np.zeros((len(items), k, 3, p, p), dtype=np.uint8)
            for i, x in enumerate(items):
                if isinstance(x, torch.Tensor):
                    out[i] = x.numpy()
            return torch.from_numpy(out)
        crops = torch.zeros((len(items), k, 3, p, p), dtype=torch.uint8, device=device)
        for i, x in enumerate(items):
            if isinstance(x, torch.Tensor):
                crops[i] = x
        return crops


def _decode_error_line(message: str) -> str:
    """The line of a DALI pipeline error that says what failed (not its traceback of our code)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return next((line for line in lines if _SAMPLE_IN_ERROR.search(line)), lines[0] if lines else "decode failed")


def _file_bytes(path: str) -> bytes | str:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        return f"cannot read ({exc.strerror})"


def broken_jpeg_rows(rows, read: Callable, require: bool = False, workers: int = 1) -> dict[int, str]:
    """{row: reason} for rows whose bytes (`read(row)`: bytes, or a reason string) are a broken JPEG;
    other formats pass unless `require` (shards hold only JPEG). Checked in `workers` threads (file reads
    and numpy release the GIL), since every planned file is checked before DALI starts."""

    def problem(row: int) -> str | None:
        data = read(int(row))
        if isinstance(data, str):
            return data
        if require or is_jpeg(data):
            found = jpeg_problem(data)
            return None if found is None else f"corrupt JPEG structure: {found}"
        return None

    rows = [int(r) for r in rows]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return {row: reason for row, reason in zip(rows, pool.map(problem, rows, chunksize=64)) if reason is not None}


class _OutOfStep(RuntimeError):
    """The file reader's and the box feed's sample positions differ: a bug, never an image problem."""


def _buffer(pending: dict, rows: list[int], crops: torch.Tensor | None, reasons: dict[int, str]) -> None:
    for i, row in enumerate(rows):
        pending[row] = reasons[row] if row in reasons else crops[i]
