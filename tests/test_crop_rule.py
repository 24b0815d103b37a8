"""Every crop kernel against the one crop rule (rded_fast.crop_rule): the same pixels and boxes, each kernel's bytes
within its stated tolerance of torchvision's `resized_crop`. CPU kernels always; the CUDA ones under `-m gpu`."""

from __future__ import annotations

import importlib
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from rded_fast.crop_rule import KERNELS, CropKernel
from rded_fast.plan import sample_resized_crop_boxes

CUDA = torch.cuda.is_available()


BY_NAME = {k.name: k for k in KERNELS}


def _function(name: str):
    """The kernel `name`'s function, imported from where rded_fast.crop_rule says it is."""
    module, attr = BY_NAME[name].function.split(":")
    return getattr(importlib.import_module(module), attr)


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def _rule(images, boxes, size) -> torch.Tensor:
    """The rule as stated: torchvision's antialiased bilinear resized_crop, box by box."""
    return torch.stack(
        [
            torch.stack([TF.resized_crop(_chw(im), t, left, h, w, [size, size], antialias=True) for t, left, h, w in b.tolist()])
            for im, b in zip(images, boxes)
        ]
    )


def _torchvision(images, boxes, size, device):
    return torch.stack([_function("torchvision")(_chw(im), b, size) for im, b in zip(images, boxes)])


def _numba(images, boxes, size, device):
    out = np.zeros((*boxes.shape[:2], 3, size, size), np.uint8)
    for image, box, crops in zip(images, boxes, out):
        _function("numba")(np.ascontiguousarray(image), box.astype(np.float64), crops)
    return torch.from_numpy(out)


def _box_resize(images, boxes, size, device):
    return _function("box-resize")([_chw(im).to(device) for im in images], boxes, size).cpu()


def _dali(images, boxes, size, device):
    """DALI's graph as the DALI loader builds it, fed lossless PNG bytes so that its decoded pixels are the image's."""
    from rded_fast.loaders.dali_loader import decoder_options, has_dynamic_executor

    encoded = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        encoded.append(np.frombuffer(buf.getvalue(), np.uint8))
    positions = np.arange(len(images), dtype=np.int32)[:, None]
    feed = lambda info: (encoded, positions, np.ascontiguousarray(boxes, dtype=np.int32))
    decode = "mixed" if device == "cuda" else "cpu"
    executor = {"exec_dynamic": True} if has_dynamic_executor() else {}
    pipe = _function("dali")(
        feed,
        None,
        None,
        boxes.shape[1],
        size,
        decode,
        decoder_options(decode, None, (0, 0)),
        batch_size=len(images),
        num_threads=1,
        device_id=0 if device == "cuda" else None,
        **executor,
    )
    pipe.build()
    crops = pipe.run()[0]
    crops = crops.as_cpu() if device == "cuda" else crops
    return torch.from_numpy(np.array(crops.as_tensor()))


ADAPTERS = {"torchvision": _torchvision, "numba": _numba, "box-resize": _box_resize, "dali": _dali}


def _resized_crop_cases() -> list[tuple[int, list[np.ndarray], np.ndarray]]:
    """Crop sizes 7, 24 and 64 px, each of 4 RandomResizedCrop boxes (rded_fast.plan's) of 6 smooth noisy images of
    20..159 px a side: downscales up to 20x and upscales."""
    rng = np.random.default_rng(0)
    cases = []
    for p in (7, 24, 64):
        images, boxes = [], []
        for _ in range(6):
            h, w = (int(v) for v in rng.integers(20, 160, 2))
            noise = rng.normal(128, 60, (h, w, 3)).cumsum(1) / np.arange(1, w + 1)[None, :, None]
            images.append(np.clip(noise + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))
            boxes.append(sample_resized_crop_boxes(np.array([[w, h]]), 4, rng)[0])
        cases.append((p, images, np.stack(boxes)))
    return cases


def random_box_case(rng, shapes, k):
    """Images of `shapes` (sine waves and noise) with `k` boxes each of any size and place, the first image's first
    box the whole image: ([H, W, 3] uint8 images, boxes [n, k, 4] int)."""
    images, boxes = [], []
    for h, w in shapes:
        yy, xx = np.mgrid[0:h, 0:w]
        img = 128 + 60 * np.sin(xx[..., None] / 5 + yy[..., None] / 7 + rng.random(3) * 6) + rng.normal(0, 30, (h, w, 3))
        images.append(img.clip(0, 255).astype(np.uint8))
        bh = rng.integers(1, h + 1, k)
        bw = rng.integers(1, w + 1, k)
        boxes.append(np.stack([rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1), bh, bw], axis=1))
    boxes = np.stack(boxes)
    boxes[0, 0] = (0, 0, shapes[0][0], shapes[0][1])  # the whole image
    return images, boxes


SHAPES = [(40, 72), (64, 50), (33, 33), (80, 60), (9, 70), (72, 40)]


def _cases():
    cases = _resized_crop_cases()
    for size in (16, 24, 40):  # boxes of any shape, 1 px to the whole image
        cases.append((size, *random_box_case(np.random.default_rng(size), SHAPES, 4)))
    return cases


def _conformance(kernel: CropKernel, device: str) -> None:
    pytest.importorskip(kernel.function.split(":")[0])
    for size, images, boxes in _cases():
        rule = _rule(images, boxes, size)
        got = ADAPTERS[kernel.name](images, boxes, size, device)
        assert got.shape == rule.shape and got.dtype == torch.uint8
        d = (got.int() - rule.int()).abs().float()
        p99 = float(d.flatten().quantile(0.99))
        print(f"\n{kernel.name} on {device}, {size} px: max {int(d.max())}, mean {float(d.mean()):.3f}, p99 {p99:.1f}")
        assert int(d.max()) <= kernel.max_diff and float(d.mean()) <= kernel.mean_diff
        assert kernel.p99_diff is None or p99 <= kernel.p99_diff


def test_every_kernel_is_listed_with_an_adapter():
    assert sorted(ADAPTERS) == sorted(k.name for k in KERNELS) and KERNELS[0].name == "torchvision"
    assert all(k.devices and set(k.devices) <= {"cpu", "cuda"} for k in KERNELS)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if "cpu" in k.devices], ids=lambda k: k.name)
def test_cpu_kernels_follow_the_crop_rule(kernel):
    _conformance(kernel, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", [k for k in KERNELS if "cuda" in k.devices], ids=lambda k: k.name)
def test_cuda_kernels_follow_the_crop_rule(kernel):
    _conformance(kernel, "cuda")


@pytest.mark.parametrize("size", [16, 24, 40])
def test_box_resize_bytes_do_not_depend_on_the_chunk(size):
    """Exact arithmetic (rded_fast/loaders/box_resize.py): the same bytes whatever shares the chunk, or when every
    image is a chunk alone."""
    from rded_fast.loaders.box_resize import resize_boxes

    images, boxes = random_box_case(np.random.default_rng(size), SHAPES, 4)
    images = [_chw(im) for im in images]
    ours = resize_boxes(images, boxes, size)
    assert torch.equal(resize_boxes(images, boxes, size, budget=1), ours)
    assert torch.equal(resize_boxes(images[2:5], boxes[2:5], size), ours[2:5])
