"""Checkpoint files -> clean state dicts, and a hash of a state dict for the manifest.

Layouts read: a bare state dict; one nested under `model`, `state_dict`, `model_state_dict` (torchvision
references, RDED, timm's train.py) or `state_dict_ema`/`model_ema` when that is all there is; keys
prefixed by `module.` (DataParallel/DDP) and/or `_orig_mod.` (torch.compile); `.safetensors` files.
"""

from __future__ import annotations

import hashlib
import os

import torch

from rded_fast.errors import UserError

NESTED_KEYS = ("model", "state_dict", "model_state_dict", "state_dict_ema", "model_ema")
PREFIXES = ("module.", "_orig_mod.")
ZIP_MAGIC, PICKLE_PROTO = b"PK\x03\x04", b"\x80"  # how torch.save's files start (zip archive; legacy: a pickle)


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`module.`, `_orig_mod.`, in any order and nesting) from every key."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def _read(path: str) -> object:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise UserError(
                f"--weights {path}: reading .safetensors needs the safetensors package "
                "(pip install safetensors, or rded-fast[timm])"
            ) from exc
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | os.PathLike, expect_arch: str | None = None) -> dict[str, torch.Tensor]:
    """A clean state dict from a checkpoint file in any of the layouts in the module docstring. A checkpoint
    that records its architecture (an `arch` entry, as train-observer writes) must be of `expect_arch`."""
    path = str(path)
    if not path.endswith(".safetensors"):
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(ZIP_MAGIC) or head[:1] == PICKLE_PROTO):
            raise UserError(
                f"--weights {path}: not a checkpoint (torch.save writes a zip archive or a pickle; this file is "
                "neither); give the .pth/.pt file that torch.save or `rded-fast train-observer` wrote"
            )
    try:
        obj = _read(path)
    except UserError:
        raise
    except Exception as exc:  # torch's own text (e.g. its weights_only advice) is not for this user
        text = str(exc)
        why = (
            "it holds Python objects besides tensors; save {'model': model.state_dict()} instead"
            if "Unsupported global" in text
            else "damaged: torch cannot unpickle it"
            if "Weights only" in text or "weights_only" in text
            else "damaged: its zip archive cannot be read"
            if "PytorchStreamReader" in text
            else f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        )
        raise UserError(f"--weights {path}: cannot load checkpoint ({why})") from exc
    if (
        isinstance(obj, dict)
        and expect_arch
        and isinstance(obj.get("arch"), str)
        and obj["arch"] not in (expect_arch, expect_arch.split(":")[-1])
    ):  # timm's train.py saves "resnet18"
        raise UserError(
            f"--weights {path}: a checkpoint of {obj['arch']}, not of {expect_arch}; pass "
            f"--observer/--teacher {obj['arch']} or a {expect_arch} checkpoint"
        )
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"--weights {path}: not a state dict; expected a bare state dict or one under 'model'/'state_dict' "
            "(prefixes 'module.' and '_orig_mod.' are removed)"
        )
    return clean_state_dict(obj)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names and values, independent of how it was stored."""
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
