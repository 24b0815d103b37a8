"""Torchvision weights by name (e.g. IMAGENET1K_V1) from the local torch hub cache, without a network.

The file torchvision would download lives at `$TORCH_HOME/hub/checkpoints/<file name of its URL>`
(`torch.hub.get_dir()`); it is read from there when present. Only when it is absent is a download
tried, and when that fails the error names the exact file and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision

from rded_fast.errors import UserError
from rded_fast.models.checkpoint import load_checkpoint


def weights_enum(name: str, weights: str):
    """torchvision's weights object `weights` of model `name` (UserError when there is none)."""
    try:
        enum = torchvision.models.get_model_weights(name)
        return enum[weights] if weights in enum.__members__ else enum.verify(weights)
    except Exception as exc:
        raise UserError(f"--weights {weights}: not a weights name of {name} (e.g. IMAGENET1K_V1) nor a file") from exc


def cache_path(url: str) -> str:
    """Where torch.hub keeps the file of `url`: $TORCH_HOME/hub/checkpoints/<basename>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether `url`'s host answers on its port within `timeout` seconds: one short probe, so that a machine without
    network fails at once instead of after a library's retries. True behind a proxy (the proxy decides)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return True
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _unusable_cache(folder: str) -> str | None:
    """Why the cache `folder` cannot exist (an existing file in its path), or None."""
    for parent in [folder, *map(str, Path(folder).parents)]:
        if os.path.exists(parent):
            return None if os.path.isdir(parent) else f"{parent} is a file"
    return None


def torchvision_state_dict(name: str, weights: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, input convention {mean, std}) of torchvision weights `weights` of model `name`."""
    w = weights_enum(name, weights)
    path = cache_path(w.url)
    problem = _unusable_cache(os.path.dirname(path))
    if problem:
        home = os.environ.get("TORCH_HOME")
        what = f"TORCH_HOME {home} is a file" if home and os.path.isfile(home) else problem
        raise UserError(
            f"--weights {weights}: the torch hub cache cannot be used: {what}; set TORCH_HOME to a folder (weights are "
            "read from TORCH_HOME/hub/checkpoints), or pass the checkpoint's path as --weights"
        )
    if not os.path.isfile(path):
        try:
            if not reachable(w.url):
                raise ConnectionError(f"{w.url.split('/')[2]} is unreachable")
            torch.hub.load_state_dict_from_url(w.url, progress=False)
        except Exception as exc:
            raise UserError(
                f"--weights {weights}: {os.path.basename(path)} is not in the torch hub cache and could not be "
                f"downloaded ({type(exc).__name__}); fetch {w.url} elsewhere and put it at {path} "
                "(set TORCH_HOME to choose the cache), or pass the file's path as --weights"
            ) from exc
    state = load_checkpoint(path)
    convention = {}
    try:
        preset = w.transforms()
        convention = {"mean": list(preset.mean), "std": list(preset.std)}
    except Exception:  # weights without an image-classification preset keep the default
        pass
    return state, convention
