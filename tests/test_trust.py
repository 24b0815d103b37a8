"""What is checked, not trusted (issue 35): the resume's journal against the class order and the sources, the index
cache against the tree, shard contents against their sidecar, and the Python API's arguments as the command line's."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from rded_fast.distill import DistillConfig, distill
from rded_fast.errors import UserError

# ---- the Python API checks its arguments as the command line does ---------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ipc", 2.5, "--ipc 2.5: must be an integer"),
        ("mipc", math.inf, "--mipc inf: must be an integer"),
        ("input_size", 32.0, "--input-size 32.0: must be an integer"),
        ("num_crop", None, "--num-crop None: a value is required"),
        ("seed", True, "--seed True: must be an integer"),
        ("hw_decoder_load", math.nan, "--hw-decoder-load nan: must be a finite number"),
        ("crop_scale", (0.5, "1"), "--crop-scale (0.5, '1'): must be 2 finite numbers"),
        ("overwrite", "no", "--overwrite 'no': must be True or False"),
        ("device", 0, "--device 0: must be a string"),
    ],
)
def test_distill_api_refuses_wrong_types_before_any_work(small, tmp_path, field, value, message):
    data, weights = small
    cfg = dict(data=str(data), out=str(tmp_path / "o"), observer="conv3", weights=str(weights), input_size=32, factor=1)
    cfg.update(ipc=1, mipc=4, num_crop=1, workers=0, device="cpu", show_progress=False, skip_observer_check=True)
    with pytest.raises(UserError, match="^" + re.escape(message)):
        distill(DistillConfig(**{**cfg, field: value}))
    assert not (tmp_path / "o").exists()


def test_distill_api_takes_paths_as_pathlib_paths(small, tmp_path):
    data, weights = small
    r = distill(
        DistillConfig(
            data=data,
            out=tmp_path / "o",
            observer="conv3",
            weights=weights,
            input_size=32,
            factor=1,
            ipc=1,
            mipc=4,
            num_crop=1,
            workers=0,
            device="cpu",
            show_progress=False,
            skip_observer_check=True,
        )
    )
    assert r.num_images == 2


@pytest.mark.parametrize("num_classes", [0, -1, 2.5, None])
def test_build_refuses_a_class_count_that_is_not_a_positive_integer(num_classes):
    from rded_fast import build

    with pytest.raises(UserError, match=r"^build\('conv3'\): num_classes .*: must be (>= 1|an integer)$"):
        build("conv3", num_classes, None, 32)


@pytest.mark.parametrize(
    "field, value, message",
    [("epochs", 2.5, "--epochs 2.5: must be an integer"), ("lr", math.inf, "--lr inf: must be a finite number")],
)
def test_train_observer_api_refuses_wrong_types(small, tmp_path, field, value, message):
    from rded_fast import ObserverConfig, train_observer

    data, _ = small
    with pytest.raises(UserError, match="^" + re.escape(message)):
        train_observer(ObserverConfig(data=str(data), out=str(tmp_path / "obs.pth"), device="cpu", **{field: value}))
    assert not (tmp_path / "obs.pth").exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 2.5, "--epochs 2.5: must be an integer"),
        ("batch_size", 0, "--batch-size 0: must be >= 1"),
        ("lr", 0.0, "--lr 0.0: must be > 0"),
        ("top_k", math.inf, "--top-k inf: must be an integer"),
        ("labels", "onehot", "--labels 'onehot': choose one of soft, hard"),
        ("resume", None, "--resume None: a value is required"),
    ],
)
def test_student_config_is_checked_as_the_command_line_checks_it(field, value, message):
    from rded_fast import StudentConfig
    from rded_fast.train.validate import validate_student_config

    assert validate_student_config(StudentConfig(distilled=Path("d"))).distilled == "d"
    with pytest.raises(UserError, match="^" + re.escape(message)):
        validate_student_config(StudentConfig(distilled="d", **{field: value}))
