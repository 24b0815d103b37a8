"""The FFCV loader: ffcv's Loader reads the planned samples of a .beton; our Operation cuts the plan's boxes.

`ffcv.loader.Loader(indices=<planned samples in plan order>, order=SEQUENTIAL, os_cache=True)` hands each
batch of sample numbers to `PlannedCrops`, an ffcv decoder Operation of ours. Per batch its compiled
code (numba, built by ffcv's `Compiler` like any ffcv decoder) reads each sample's bytes through ffcv's
memory manager and calls `cut_batch`, which in parallel over images decodes each image once (ffcv's
turbojpeg `imdecode` for JPEG samples, the bytes as they are for raw ones) and cuts all K planned boxes,
each resized to p x p by the torchvision-equivalent antialiased bilinear filter of `resample.py`,
straight into the [K, 3, p, p] uint8 buffer it declared through ffcv's allocation protocol.

The plan's boxes are in original pixels; ffcv may have stored a smaller image (`--max-resolution`), so
each box is scaled by stored/original size per axis (fractional boxes are resampled exactly, not
rounded). Samples left out at convert time, or that fail to decode, come back as failed rows. The compiled
half (`PlannedCrops`, `cut_batch`) is rded_fast/loaders/ffcv_crops.py: this module imports neither ffcv nor
numba until a loader is made (or preloaded: `warm_up`, the spec's hook).

Sequential order is required (rows must come back in plan order); QUASI_RANDOM only pays off for
random orders without an OS cache, and the process cache would load the whole file for a plan that
reads a subset. ffcv resets torch's thread count; every ffcv call here restores it.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from rded_fast.errors import UserError
from rded_fast.formats import BETON, Source
from rded_fast.formats.beton import IMAGE_FIELD, LABEL_FIELD, keep_torch_threads
from rded_fast.loaders.base import BufferRing, CropBatch, CropLoader, LoaderSpec, left_out_rows


def stored_boxes(boxes: np.ndarray, original: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Plan boxes [M, K, 4] (top, left, height, width; original pixels) in stored pixels, float64.

    `original`/`stored` are [M, 2] (width, height). Equal sizes give the boxes unchanged."""
    sy = (stored[:, 1] / original[:, 1])[:, None]
    sx = (stored[:, 0] / original[:, 0])[:, None]
    top, left = boxes[..., 0] * sy, boxes[..., 1] * sx
    bottom, right = (boxes[..., 0] + boxes[..., 2]) * sy, (boxes[..., 1] + boxes[..., 3]) * sx
    return np.stack([top, left, bottom - top, right - left], axis=-1).astype(np.float64)


@contextmanager
def damaged_beton(beton: str) -> Iterator[None]:
    """ffcv's reader asserts and indexes its way through a file's header; when the header passed our checks and it
    still fails there, the file is damaged in a way they did not see: one line, not ffcv's traceback."""
    try:
        yield
    except (AssertionError, ValueError, IndexError, KeyError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"--data {beton}: damaged (ffcv cannot read it: {first}); convert the data again") from exc


def _next_result(epoch):
    """The next result of an ffcv EpochIterator, or None at the end. ffcv's own `next` waits forever when
    its thread dies (e.g. on an error); this polls its queue and raises instead."""
    while True:
        try:
            item = epoch.output_queue.get(timeout=1.0)
        except queue.Empty:
            if not epoch.is_alive():
                raise RuntimeError("ffcv's loader thread stopped without finishing; its error is printed above") from None
            continue
        return None if item is None else item[1]


