"""Which torch device a command runs on: `auto` (CUDA when present, else CPU), `cpu`, or `cuda[:N]`."""
from __future__ import annotations

import platform

import torch

from rded_fast.errors import UserError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device for `--device name`; under torchrun (`local_rank` given) plain `cuda` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda[:N]")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """A name for result files: the GPU's model, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
