"""A small dataset held in memory as tensors: decode an ImageFolder once, for observer and student training.

Observer training and evaluation on CIFAR/Fashion-MNIST-sized data are bound by decoding if done per
epoch; holding [N, 3, S, S] uint8 in memory (32 px: 3 KB an image) removes that.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from rded_fast.errors import UserError
from rded_fast.index import DatasetIndex
from rded_fast.loaders.torch_loader import decode_rgb
from rded_fast.progress import progress

MAX_BYTES = 8 * 1024**3
# What decoding a bad file raises (PIL: OSError for truncated/unidentified files, SyntaxError for some broken
# chunks, DecompressionBombError for absurd sizes; ValueError for odd modes); anything else is a bug and propagates.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
log = logging.getLogger(__name__)


def resize_center(image: torch.Tensor, size: int, resize_to: int | None = None) -> torch.Tensor:
    """Resize the shorter side to `resize_to` (default `size`), then centre-crop size x size; uint8 in and out."""
    target = resize_to or size
    if min(image.shape[-2:]) != target:
        image = TF.resize(image, [target], antialias=True)
    return TF.center_crop(image, [size, size])


def load_tensor_dataset(
    index: DatasetIndex,
    size: int,
    resize_to: int | None = None,
    workers: int = 8,
    show_progress: bool = True,
    desc: str = "decode",
) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of `index` as ([N, 3, size, size] uint8, [N] int64); undecodable files are dropped, counted
    and logged with the first one's reason."""
    need = len(index) * 3 * size * size
    if need > MAX_BYTES:
        raise UserError(
            f"{index.root}: {len(index)} images at {size}px need {need / 1024**3:.1f} GiB in memory; "
            "this in-memory path is for small datasets (CIFAR/Fashion-MNIST/Tiny sized)"
        )

    def one(i: int) -> torch.Tensor | str:
        try:
            return resize_center(decode_rgb(os.path.join(index.root, index.paths[i])), size, resize_to)
        except DECODE_ERRORS as exc:
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(progress(pool.map(one, range(len(index))), total=len(index), desc=desc, disable=not show_progress))
    keep = [i for i, im in enumerate(images) if not isinstance(im, str)]
    dropped = [i for i, im in enumerate(images) if isinstance(im, str)]
    if dropped:
        log.warning(
            "%s: %d image(s) could not be decoded and were left out, e.g. %s: %s",
            index.root,
            len(dropped),
            index.paths[dropped[0]],
            images[dropped[0]],
        )
    if not keep:
        raise UserError(f"{index.root}: no image could be decoded")
    return torch.stack([images[i] for i in keep]), torch.from_numpy(np.asarray(index.labels)[keep])
