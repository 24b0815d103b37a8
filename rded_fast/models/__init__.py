"""Observers and students: `build(name, num_classes, weights, input_size)` is the one way to get a model.

Names come from one table (`rded_fast.models.registry`): every torchvision classifier (weights = a
torchvision weights name such as IMAGENET1K_V1, read from the local torch hub cache, or a checkpoint
path), `resnet18_modified`/`resnet101_modified` (3x3 stride-1 stem, no max-pool), `conv3`..`conv6`,
`timm:NAME` (with the `[timm]` extra) and `MODULE:FACTORY` (your own callable). A head with more
outputs than the dataset has classes keeps the rows of the dataset's classes (`models.classes`: the
first rows, RDED's rule, unless WNIDs or a class map say otherwise); a smaller head is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rded_fast.arguments import check_number
from rded_fast.errors import UserError
from rded_fast.models import builtin, factory, timm_source  # noqa: F401  (fill the registry)
from rded_fast.models.builtin import CONVNET_NAMES, MODIFIED_RESNETS
from rded_fast.models.checkpoint import clean_state_dict, load_checkpoint, state_dict_sha256
from rded_fast.models.classes import choose_head_rows, imagenet_wnids
from rded_fast.models.heads import check_head_size, find_head, head_name, select_rows, slice_head
from rded_fast.models.registry import (
    ModelEntry,
    get_entry,
    list_entries,
    list_models,
    model_families,
    model_names,
    register,
    register_source,
    source_usages,
)
from rded_fast.score import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "BuiltModel",
    "build",
    "check_input_size",
    "register",
    "register_source",
    "get_entry",
    "list_entries",
    "list_models",
    "model_families",
    "source_usages",
    "model_names",
    "head_name",
    "slice_head",
    "select_rows",
    "load_checkpoint",
    "clean_state_dict",
    "state_dict_sha256",
    "choose_head_rows",
    "imagenet_wnids",
    "CONVNET_NAMES",
    "MODIFIED_RESNETS",
    "ModelEntry",
]


@dataclass
class BuiltModel:
    """A model in eval mode plus its identity for the manifest.

    `head_rows[i]`: the output row of the full head that scores class i; `head_rule`: how they were
    chosen; `mean`/`std`: the input normalisation the model expects (RGB in [0, 1]); `convention`: what
    the source said about its inputs (timm's pretrained_cfg, torchvision's weights preset), `origin`:
    the factory and its file hash for `MODULE:FACTORY` models."""

    model: nn.Module
    name: str
    weights: str | None
    weights_sha256: str | None
    head_size: int  # outputs of the head before slicing
    head_rows: list[int] = field(default_factory=list)
    head_rule: str = "first-rows"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = ""
    family: str = ""
    convention: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)

    def manifest(self) -> dict:
        """What the manifest records about this model."""
        return {
            "name": self.name,
            "source": self.source,
            "family": self.family,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "head_size": self.head_size,
            "head_rule": self.head_rule,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "convention": self.convention,
            **({"factory": self.origin} if self.origin else {}),
        }


def check_input_size(name: str, input_size: int, flag: str = "--input-size") -> None:
    """Refuse an input size model `name` cannot take (ConvNet-D halves it D times: a multiple of 2^D), naming
    `flag`, the argument that set it, and the nearest sizes that work."""
    step = get_entry(name).input_multiple
    if input_size % step:
        below = input_size // step * step
        nearest = " or ".join(str(v) for v in (below, below + step) if v >= step)
        raise UserError(
            f"{flag} {input_size}: {name} takes only multiples of {step} ({step}, {2 * step}, {3 * step}, ...); "
            f"the nearest: {nearest}"
        )


def _construct(entry: ModelEntry, num_classes: int, input_size: int) -> nn.Module:
    """`entry`'s builder; a model too large for memory at this input size (ConvNet-D's head grows with its
    square) is a one-line error, not an allocator traceback."""
    try:
        return entry.builder(num_classes, input_size)
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and "allocate" not in str(exc):
            raise
        raise UserError(f"model {entry.name} at input size {input_size} does not fit in memory; lower --input-size") from exc


def _load_weights(entry: ModelEntry, weights: str) -> tuple[dict, ModelEntry]:
    if os.path.isdir(weights):
        inside = sorted(n for n in os.listdir(weights) if n.endswith((".pth", ".pt", ".safetensors", ".bin", ".ckpt")))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise UserError(f"--weights {weights}: is a folder, not a checkpoint file; give the checkpoint file itself{hint}")
    if os.path.isfile(weights):
        return load_checkpoint(weights, expect_arch=entry.name), entry
    if entry.fetch_weights is not None:
        return entry.fetch_weights(weights)
    raise UserError(f"--weights {weights}: no such file (for {entry.name}, weights must be a checkpoint path)")


def _head_size(entry: ModelEntry, state: dict, weights: str, num_classes: int, input_size: int) -> tuple[int, str | None]:
    """Outputs of the head the weights were saved with, and the head's name (None: not a Linear)."""
    probe = _construct(entry, num_classes, input_size)
    name = find_head(probe)
    if name is None:
        return num_classes, None
    key = name + ".weight"
    if key not in state:
        raise UserError(f"--weights {weights}: has no {key!r}; is it a checkpoint of {entry.name}?")
    return int(state[key].shape[0]), name


