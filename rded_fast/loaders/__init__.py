"""Loaders by name: each knows how to index its data source and how to cut a plan's boxes from it.

`open_index(name, data)` gives the DatasetIndex of a source as loader `name` reads it (the formats
themselves live in rded_fast.formats; this says which loader reads which), and `make_loader(name, ...)` the
CropLoader that executes a CropPlan over it. `resolve_loader("auto", data, device)` picks the fast one. Nothing outside this package
branches on the loader name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading

import torch

from rded_fast.errors import UserError
from rded_fast.formats import BETON, FOLDER, SHARDS, detect, open_index as open_format_index
from rded_fast.index import DatasetIndex
from rded_fast.loaders.base import CropBatch, CropLoader
from rded_fast.plan import CropPlan

LOADER_NAMES = ("torch", "dali", "ffcv", "tvjpeg")
LOADER_CHOICES = ("auto", *LOADER_NAMES)
# The formats each loader reads (rded_fast.formats), its native one first.
READS = {"torch": (FOLDER,), "dali": (FOLDER, SHARDS), "tvjpeg": (FOLDER, SHARDS), "ffcv": (BETON,)}


def default_prefetch(device: str) -> int:
    """Batches each loader keeps in flight: deeper beside a GPU (it consumes fast), shallow on a CPU (the
    cores are shared with scoring, and every batch ahead is memory)."""
    return 4 if str(device).startswith("cuda") else 2


LOADER_MODULES = {
    "torch": "rded_fast.loaders.torch_loader",
    "dali": "rded_fast.loaders.dali_loader",
    "ffcv": "rded_fast.loaders.ffcv_loader",
    "tvjpeg": "rded_fast.loaders.tvjpeg_loader",
}


def preload(name: str) -> None:
    """Start importing loader `name`'s module, and with it its library (DALI: 1-3 s, most of the observer check's
    set-up at 100 classes; ffcv: 3.5-5 s, most of it numba compiling at import), then its `warm_up()` if it has
    one (ffcv: our crop kernel's compile), in a background thread: the work overlaps the index, the plan and the
    observer's compile instead of delaying the observer check, the loader's first user. A failing import is
    left to the place the loader is made, which imports the module again and says what is wrong.

    The thread is a daemon: nobody waits for it (the loader's maker imports the module itself), and an exit must
    not wait for it either: a signal that interrupts the main thread inside an import can leave the import lock
    held for ever (CPython does not release it), and this thread would then never end."""
    module = LOADER_MODULES.get(name)
    if module is not None and module not in sys.modules:
        threading.Thread(target=_import_quietly, args=(module,), name=f"preload-{name}", daemon=True).start()


def _import_quietly(module: str) -> None:
    try:
        warm_up = getattr(importlib.import_module(module), "warm_up", None)
        if warm_up is not None:
            warm_up()
    except BaseException:  # noqa: BLE001 - reported where the loader is made (a warm-up's failure: where it is used)
        pass


def resolve_loader(name: str, data: str, device: torch.device | str) -> str:
    """`auto`: ffcv for a .beton; on CUDA, DALI with GPU decoding when it is installed, else tvjpeg
    (torchvision's nvJPEG decoding, which every install has); on a CPU torch (PIL), or for a shard folder,
    which PIL's loader cannot read, DALI (else tvjpeg). On a CPU DALI's decoding was measured slower than PIL
    (benchmarks/README.md decode table: 545-621 against 723 img/s on 2 cores), and tvjpeg's dense-matrix crops
    far slower, so neither is the CPU choice for a tree."""
    if name != "auto":
        return name
    kind = detect(data)
    if kind == BETON:
        return "ffcv"
    if torch.device(device).type == "cuda" or kind == SHARDS:
        return "dali" if importlib.util.find_spec("nvidia.dali") is not None else "tvjpeg"
    return "torch"


def _check_name(name: str) -> None:
    if name not in LOADER_NAMES:  # "auto" is resolved before a loader is made (resolve_loader)
        raise UserError(f"--loader {name}: unknown loader; choose one of {', '.join(LOADER_NAMES)}")


def open_index(
    name: str, data: str, class_map: list[str] | None = None, cache: str | None = None, show_progress: bool = True
) -> DatasetIndex:
    """The index of `data` as loader `name` reads it (class order, relative paths, original sizes); a format the
    loader cannot read is refused, naming the loaders that can."""
    _check_name(name)
    kind = detect(data)
    if kind not in READS[name]:
        if name == "ffcv":  # anything but a .beton: the .beton reader says what is missing
            kind = BETON
        else:
            readers = ", ".join(n for n, kinds in READS.items() if kind in kinds)
            raise UserError(
                f"--data {data}: a {kind} source, which --loader {name} cannot read; use --loader {readers} (or auto)"
            )
    return open_format_index(data, class_map, cache, show_progress, kind=kind)


def make_loader(
    name: str,
    index: DatasetIndex,
    plan: CropPlan,
    crop_size: int,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "cpu",
    prefetch: int | None = None,
    reuse_buffers: bool = False,
    hw_decoder_load: float | None = None,
) -> CropLoader:
    """Build the loader `name` over `plan`; it cuts the planned boxes into [B, K, 3, crop_size, crop_size] uint8.

    `device` is where scoring runs: a loader that can decode there (DALI: "mixed" on CUDA; tvjpeg: always)
    does so.
    `prefetch`: batches kept in flight (None: `default_prefetch(device)`). With `reuse_buffers` the torch
    and ffcv loaders hand out batches in output buffers made once and rotated (pinned when CUDA is
    present): a batch stays valid until `prefetch + 1` more batches have been taken, so a consumer copies
    what it keeps (device copies queued before taking the next batch are safe). `hw_decoder_load`: DALI's
    share of each GPU batch for the hardware JPEG decoder (0 or 1 pin every image to one decoder)."""
    _check_name(name)
    prefetch = default_prefetch(device) if prefetch is None else int(prefetch)
    if name == "dali":
        import torch

        from rded_fast.loaders.dali_loader import DaliCropLoader

        target = torch.device(device)
        decode = "mixed" if target.type == "cuda" else "cpu"
        device_id = (target.index if target.index is not None else torch.cuda.current_device()) if decode == "mixed" else None
        return DaliCropLoader(
            index,
            plan,
            crop_size,
            batch_size=batch_size,
            workers=workers,
            device=decode,
            device_id=device_id,
            prefetch=prefetch,
            hw_decoder_load=hw_decoder_load,
        )
    if name == "tvjpeg":
        from rded_fast.loaders.tvjpeg_loader import TvJpegCropLoader

        return TvJpegCropLoader(index, plan, crop_size, batch_size=batch_size, workers=workers, device=device, prefetch=prefetch)
    if name == "ffcv":
        from rded_fast.loaders.ffcv_loader import FfcvCropLoader

        return FfcvCropLoader(
            index, plan, crop_size, batch_size=batch_size, workers=workers, batches_ahead=prefetch, reuse_buffers=reuse_buffers
        )
    from rded_fast.loaders.torch_loader import TorchCropLoader

    return TorchCropLoader(
        index, plan, crop_size, batch_size=batch_size, workers=workers, prefetch=prefetch, reuse_buffers=reuse_buffers
    )


__all__ = [
    "CropBatch",
    "CropLoader",
    "LOADER_CHOICES",
    "LOADER_NAMES",
    "default_prefetch",
    "make_loader",
    "preload",
    "open_index",
    "resolve_loader",
]
