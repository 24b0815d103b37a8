"""Plan: which images each class uses and every crop box, as a pure function of its inputs.

The plan is what makes loaders interchangeable and runs reproducible: torch, FFCV and DALI loaders
all cut exactly these boxes. Randomness comes from one generator per class, seeded by
(seed, class index), so a class's plan does not depend on which other classes are planned.
Boxes follow torchvision's RandomResizedCrop.get_params rule: up to 10 tries of (area scale,
log-uniform aspect ratio), the first that fits wins, else a centre crop clamped to the ratio range.
Images are chosen before their headers are read (`choose_images`), so a lazy index reads only those.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import numpy as np

from rded_fast.index import DatasetIndex, read_headers
from rded_fast.recipe import CROP_RATIO, CROP_SCALE

MAX_TRIES = 10


@dataclass(frozen=True)
class CropPlan:
    """Planned source images (rows) and their crop boxes.

    `image_ids[r]` indexes the DatasetIndex, `labels[r]` is its class, `boxes[r, k]` is crop k as
    (top, left, height, width) in stored source pixels. Rows are grouped by class, ascending.
    """

    image_ids: np.ndarray  # [M] int64
    labels: np.ndarray  # [M] int64
    boxes: np.ndarray  # [M, K, 4] int64
    seed: int
    mipc: int
    num_crop: int
    scale: tuple[float, float]
    ratio: tuple[float, float]

    def __len__(self) -> int:
        return len(self.image_ids)

    def only(self, classes: list[int]) -> "CropPlan":
        """The rows of `classes`: what planning them alone gives, since a class's plan does not depend on the others."""
        keep = np.isin(self.labels, classes)
        return replace(self, image_ids=self.image_ids[keep], labels=self.labels[keep], boxes=self.boxes[keep])

    def class_rows(self, label: int) -> np.ndarray:
        return np.flatnonzero(self.labels == label)


def class_generator(seed: int, label: int, purpose: int = 0) -> np.random.Generator:
    """The generator for one class's randomness; `purpose` separates independent streams."""
    return np.random.default_rng([int(seed), int(label), int(purpose)])


def class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Each class's image ids, ascending (one sort, not a scan of every label per class)."""
    order = np.argsort(labels, kind="stable")
    ends = np.cumsum(np.bincount(labels, minlength=num_classes))
    return np.split(order, ends[:-1])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each uint64."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def draw_order(paths: list[str], ids: np.ndarray, seed: int, label: int, purpose: int = 0) -> np.ndarray:
    """`ids` (ascending) in a seeded random order in which each file's place depends only on its path: leaving a
    file out (one whose header fails) keeps the others' order, so a lazy index that lists unusable files plans
    exactly as a full one that dropped them, and every loader's index plans alike."""
    salt = np.uint64(0)
    for part in (seed, label, purpose):
        salt = _mix64(salt ^ np.uint64(int(part) & 0xFFFFFFFFFFFFFFFF))
    names = np.fromiter((zlib.crc32(paths[i].encode("utf-8", "surrogateescape")) for i in ids), np.uint64, len(ids))
    return np.asarray(ids, dtype=np.int64)[np.argsort(_mix64(names ^ salt), kind="stable")]


def choose_images(
    index: DatasetIndex, seed: int, count: int, classes: list[int], purpose: int = 0, show_progress: bool = False
) -> dict[int, tuple[np.ndarray, np.random.Generator]]:
    """Up to `count` usable images of each class: the class's files in a seeded random order (`draw_order`), the
    first `count` whose header reads. Headers not read yet are read here, all classes' at once (then the next
    candidates of any class that met an unusable file). Returns label -> (ids ascending, the class's generator,
    for the rest of its plan)."""
    members = class_members(index.labels, index.num_classes)
    chosen: dict[int, tuple[np.ndarray, np.random.Generator]] = {}
    orders, taken = {}, {}
    for label in classes:
        orders[label] = draw_order(index.paths, members[label], seed, label, purpose)
        chosen[label], taken[label] = (np.zeros(0, np.int64), class_generator(seed, label, purpose)), 0
    pending = list(classes)
    while pending:
        want = {label: orders[label][taken[label] : taken[label] + count - len(chosen[label][0])] for label in pending}
        read_headers(index, np.concatenate([np.zeros(0, np.int64), *want.values()]), show_progress=show_progress)
        for label, ids in want.items():
            taken[label] += len(ids)
            chosen[label] = (np.concatenate([chosen[label][0], ids[index.usable(ids)]]), chosen[label][1])
        pending = [c for c in pending if len(chosen[c][0]) < count and taken[c] < len(orders[c])]
    return {label: (np.sort(ids), rng) for label, (ids, rng) in chosen.items()}


