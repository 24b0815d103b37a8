"""A distill run's config (`DistillConfig`), its checks before any work, and its `auto` knobs made concrete.

`validate` refuses impossible arguments in one line each (the command line's type and range checks, then the
combinations); `note_ignored` names arguments a selection does not use; `resolve_auto` fixes what `auto`, an alias
or a selection leaves open; `check_index_path` and `check_crops_fit` refuse an --index cache or a --crop-scale that
cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from rded_fast.arguments import check_config
from rded_fast.compile_rule import CHOICES as COMPILE_CHOICES
from rded_fast.device import AMP_CHOICES, available_cores, check_workers
from rded_fast.errors import UserError
from rded_fast.index import DatasetIndex, is_index_cache
from rded_fast.loaders import LOADER_CHOICES, LOADER_OPTIONS, check_options, resolve_loader
from rded_fast.models import check_input_size
from rded_fast.outputs import check_separate, check_writable_file, note, resolve
from rded_fast.plan import CropPlan
from rded_fast.recipe import CROP_SCALE, FACTOR, INPUT_SIZE, IPC, MIPC, NUM_CROP
from rded_fast.score import SCORE_MODES
from rded_fast.select import SELECTIONS, selector
from rded_fast.write import IMAGE_FORMATS

if TYPE_CHECKING:
    import torch


@dataclass
class DistillConfig:
    """Every knob of a distill run; defaults are the reference's ImageNet-1K settings."""

    data: str
    out: str
    observer: str
    weights: str | None = None
    ipc: int = IPC
    factor: int = FACTOR
    mipc: int = MIPC
    num_crop: int = NUM_CROP
    # area fraction range of the random crops (RandomResizedCrop's scale; RDED's (0.08, 1)); (1, 1): whole images
    crop_scale: tuple[float, float] = CROP_SCALE
    input_size: int = INPUT_SIZE
    seed: int = 0
    batch_size: int = 64
    workers: int | None = None  # None: the cores available to this process
    device: str = "auto"
    loader: str = "auto"
    prefetch: int | None = None  # loader batches in flight; None: the loader's default for the device
    # the loader's own options by name, e.g. {"hw_decoder_load": 1.0} (DALI on CUDA: share of each batch for the
    # hardware JPEG decoder; pinned to 0 or 1 every image gets the same decoder wherever it sits in a batch, so output
    # bytes do not depend on batch size or resume); a loader's default where not given
    loader_options: dict = field(default_factory=dict)
    format: str = "png"
    jpeg_quality: int = 90
    class_map: str | None = None
    index: str | None = None
    select: str = "rded"  # a rule of rded_fast.select.SELECTORS (or an alias)
    amp: str = "auto"
    compile: str = "auto"
    score_mode: str = "faithful"
    overwrite: bool = False
    overwrite_any: bool = False  # replace an --out that rded-fast did not write (moved aside until success)
    resume: bool = False
    skip_observer_check: bool = False
    show_progress: bool = True


# DistillConfig fields that name files or folders: a pathlib.Path is taken for them too (as a string)
PATH_FIELDS = ("data", "out", "weights", "class_map", "index")


