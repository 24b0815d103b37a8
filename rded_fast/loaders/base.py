"""What a loader is: the CropLoader interface it implements, the CropBatch it yields, and the LoaderSpec by which it
declares itself to rded_fast.loaders (name, formats read, options, how it is built).

Every loader (torch, tvjpeg, DALI, FFCV) executes the same CropPlan over a Source (rded_fast.formats.open) and yields
CropBatch objects; only the speed differs. Images that cannot be decoded are reported per row in their batch (`ok`
False, and the reason in `reasons`), so the run goes on without them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from rded_fast.formats import Source
    from rded_fast.plan import CropPlan


@dataclass(frozen=True)
class LoaderOption:
    """An option only one loader has (DALI's `--hw-decoder-load`): its command-line `flag`, its `dest` (the key in a
    run's loader options and the keyword its loader is built with), `type`, `default` and `help`; `check(value)`
    says why a value is refused (the words after "FLAG VALUE: "), or None."""

    flag: str
    dest: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None]


@dataclass(frozen=True)
class LoaderSpec:
    """One loader, as rded_fast.loaders lists it. `reads`: the formats it reads (rded_fast.formats), its native one
    first; `build(source, plan, crop_size, *, batch_size, workers, device, prefetch, reuse_buffers, **options)` makes
    it; `options`: its own LoaderOptions; `auto_order`: by device type ("cpu", "cuda"), its place among the loaders
    `--loader auto` may pick for a format (lower first); `library`: the module its backend needs installed (None:
    torch's own); `preload()`: imports that library and warms what it compiles, in the background, before the
    loader is first made (None: nothing worth it); `reference`: the loader every other one is measured against."""

    name: str
    reads: tuple[str, ...]
    build: Callable[..., CropLoader]
    auto_order: Mapping[str, int]
    options: tuple[LoaderOption, ...] = ()
    library: str | None = None
    preload: Callable[[], None] | None = None
    reference: bool = False


@dataclass
class CropBatch:
    """One batch of planned rows and their crops.

    rows: [B] int64 plan rows; crops: [B, K, 3, p, p] uint8 (on the loader's device);
    ok: [B] bool, False where the image could not be decoded (its crops are zeros);
    reasons: plan row -> why it could not be decoded, for every row whose `ok` is False.
    """

    rows: torch.Tensor
    crops: torch.Tensor
    ok: torch.Tensor
    reasons: dict[int, str] = field(default_factory=dict)


class CropLoader:
    """Iterates over a plan's rows in order, in batches of CropBatch. Every hook a loader may provide is
    declared here with its default (as FFCV's `Operation` declares its own); a loader overrides what it has.

    Every loader is made with the arguments declared here, in this order: the `source` and `plan` (which images,
    where their bytes are, which boxes; `index` is the source's), `crop_size` (the side crops are resized to),
    `batch_size` (plan rows per batch) and `workers` (its decoding threads or processes); its own options follow as
    keywords."""

    def __init__(self, source: Source, plan: CropPlan, crop_size: int, batch_size: int = 64, workers: int = 4):
        self.source, self.index, self.plan, self.crop_size = source, source.index, plan, int(crop_size)
        self.batch_size, self.workers = int(batch_size), int(workers)

    def __iter__(self) -> Iterator[CropBatch]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def timings(self) -> dict[str, float]:
        """Seconds of the loader's own side work in its last pass, by name (the DALI loader's JPEG check: its wall
        time and the part the loader waited for), for the run's `seconds`; none by default."""
        return {}

    def source_extra(self, image_id: int) -> dict:
        """Extra facts about a source image that the manifest records beside each of its cells (the ffcv loader
        gives the size its .beton stores the image at); none by default."""
        return {}


def left_out_rows(rows: np.ndarray, image_ids: np.ndarray, stored: np.ndarray, why: dict[int, str]) -> dict[int, str]:
    """Plan row -> reason for the `rows` whose image a converter left out (`stored[k]` False for row
    rows[k] of image image_ids[k]; `why`: image id -> the converter's reason)."""
    return {
        int(r): "left out at convert time: " + why.get(int(i), "unknown reason")
        for r, i, kept in zip(rows, image_ids, stored)
        if not kept
    }


class BufferRing:
    """`slots` output buffers, made once (pinned when `pin`) and handed out in turn; FFCV's epoch iterator
    is the model. A buffer is handed out again `slots` batches later; on CUDA it first waits for the device
    work that was queued before the next batch was taken (the consumer's asynchronous copies from it)."""

    def __init__(self, slots: int, pin: bool):
        self.slots, self.pin = max(2, int(slots)), pin
        self._buffers: list[torch.Tensor | None] = [None] * self.slots
        self._events: list = [None] * self.slots
        self._turn = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """The next buffer, viewed as `shape` (its first dimension may be smaller than the first request's)."""
        i = self._turn % self.slots
        if self.pin and self._turn > 0:  # the consumer has queued its copies from the previous buffer by now
            event = torch.cuda.Event()
            event.record()
            self._events[(i - 1) % self.slots] = event
        if self._events[i] is not None:
            self._events[i].synchronize()
            self._events[i] = None
        buf = self._buffers[i]
        if buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = torch.empty(shape, dtype=dtype, pin_memory=self.pin)
            self._buffers[i] = buf
        self._turn += 1
        return buf[: shape[0]]