def sample_resized_crop_boxes(
    sizes: np.ndarray,
    num_crop: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> np.ndarray:
    """torchvision RandomResizedCrop boxes for images of `sizes` [M, 2] (width, height).

    Returns [M, num_crop, 4] int64 (top, left, height, width), vectorised over images, crops and tries.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    m = len(sizes)
    width = sizes[:, 0][:, None, None].astype(np.float64)
    height = sizes[:, 1][:, None, None].astype(np.float64)
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * rng.uniform(scale[0], scale[1], size=(m, num_crop, MAX_TRIES))
    aspect = np.exp(rng.uniform(log_lo, log_hi, size=(m, num_crop, MAX_TRIES)))
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(fits, axis=2).ravel()  # the first try that fits, per crop
    found = fits.any(axis=2)
    pick = (np.arange(m * num_crop), first)
    w = w.reshape(m * num_crop, MAX_TRIES)[pick].reshape(m, num_crop).astype(np.int64)
    h = h.reshape(m * num_crop, MAX_TRIES)[pick].reshape(m, num_crop).astype(np.int64)
    W = sizes[:, 0][:, None].repeat(num_crop, 1)
    H = sizes[:, 1][:, None].repeat(num_crop, 1)
    u_top, u_left = rng.random((m, num_crop)), rng.random((m, num_crop))
    top = np.floor(u_top * (H - h + 1)).astype(np.int64)
    left = np.floor(u_left * (W - w + 1)).astype(np.int64)

    # torchvision's fallback: a centre crop, clamped to the ratio range.
    in_ratio = W / H
    fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.rint(H * ratio[1]), W)).astype(np.int64)
    fh = np.where(in_ratio < ratio[0], np.rint(W / ratio[0]), H).astype(np.int64)
    w = np.where(found, w, fw)
    h = np.where(found, h, fh)
    top = np.where(found, top, (H - h) // 2)
    left = np.where(found, left, (W - w) // 2)
    return np.stack([top, left, h, w], axis=-1)


def make_plan(
    index: DatasetIndex,
    seed: int,
    mipc: int,
    num_crop: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    classes: list[int] | None = None,
    show_progress: bool = False,
) -> CropPlan:
    """Sample up to `mipc` images per class without replacement and `num_crop` boxes for each.

    A class with fewer than `mipc` usable images uses all it has (see `short_classes`).
    """
    ids, labels, boxes = [], [], []
    picks = choose_images(
        index, seed, mipc, list(range(index.num_classes)) if classes is None else list(classes), show_progress=show_progress
    )
    for label, (chosen, rng) in picks.items():
        ids.append(chosen)
        labels.append(np.full(len(chosen), label, dtype=np.int64))
        boxes.append(sample_resized_crop_boxes(index.sizes[chosen], num_crop, rng, scale, ratio))
    return CropPlan(
        image_ids=np.concatenate(ids) if ids else np.zeros(0, np.int64),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, num_crop, 4), np.int64),
        seed=int(seed),
        mipc=int(mipc),
        num_crop=int(num_crop),
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(ratio[0]), float(ratio[1])),
    )


def short_classes(index: DatasetIndex, mipc: int) -> dict[str, int]:
    """Classes with fewer than `mipc` usable images: name -> count (exact on a lazy index once it is planned:
    a class short of `mipc` has had every header read)."""
    counts = index.class_counts()
    return {index.classes[c]: int(n) for c, n in enumerate(counts) if n < mipc}


def make_center_plan(
    index: DatasetIndex, seed: int, per_class: int, classes: list[int] | None = None, show_progress: bool = False
) -> CropPlan:
    """One centred square crop (side = shorter side) of up to `per_class` images per class (of `classes`, default all).

    Used to check the observer's accuracy on whole images before distilling, and as the plan of the
    random-images baseline; the boxes go through the same loaders as the real plan.
    """
    ids, labels = [], []
    picks = choose_images(
        index,
        seed,
        per_class,
        list(range(index.num_classes)) if classes is None else sorted(classes),
        purpose=1,
        show_progress=show_progress,
    )
    for label, (chosen, _) in picks.items():
        ids.append(chosen)
        labels.append(np.full(len(chosen), label, dtype=np.int64))
    image_ids = np.concatenate(ids)
    sizes = index.sizes[image_ids]
    side = sizes.min(axis=1)
    top = (sizes[:, 1] - side) // 2
    left = (sizes[:, 0] - side) // 2
    boxes = np.stack([top, left, side, side], axis=-1)[:, None, :]
    return CropPlan(image_ids, np.concatenate(labels), boxes, int(seed), per_class, 1, (1.0, 1.0), (1.0, 1.0))
