"""The compiled half of the FFCV loader (rded_fast/loaders/ffcv_loader.py): `PlannedCrops`, an ffcv decoder
Operation, and `cut_batch`, the numba code it calls per batch. Importing this module imports ffcv and numba (3.5-5 s,
most of it numba compiling ffcv), so the loader imports it only when it is made, and the loader's preload hook
(`warm_up`) in the background before that.

The box table and the sample->row table are handed to the compiled code by address, because numba freezes captured
arrays into the machine code (slow to compile, and a new plan would mean a new compile of everything); `cut_batch` is
compiled once per process, only a small per-loader wrapper per Loader.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rded_fast.formats.beton import keep_torch_threads
from rded_fast.loaders.resample import cut_boxes

with keep_torch_threads():
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State

JPG_MODE = int(IMAGE_MODES["jpg"])
_imdecode = njit(nogil=True)(imdecode)


@intrinsic
def _pointer(typingctx, address):
    """An integer address as a void pointer (for numba.carray over memory numba did not allocate)."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@njit(nogil=True, parallel=True)
def cut_batch(addresses, nbytes, modes, heights, widths, boxes, out, ok) -> None:
    """Decode image i (bytes at addresses[i], nbytes[i] long; mode JPEG or raw; heights[i] x widths[i])
    once and cut its boxes[i] [K, 4] (top, left, height, width, stored pixels) into out[i] [K, 3, p, p];
    ok[i] = 1 on success, 0 (and zero crops) when the bytes do not decode."""
    for i in prange(len(addresses)):
        h, w = heights[i], widths[i]
        data = numba.carray(_pointer(addresses[i]), (nbytes[i],), np.uint8)
        good = True
        if modes[i] == JPG_MODE:
            pixels = np.empty((h, w, 3), np.uint8)
            good = _imdecode(data, pixels, h, w, h, w, 0, 0, 1, 1, False, False) == 0
        elif nbytes[i] >= h * w * 3:
            pixels = data[: h * w * 3].reshape((h, w, 3))
        else:
            good = False
            pixels = np.empty((1, 1, 3), np.uint8)
        if good:
            cut_boxes(pixels, boxes[i], out[i])
            ok[i] = 1
        else:
            out[i] = 0
            ok[i] = 0


def warm_up() -> None:
    """Compile `cut_batch` for the types `PlannedCrops` calls it with (seconds of numba, once
    per process), so that `rded_fast.loaders.preload` does it in the background with ffcv's import instead of
    the first batch of the observer check waiting for it. Compiled, not run: numba's default thread pool must
    not be entered from two threads at once, and ffcv's loader thread may already be running."""
    one_d = types.Array(types.int64, 1, "C")
    signature = (one_d,) * 5 + (
        types.Array(types.float64, 3, "C"),  # boxes
        types.Array(types.uint8, 5, "C"),  # crops[:n]
        types.Array(types.uint8, 1, "A"),  # ok[:n, 0], a column
    )
    cut_batch.compile(signature)


class PlannedCrops(Operation):
    """ffcv decoder for an RGBImageField: sample s -> its planned crops [K, 3, p, p] uint8 and an ok flag.

    Parameters
    ----------
    boxes : [M, K, 4] float64, (top, left, height, width) in stored pixels, one row per plan row.
    rows : [num_samples] int64, the row of `boxes` for each .beton sample (-1: not planned).
    crop_size : p.
    """

    def __init__(self, boxes: np.ndarray, rows: np.ndarray, crop_size: int):
        super().__init__()
        self.boxes = np.ascontiguousarray(boxes, dtype=np.float64)
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.crop_size = int(crop_size)

    def declare_state_and_memory(self, previous_state: State):
        shape = (self.boxes.shape[1], 3, self.crop_size, self.crop_size)
        u8 = np.dtype("u1")
        return (
            replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
            (AllocationQuery(shape, u8), AllocationQuery((1,), u8)),
        )

    def generate_code(self):
        mem_read = self.memory_read
        boxes_at, rows_at = self.boxes.ctypes.data, self.rows.ctypes.data  # kept alive by self
        table_shape, num_samples = self.boxes.shape, len(self.rows)

        def planned_crops(batch_indices, storage, metadata, storage_state):
            crops, ok = storage
            n = len(batch_indices)
            table = numba.carray(_pointer(boxes_at), table_shape, np.float64)
            row_of = numba.carray(_pointer(rows_at), (num_samples,), np.int64)
            addresses = np.empty(n, np.int64)
            nbytes = np.empty(n, np.int64)
            modes = np.empty(n, np.int64)  # not uint8: ffcv's OS-cache reader marks numba's 1-d uint8 type read-only
            heights = np.empty(n, np.int64)
            widths = np.empty(n, np.int64)
            boxes = np.empty((n, table_shape[1], 4), np.float64)
            for i in range(n):
                field = metadata[batch_indices[i]]
                data = mem_read(field["data_ptr"], storage_state)
                addresses[i] = data.ctypes.data
                nbytes[i] = data.size
                modes[i] = field["mode"]
                heights[i] = field["height"]
                widths[i] = field["width"]
                row = row_of[batch_indices[i]]
                for k in range(table_shape[1]):  # element by element: a row assignment makes numba compile its
                    for c in range(4):  # broadcasting's error strings, seconds of every process's first batch
                        boxes[i, k, c] = table[row, k, c]
            cut_batch(addresses, nbytes, modes, heights, widths, boxes, crops[:n], ok[:n, 0])
            return crops[:n], ok[:n, 0]

        return planned_crops