def _range_checks(cfg: DistillConfig) -> list[tuple[bool, str]]:
    """(ok, message) of the checks of `cfg` that the numbers' table (rded_fast.arguments.NUMBER_RANGES, checked first by
    `validate`) cannot make: the crop scale, the factor against the input size, the choices and combinations."""
    return [
        (
            len(cfg.crop_scale) == 2 and 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1,
            f"--crop-scale {','.join(map(str, cfg.crop_scale))}: must be MIN,MAX with 0 < MIN <= MAX <= 1",
        ),
        (cfg.input_size // max(cfg.factor, 1) >= 1, f"--factor {cfg.factor}: larger than --input-size {cfg.input_size}"),
        (cfg.loader in LOADER_CHOICES, f"--loader {cfg.loader}: choose one of {', '.join(LOADER_CHOICES)}"),
        (cfg.format in IMAGE_FORMATS, f"--format {cfg.format}: choose {' or '.join(IMAGE_FORMATS)}"),
        (cfg.select in SELECTIONS, f"--select {cfg.select}: choose one of {', '.join(SELECTIONS)}"),
        (cfg.amp in AMP_CHOICES, f"--amp {cfg.amp}: choose one of {', '.join(AMP_CHOICES)}"),
        (cfg.compile in COMPILE_CHOICES, f"--compile {cfg.compile}: choose {', '.join(COMPILE_CHOICES)}"),
        (cfg.score_mode in SCORE_MODES, f"--score-mode {cfg.score_mode}: choose {' or '.join(SCORE_MODES)}"),
        (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda"), f"--device {cfg.device}: choose auto, cpu or cuda"),
        (
            not (cfg.resume and (cfg.overwrite or cfg.overwrite_any)),
            f"--resume and {'--overwrite-any' if cfg.overwrite_any else '--overwrite'} exclude each other: --resume "
            "continues the run in --out, the other replaces it; give one",
        ),
    ]


def crops_are_whole(cfg: DistillConfig) -> bool:
    """--crop-scale 1: every crop is its image's whole (centred, ratio-clamped) square, the same each time."""
    return float(cfg.crop_scale[0]) >= 1.0


def validate(cfg: DistillConfig) -> None:
    """One-line errors for impossible arguments, before any work: the command line's checks (types included, for
    the Python API: rded_fast.arguments), then the ranges and combinations."""
    check_config(cfg, PATH_FIELDS)
    check_options(cfg.loader_options)
    checks = _range_checks(cfg)
    if cfg.select not in SELECTIONS or not selector(cfg.select).whole_images:
        checks.append(
            (
                not (crops_are_whole(cfg) and cfg.num_crop > 1),
                f"--crop-scale 1 with --num-crop {cfg.num_crop}: every crop is the whole image (its centred square), so "
                f"the {cfg.num_crop} crops of an image would be the same; pass --num-crop 1 (a larger --mipc gives more "
                "candidates)",
            )
        )
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_workers(cfg.workers)
    check_input_size(cfg.observer, cfg.input_size)
    if cfg.ipc * cfg.factor**2 > cfg.mipc * cfg.num_crop:
        raise UserError(
            f"--ipc {cfg.ipc} --factor {cfg.factor} needs {cfg.ipc * cfg.factor**2} cells per class but "
            f"--mipc {cfg.mipc} x --num-crop {cfg.num_crop} gives at most {cfg.mipc * cfg.num_crop}"
        )


def note_ignored(cfg: DistillConfig) -> None:
    """A note naming the crop arguments a whole-image selection (`--select random-images`) does not use (one whole
    image per output image), when they were given other values than their defaults and than the ones it uses."""
    if not selector(cfg.select).whole_images:
        return
    given = [
        f"{flag} {shown}"
        for flag, value, default, used, shown in (
            ("--factor", cfg.factor, FACTOR, 1, cfg.factor),
            ("--num-crop", cfg.num_crop, NUM_CROP, 1, cfg.num_crop),
            ("--crop-scale", tuple(cfg.crop_scale), CROP_SCALE, (1.0, 1.0), ",".join(f"{v:g}" for v in cfg.crop_scale)),
        )
        if value != default and value != used
    ]
    if given:
        note(
            f"--select {cfg.select} uses one whole image (its centred square) per output image at --input-size: "
            f"{', '.join(given)} do{'es' if len(given) == 1 else ''} not apply and {'is' if len(given) == 1 else 'are'} ignored"
        )


def resolve_auto(cfg: DistillConfig, device: torch.device) -> DistillConfig:
    """The config with what changes what runs made concrete: the loader, the worker count, every loader option (its
    default where not given), the selection's own name (not an alias) and, for a whole-image selection, its crops."""
    workers = available_cores() if cfg.workers is None else cfg.workers
    rule = selector(cfg.select)
    cfg = replace(
        cfg,
        loader=resolve_loader(cfg.loader, cfg.data, device),
        workers=workers,
        loader_options={**{option.dest: option.default for option in LOADER_OPTIONS}, **cfg.loader_options},
        select=rule.name,
    )
    if rule.whole_images:  # one whole image per output image: no cells, no crops to choose from
        cfg = replace(cfg, factor=1, num_crop=1, crop_scale=(1.0, 1.0))
    return cfg


def check_index_path(cfg: DistillConfig) -> None:
    """The --index cache is read and written: a file name outside the data and outside --out (an output folder is
    replaced as a whole), and, when it exists, an index cache of ours (used as it is where it cannot be rewritten:
    read-only storage); when it does not, in a writable folder."""
    where, out = resolve(cfg.index), resolve(cfg.out)
    if str(cfg.index) and where.is_relative_to(out):
        raise UserError(
            f"--index {cfg.index} lies in --out {cfg.out} ({where} is inside {out}); keep the index cache outside the "
            f"output folder, e.g. {out.parent / where.name}"
        )
    if not where.is_file():
        check_writable_file(cfg.index, "--index")
    check_separate(cfg.index, "--index", {"--data": cfg.data}, "file")
    if where.is_file() and not is_index_cache(where):
        raise UserError(f"--index {cfg.index}: not an index cache of rded-fast (rded-fast did not write it); give another path")


def check_crops_fit(cfg: DistillConfig, index: DatasetIndex, plan: CropPlan) -> None:
    """Refuse a --crop-scale whose largest crop is under one pixel on a planned image: there torchvision's rule
    falls back to the whole image for every crop, so the run would silently score whole images."""
    if selector(cfg.select).whole_images or len(plan) == 0:
        return
    sizes = index.sizes[plan.image_ids]
    area = sizes[:, 0] * sizes[:, 1]
    small = area * float(cfg.crop_scale[1]) < 1
    if small.any():
        i = int(np.argmin(area))
        w, h = (int(v) for v in sizes[i])
        raise UserError(
            f"--crop-scale {','.join(f'{v:g}' for v in cfg.crop_scale)}: its largest crop is under one pixel on "
            f"{int(small.sum())} planned image(s) (e.g. {index.paths[plan.image_ids[i]]}, {w}x{h}), which would be "
            f"used whole instead; give a MAX of at least {1 / (w * h):.2g}, or RDED's 0.08,1"
        )
