"""The fixed names: ConvNet-D (conv3..conv6), RDED's modified ResNets, and every torchvision classifier."""

from __future__ import annotations

import dataclasses
from functools import partial

import torchvision
from torch import nn

from rded_fast.models.convnet import ConvNet
from rded_fast.models.hub import torchvision_state_dict
from rded_fast.models.registry import ModelEntry, get_entry, register

CONVNET_NAMES = ("conv3", "conv4", "conv5", "conv6")
MODIFIED_RESNETS = ("resnet18_modified", "resnet101_modified")


def _convnet(depth: int, num_classes: int, input_size: int) -> nn.Module:
    return ConvNet(depth=depth, num_classes=num_classes, input_size=input_size)


def _modified_resnet(arch: str, num_classes: int, input_size: int) -> nn.Module:
    """3x3 stride-1 stem and no max-pool: RDED's ResNets for 32/64 px data."""
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _torchvision(name: str, num_classes: int, input_size: int) -> nn.Module:
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _torchvision_weights(name: str, tag: str) -> tuple[dict, ModelEntry]:
    state, convention = torchvision_state_dict(name, tag)
    return state, dataclasses.replace(get_entry(name), convention=convention)


def torchvision_family(name: str) -> str:
    """The torchvision module that defines `name` (resnet holds resnet, resnext and wide_resnet)."""
    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]


for _depth in range(3, 7):
    register(f"conv{_depth}", "conv", "convnet", student_head_1000=False, input_multiple=2**_depth)(partial(_convnet, _depth))
for _name in MODIFIED_RESNETS:
    register(_name, "modified", "resnet")(partial(_modified_resnet, _name.split("_")[0]))
for _name in sorted(torchvision.models.list_models(module=torchvision.models)):
    register(_name, "torchvision", torchvision_family(_name), fetch_weights=partial(_torchvision_weights, _name))(
        partial(_torchvision, _name)
    )