class FfcvCropLoader(CropLoader):
    """Executes `plan` over the .beton `source` with ffcv; yields CropBatch of `batch_size` plan rows
    in plan order. `workers` is ffcv's (numba's) thread count, capped at the cores numba may use;
    `batches_ahead` ffcv's prefetch depth. With `reuse_buffers` the batches handed out live in
    `batches_ahead + 2` buffers made once and rotated (pinned when CUDA is present), as ffcv's own iterator
    does; otherwise each batch is a new tensor the consumer may keep.

    `boxes` [M, K, 4] float64 are the boxes actually cut, in stored pixels (the plan's boxes when the
    .beton stores full resolution)."""

    def __init__(self, *args, batches_ahead: int = 3, reuse_buffers: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        index, plan = self.index, self.plan
        self.dataset = self.source.table
        self.batches_ahead, self.reuse_buffers = int(batches_ahead), reuse_buffers
        ids = plan.image_ids
        position = self.dataset.position[ids]
        self.missing = left_out_rows(np.arange(len(ids)), ids, position >= 0, self.dataset.missing)
        original, stored = index.sizes[ids], self.dataset.stored_sizes[ids]
        self.boxes = stored_boxes(plan.boxes, original, np.where(position[:, None] >= 0, stored, original))
        self._samples = position[position >= 0].astype(np.uint64)
        rows = np.full(self.dataset.num_samples, -1, np.int64)
        rows[position[position >= 0]] = np.flatnonzero(position >= 0)
        self._loader = self._ffcv_loader(rows) if len(self._samples) else None

    def _ffcv_loader(self, rows: np.ndarray):
        """ffcv's Loader over the planned samples, decoding with `PlannedCrops` (`rows`: each sample's plan row)."""
        with keep_torch_threads():
            import numba
            from ffcv.loader import Loader, OrderOption
            from ffcv.pipeline.pipeline_spec import PipelineSpec

            from rded_fast.loaders.ffcv_crops import PlannedCrops

        threads = max(1, min(self.workers, numba.config.NUMBA_NUM_THREADS))
        decoder = PlannedCrops(self.boxes, rows, self.crop_size)
        with keep_torch_threads(), damaged_beton(self.dataset.beton):
            return Loader(
                self.dataset.beton,
                batch_size=self.batch_size,
                num_workers=threads,
                os_cache=True,
                order=OrderOption.SEQUENTIAL,
                indices=self._samples,
                pipelines={IMAGE_FIELD: PipelineSpec(IMAGE_FIELD, decoder=decoder), LABEL_FIELD: None},
                drop_last=False,
                batches_ahead=self.batches_ahead,
            )

    def __len__(self) -> int:
        return math.ceil(len(self.plan) / self.batch_size)

    def source_extra(self, image_id: int) -> dict:
        """Per-source facts for the manifest beside the original size: the size the .beton stores."""
        return {"stored_size": self.dataset.stored_sizes[image_id].tolist()}

    def _stream(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """ffcv's batches over the planned samples: (crops [n, K, 3, p, p] uint8, ok [n] uint8), views of
        ffcv's buffers, valid until the next one is asked for."""
        if self._loader is None:
            return
        with keep_torch_threads():
            epoch = iter(self._loader)
        threads = torch.get_num_threads()
        try:
            while (result := _next_result(epoch)) is not None:
                if torch.get_num_threads() != threads:  # ffcv's thread resets it when it starts
                    torch.set_num_threads(threads)
                crops, ok = result[0]
                yield crops, ok
        finally:
            epoch.close()

    def __iter__(self) -> Iterator[CropBatch]:
        k, p = self.plan.num_crop, self.crop_size
        stream = self._stream()
        crops, ok, used = None, None, 0
        pin = torch.cuda.is_available()
        ring = BufferRing(self.batches_ahead + 2, pin) if self.reuse_buffers else None
        try:
            for start in range(0, len(self.plan), self.batch_size):
                chunk = np.arange(start, min(start + self.batch_size, len(self.plan)))
                shape = (len(chunk), k, 3, p, p)
                out = ring.take(shape) if ring else torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
                out_np = out.numpy()
                good = np.zeros(len(chunk), bool)
                wanted = [i for i, r in enumerate(chunk.tolist()) if r not in self.missing]
                taken = 0
                while taken < len(wanted):
                    if crops is None or used == len(crops):
                        crops, ok = next(stream)
                        used = 0
                    n = min(len(wanted) - taken, len(crops) - used)
                    dest = wanted[taken : taken + n]
                    out_np[dest] = crops[used : used + n]
                    good[dest] = ok[used : used + n] != 0
                    used += n
                    taken += n
                reasons = {}
                for i, row in enumerate(chunk.tolist()):
                    if not good[i]:
                        out_np[i] = 0
                        reasons[row] = self.missing.get(
                            row, "ffcv could not decode its stored bytes (corrupt .beton?); convert the data again"
                        )
                yield CropBatch(
                    rows=torch.from_numpy(chunk.astype(np.int64)), crops=out, ok=torch.from_numpy(good), reasons=reasons
                )
        finally:
            stream.close()


def warm_up() -> None:
    """The spec's preload hook: import ffcv and numba with the compiled half of this loader, and compile its batch
    kernel (rded_fast.loaders.ffcv_crops.warm_up)."""
    from rded_fast.loaders.ffcv_crops import warm_up as compile_kernel

    compile_kernel()


def build(source: Source, plan, crop_size: int, *, batch_size, workers, device, prefetch, reuse_buffers) -> CropLoader:
    """The ffcv loader as rded_fast.loaders.make_loader builds it (it decodes on the host whatever the device)."""
    return FfcvCropLoader(
        source, plan, crop_size, batch_size=batch_size, workers=workers, batches_ahead=prefetch, reuse_buffers=reuse_buffers
    )


SPEC = LoaderSpec("ffcv", reads=(BETON,), build=build, auto_order={"cpu": 0, "cuda": 2}, library="ffcv", preload=warm_up)