def _count_outputs(model: nn.Module, input_size: int, name: str) -> int:
    """Outputs of `model` on one zero image (for factory models, whose last Linear may not be the head)."""
    try:
        with torch.inference_mode():
            out = model.eval()(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:
        raise UserError(
            f"model {name}: a 1x3x{input_size}x{input_size} input fails ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check --input-size"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError(
            f"model {name}: must return logits [batch, classes], returned "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    return int(out.shape[1])


def _instantiate(
    entry, state: dict | None, weights: str | None, num_classes: int, input_size: int, what: str, class_map: Sequence[str] | None
) -> tuple[nn.Module, str | None]:
    """The model with its head sized for the checkpoint (or the rules of `build`), the checkpoint loaded; and the
    name of its head Linear where known."""
    head_size, head = num_classes, None
    if state is not None:
        head_size, head = _head_size(entry, state, weights, num_classes, input_size)
    if state is None and what == "student" and entry.student_head_1000:
        head_size = max(1000, num_classes)  # as the reference builds ResNet students: a 1000-way head, sliced
    if class_map is not None and state is None:  # a class map may name more classes than the data has
        head_size = max(head_size, len(class_map))
    model = _construct(entry, head_size, input_size)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).splitlines()[0:3])
            raise UserError(f"--weights {weights}: does not fit {entry.name} at input size {input_size}: {first}") from exc
    return model, head if head is not None else find_head(model)


def _head_rows(
    head_rows: Sequence[int] | None,
    classes: Sequence[str] | None,
    num_classes: int,
    full: int,
    class_map: Sequence[str] | None,
    label_offset: int,
) -> tuple[list[int], str]:
    """The head rows kept, and the rule that chose them (see `build`)."""
    if head_rows is not None:
        return [int(r) for r in head_rows], "given"
    if classes is None:
        return list(range(num_classes)), "first-rows"
    if len(classes) != num_classes:
        raise ValueError(f"classes has {len(classes)} names but num_classes is {num_classes}")
    return choose_head_rows(classes, full, class_map, label_offset)


def build(
    name: str,
    num_classes: int,
    weights: str | None = None,
    input_size: int = 224,
    classes: Sequence[str] | None = None,
    class_map: Sequence[str] | None = None,
    what: str = "observer",
    head_rows: Sequence[int] | None = None,
) -> BuiltModel:
    """Build `name` with `weights` (None = random init) for `num_classes` classes, in eval mode.

    The head keeps the rows of the dataset's classes: given the class names `classes` (and the observer's
    output order `class_map`, which may list more classes), rows are picked by class
    (`models.classes.choose_head_rows`); without them, the first `num_classes` rows. `what="student"`:
    a random student; ImageNet families get a 1000-way head sliced to `num_classes`, as the reference
    builds them (ConvNets and factories get `num_classes`). `head_rows`: explicit rows (e.g. the ones a
    distilled set's manifest recorded), overriding both rules. The model is returned in eval mode."""
    if not isinstance(name, str):
        raise UserError(f"build({name!r}): the model name must be a string, e.g. 'resnet18'")
    check_number("num_classes", num_classes, integer=True, flag=f"build({name!r}): num_classes")
    check_number("input_size", input_size, integer=True, flag=f"build({name!r}): input_size")
    entry = get_entry(name)
    check_input_size(name, input_size, "input size")
    state = None
    if weights is not None:
        state, entry = _load_weights(entry, weights)
    model, head = _instantiate(entry, state, weights, num_classes, input_size, what, class_map)
    outputs = None
    if entry.source == "factory" or head is None:
        outputs = _count_outputs(model, input_size, entry.name)
        if head is not None and model.get_submodule(head).out_features != outputs:
            head = None  # the last Linear is not what the model outputs: select output columns instead
    full = outputs if head is None else model.get_submodule(head).out_features
    check_head_size(full, num_classes, what)
    convention = dict(entry.convention)
    cfg = getattr(model, "pretrained_cfg", None)
    if not convention and isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        convention = {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    rows, rule = _head_rows(head_rows, classes, num_classes, full, class_map, convention.get("label_offset", 0))
    model = select_rows(model, rows, what, head=head, outputs=full)
    model.eval()
    mean = tuple(float(v) for v in convention.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in convention.get("std", IMAGENET_STD))
    return BuiltModel(
        model,
        entry.name,
        weights,
        state_dict_sha256(state) if state is not None else None,
        full,
        rows,
        rule,
        mean,
        std,
        entry.source,
        entry.family,
        convention,
        entry.origin,
    )
