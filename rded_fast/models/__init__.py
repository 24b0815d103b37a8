"""The observer/student registry: build(name, num_classes, weights, input_size) is the one way to get a model.

Names: every torchvision classification model (weights = a torchvision weights name such as
IMAGENET1K_V1, or a checkpoint path), `resnet18_modified`/`resnet101_modified` (3x3 stride-1 stem, no
max-pool), and `conv3`..`conv6`. A head with more outputs than the dataset has classes is sliced to its
first `num_classes` rows (RDED's subset rule); a smaller head is an error.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from rded_fast.errors import UserError
from rded_fast.models.convnet import ConvNet

CONVNET_NAMES = ("conv3", "conv4", "conv5", "conv6")
MODIFIED_RESNETS = ("resnet18_modified", "resnet101_modified")


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    return list(CONVNET_NAMES) + list(MODIFIED_RESNETS) + torchvision_names()


@dataclass
class BuiltModel:
    """A model in eval mode plus its identity for the manifest."""

    model: nn.Module
    name: str
    weights: str | None
    weights_sha256: str | None
    head_size: int  # outputs of the head before slicing


def _architecture(name: str, num_classes: int, input_size: int) -> nn.Module:
    if name in CONVNET_NAMES:
        return ConvNet(depth=int(name[-1]), num_classes=num_classes, input_size=input_size)
    if name in MODIFIED_RESNETS:
        model = getattr(torchvision.models, name.split("_")[0])(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    if name in torchvision_names():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise UserError(f"--observer/--arch {name}: unknown model; run `rded-fast models` for the list")


def head_name(model: nn.Module) -> str:
    """Dotted name of the classifier head: the last nn.Linear in the module tree."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"{type(model).__name__} has no Linear classifier head; it cannot be used as an observer")
    return names[-1]


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent = model.get_submodule(dotted.rsplit(".", 1)[0]) if "." in dotted else model
    setattr(parent, dotted.rsplit(".", 1)[-1], new)


def slice_head(model: nn.Module, num_classes: int, what: str = "observer") -> nn.Module:
    """Keep the head's first `num_classes` outputs (RDED's rule for class subsets)."""
    name = head_name(model)
    head: nn.Linear = model.get_submodule(name)
    if head.out_features < num_classes:
        raise UserError(
            f"{what} head has {head.out_features} outputs but the dataset has {num_classes} classes; "
            "use an observer trained on (a superset of) these classes"
        )
    if head.out_features == num_classes:
        return model
    new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    with torch.no_grad():
        new.weight.copy_(head.weight[:num_classes])
        if head.bias is not None:
            new.bias.copy_(head.bias[:num_classes])
    _set_module(model, name, new)
    return model


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names and values, independent of how it was stored."""
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(path: str, expect_arch: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from `{"model": sd}`, `{"state_dict": sd}`, a bare sd, with or without `module.` prefixes."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own text (e.g. its weights_only advice) is not for this user
        why = ("it holds Python objects besides tensors; save {'model': model.state_dict()} instead"
               if "weights_only" in str(exc) or "Weights only" in str(exc) else f"{type(exc).__name__}")
        raise UserError(f"--weights {path}: cannot load checkpoint ({why})") from exc
    if isinstance(obj, dict) and expect_arch and isinstance(obj.get("arch"), str) and obj["arch"] != expect_arch:
        raise UserError(f"--weights {path}: a checkpoint of {obj['arch']}, not of {expect_arch}; pass "
                        f"--observer/--teacher {obj['arch']} or a {expect_arch} checkpoint")
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"--weights {path}: not a state dict; expected {{'model': state_dict}}, a bare state dict, "
            "or one with 'module.'-prefixed keys"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _torchvision_weights(name: str, weights: str) -> dict[str, torch.Tensor]:
    try:
        enum = torchvision.models.get_model_weights(name)
        w = enum[weights] if weights in enum.__members__ else enum.verify(weights)
    except Exception as exc:
        raise UserError(f"--weights {weights}: not a weights name of {name} (e.g. IMAGENET1K_V1) nor a file") from exc
    try:
        return w.get_state_dict(progress=False)
    except Exception as exc:
        raise UserError(
            f"--weights {weights}: could not fetch {w.url} ({type(exc).__name__}); download it elsewhere "
            "and pass the file path as --weights"
        ) from exc


def build(name: str, num_classes: int, weights: str | None = None, input_size: int = 224) -> BuiltModel:
    """Build `name` with `weights` (None = random init), head sliced to `num_classes`, in eval mode."""
    state = None
    if weights is not None:
        if os.path.isfile(weights):
            state = load_checkpoint(weights, expect_arch=name)
        elif name in torchvision_names():
            state = _torchvision_weights(name, weights)
        else:
            raise UserError(f"--weights {weights}: no such file (for {name}, weights must be a checkpoint path)")
    head_size = num_classes
    if state is not None:
        probe = _architecture(name, num_classes, input_size)
        key = head_name(probe) + ".weight"
        if key not in state:
            raise UserError(f"--weights {weights}: has no {key!r}; is it a checkpoint of {name}?")
        head_size = int(state[key].shape[0])
    model = _architecture(name, head_size, input_size)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:3]
            raise UserError(f"--weights {weights}: does not fit {name} at input size {input_size}: {' '.join(first)}") from exc
    model = slice_head(model, num_classes)
    model.eval()
    return BuiltModel(model, name, weights, state_dict_sha256(state) if state is not None else None, head_size)


def build_student(name: str, num_classes: int, input_size: int = 224) -> nn.Module:
    """A randomly initialised student. ResNet-family students get a 1000-way head sliced to
    `num_classes`, as the reference builds them; ConvNets are built with `num_classes` outputs."""
    head = num_classes if name in CONVNET_NAMES else max(1000, num_classes)
    return slice_head(_architecture(name, head, input_size), num_classes, what="student")
