"""Loaders by name: each knows how to index its data source and how to cut a plan's boxes from it.

`open_index(name, data)` gives the DatasetIndex of a source (an ImageFolder for `torch`; other
loaders read their own formats' sidecars), and `make_loader(name, ...)` the CropLoader that executes a
CropPlan over it. Nothing outside this package branches on the loader name.
"""
from __future__ import annotations

from rded_fast.errors import UserError
from rded_fast.index import DatasetIndex, load_or_build_index
from rded_fast.loaders.base import CropBatch, CropLoader
from rded_fast.plan import CropPlan

LOADER_NAMES = ("torch", "dali", "ffcv")


def _check_name(name: str) -> None:
    if name not in LOADER_NAMES:
        raise UserError(f"--loader {name}: unknown loader; choose one of {', '.join(LOADER_NAMES)}")


def open_index(
    name: str,
    data: str,
    class_map: list[str] | None = None,
    cache: str | None = None,
    show_progress: bool = True,
) -> DatasetIndex:
    """The index of `data` as loader `name` reads it (class order, relative paths, original sizes)."""
    _check_name(name)
    if name == "dali":
        from rded_fast.loaders.shards import is_shard_dir, open_shard_index

        if is_shard_dir(data):  # converted shards carry the source tree's index (original paths and sizes)
            return open_shard_index(data, class_map)
    if name == "ffcv":  # a .beton's sidecar carries the source tree's index (original paths and sizes)
        from rded_fast.loaders.beton import open_beton_index

        return open_beton_index(data, class_map)
    return load_or_build_index(data, cache, class_map=class_map, show_progress=show_progress)


def make_loader(
    name: str,
    index: DatasetIndex,
    plan: CropPlan,
    crop_size: int,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "cpu",
) -> CropLoader:
    """Build the loader `name` over `plan`; it cuts the planned boxes into [B, K, 3, crop_size, crop_size] uint8.

    `device` is where scoring runs: a loader that can decode there (DALI: "mixed" on CUDA) does so."""
    _check_name(name)
    if name == "dali":
        from rded_fast.loaders.dali_loader import DaliCropLoader

        import torch

        target = torch.device(device)
        decode = "mixed" if target.type == "cuda" else "cpu"
        device_id = (target.index if target.index is not None else torch.cuda.current_device()) if decode == "mixed" else None
        return DaliCropLoader(index, plan, crop_size, batch_size=batch_size, workers=workers, device=decode,
                              device_id=device_id)
    if name == "ffcv":
        from rded_fast.loaders.ffcv_loader import FfcvCropLoader

        return FfcvCropLoader(index, plan, crop_size, batch_size=batch_size, workers=workers)
    from rded_fast.loaders.torch_loader import TorchCropLoader

    return TorchCropLoader(index, plan, crop_size, batch_size=batch_size, workers=workers)


__all__ = ["CropBatch", "CropLoader", "LOADER_NAMES", "make_loader", "open_index"]
