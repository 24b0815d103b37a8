"""The observer registry: names, checkpoint formats, head slicing."""

import pytest
import torch

from rded_fast.errors import UserError
from rded_fast.models import build, head_name, model_names


def test_registry_names_and_convnet_keys():
    names = model_names()
    assert {"conv3", "conv6", "resnet18_modified", "resnet101_modified", "resnet18", "vit_b_16"} <= set(names)
    sd = build("conv4", 10, None, 64).model.state_dict()
    assert {"layers.conv.0.weight", "layers.norm.3.running_mean", "classifier.weight"} <= set(sd)
    assert sd["classifier.weight"].shape == (10, 128 * 4 * 4)
    m = build("resnet18_modified", 10, None, 32).model
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("wrap", ["model", "bare", "module"])
def test_checkpoint_formats_load_and_slice(tmp_path, wrap):
    torch.manual_seed(0)
    src = build("resnet18", 1000, None, 224).model
    sd = src.state_dict()
    obj = {"model": sd} if wrap == "model" else sd if wrap == "bare" else {"module." + k: v for k, v in sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    built = build("resnet18", 10, str(path), 224)
    assert built.head_size == 1000 and built.model.fc.out_features == 10
    assert torch.equal(built.model.fc.weight, sd["fc.weight"][:10])
    assert torch.equal(built.model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])
    assert len(built.weights_sha256) == 64


def test_bad_checkpoints_give_clear_errors(tmp_path):
    not_sd = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(UserError, match="not a state dict"):
        build("conv3", 10, str(not_sd), 32)
    wrong_arch = tmp_path / "conv4.pth"
    torch.save({"model": build("conv4", 10, None, 32).model.state_dict()}, wrong_arch)
    with pytest.raises(UserError, match="does not fit conv3"):
        build("conv3", 10, str(wrong_arch), 32)
    with pytest.raises(UserError, match="no such file"):
        build("conv3", 10, str(tmp_path / "missing.pth"), 32)
    with pytest.raises(UserError, match="unknown model"):
        build("resnet19", 10)
    with pytest.raises(UserError, match="head has 10 outputs but the dataset has 20"):
        build("conv3", 20, _ckpt(tmp_path, 10), 32)


def _ckpt(tmp_path, classes):
    path = tmp_path / f"conv3_{classes}.pth"
    torch.save({"model": build("conv3", classes, None, 32).model.state_dict()}, path)
    return str(path)


def test_head_name_finds_last_linear():
    assert head_name(build("vit_b_16", 5, None, 224).model) == "heads.head"
    assert head_name(build("mobilenet_v3_small", 5, None, 224).model) == "classifier.3"
