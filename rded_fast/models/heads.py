"""Classifier heads: find the head, keep the rows of the dataset's classes, refuse a head that is too small.

RDED's rule for a class subset is "the first N rows"; an ImageNet subset scored by a full ImageNet model
needs the rows *of its classes* instead, so slicing takes explicit rows (`rded_fast.models.classes` picks them).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from rded_fast.errors import UserError


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier head: timm's `pretrained_cfg['classifier']` when it names a Linear,
    else the last nn.Linear in the module tree."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("classifier"), str):
        try:
            if isinstance(model.get_submodule(cfg["classifier"]), nn.Linear):
                return cfg["classifier"]
        except AttributeError:
            pass
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no Linear classifier head; it cannot be used as an observer")
    return names[-1]


def find_head(model: nn.Module) -> str | None:
    """`head_name`, or None when the model has no Linear layer."""
    try:
        return head_name(model)
    except UserError:
        return None


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent = model.get_submodule(dotted.rsplit(".", 1)[0]) if "." in dotted else model
    setattr(parent, dotted.rsplit(".", 1)[-1], new)


class SelectOutputs(nn.Module):
    """Wrap a model whose head is not a Linear layer: keep output columns `rows`, in that order."""

    def __init__(self, model: nn.Module, rows: Sequence[int]):
        super().__init__()
        self.model = model
        self.register_buffer("rows", torch.as_tensor(list(rows), dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.rows)


class HeadTooSmall(UserError):
    """The model has fewer outputs than the dataset has classes."""


def check_head_size(outputs: int, num_classes: int, what: str = "observer") -> None:
    if outputs < num_classes:
        raise HeadTooSmall(
            f"{what} head has {outputs} outputs but the dataset has {num_classes} classes; "
            "use an observer trained on (a superset of) these classes"
        )


def select_rows(
    model: nn.Module, rows: Sequence[int], what: str = "observer", head: str | None = None, outputs: int | None = None
) -> nn.Module:
    """Keep head rows `rows` (row i of the result = output `rows[i]` of the model).

    The Linear head `head` (default: `head_name`) is replaced by a smaller one; with `outputs` given and
    no Linear head, the model is wrapped in `SelectOutputs`."""
    rows = [int(r) for r in rows]
    name = head if head is not None else (find_head(model) if outputs is not None else head_name(model))
    size = model.get_submodule(name).out_features if name is not None else int(outputs)
    check_head_size(size, len(rows), what)
    if max(rows, default=-1) >= size or min(rows, default=0) < 0:
        raise UserError(f"{what} head has {size} outputs; class rows {min(rows)}..{max(rows)} do not fit it")
    if rows == list(range(size)):
        return model
    if name is None:
        return SelectOutputs(model, rows)
    old: nn.Linear = model.get_submodule(name)
    new = nn.Linear(old.in_features, len(rows), bias=old.bias is not None)
    index = torch.tensor(rows)
    with torch.no_grad():
        new.weight.copy_(old.weight[index])
        if old.bias is not None:
            new.bias.copy_(old.bias[index])
    _set_module(model, name, new.to(old.weight.device, old.weight.dtype))
    return model


def slice_head(model: nn.Module, num_classes: int, what: str = "observer") -> nn.Module:
    """Keep the head's first `num_classes` outputs (RDED's rule for class subsets)."""
    return select_rows(model, range(num_classes), what)


def split_head(model: nn.Module, input_size: int | None = None) -> tuple[nn.Module, nn.Linear]:
    """(body, head): the model with its Linear head (`head_name`) replaced by an identity, and that head, so that
    `head(body(x))` is `model(x)` and `body(x)` is the penultimate features the head reads. The body shares every
    parameter and buffer with `model`; `model` itself is left as it was (only the modules on the head's path are
    shallow-copied). With `input_size`, two seeded random inputs of that size check the split: a model whose
    output is not its head's (something runs after the head) is refused."""
    name = head_name(model)
    head = model.get_submodule(name)
    parts = name.split(".")
    body = copy.copy(model)
    body._modules = dict(model._modules)
    parent = body
    for part in parts[:-1]:
        child = copy.copy(parent._modules[part])
        child._modules = dict(child._modules)
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = nn.Identity()
    if input_size is not None:
        probe = torch.randn((2, 3, input_size, input_size), generator=torch.Generator().manual_seed(0)).to(head.weight.device)
        training = model.training
        with torch.no_grad():  # in eval mode: a probe must not move BatchNorm's running statistics
            whole, split = model.eval()(probe), head(body.eval()(probe))
        model.train(training), body.train(training)
        if whole.shape != split.shape or not torch.allclose(whole.float(), split.float(), rtol=1e-4, atol=1e-5):
            raise UserError(
                f"{type(model).__name__}: its output is not its Linear head {name!r}'s (a step runs after the head), "
                "so its penultimate features cannot be read; use --select rded with this observer"
            )
    return body, head
