"""Hostile arguments and inputs (issue 22, second round): each ends in one line naming the argument or file and the
fix, exit code 2, never a traceback, never a run that claims success with nothing written."""

from __future__ import annotations

import os

import pytest

from rded_fast.cli import main


def max_workers() -> int:
    """The cap the rule gives here (rded_fast.device.max_workers), spelled out so the tests read on their own."""
    return 4 * len(os.sched_getaffinity(0))


def _distill(data, out, *extra, observer="conv3"):
    return [
        "distill",
        "--data",
        str(data),
        "--observer",
        observer,
        "--out",
        str(out),
        "--input-size",
        "32",
        "--factor",
        "1",
        "--ipc",
        "1",
        "--mipc",
        "4",
        "--num-crop",
        "2",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--quiet",
        *extra,
    ]


def _error(capsys) -> str:
    """The one stderr line of a refused command (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ---- 8: non-finite scores are an error naming the observer; nothing written is not a success ----------------


def test_nan_logits_are_an_error_naming_the_observer(jpeg_tree, tmp_path, capsys):
    name = "tests.observer_factories:nan_logits"
    assert main(_distill(jpeg_tree, tmp_path / "o", "--skip-observer-check", observer=name)) == 2
    err = _error(capsys)
    assert f"observer {name} gives NaN or infinite scores" in err and "--amp bf16" not in err
    assert not (tmp_path / "o").exists()  # refused in the check, before the output folder is made


def test_nan_scores_of_the_class_crops_are_caught_on_the_host_stage(jpeg_tree, tmp_path, capsys):
    """Whole images score finitely (the check passes); the padded cell crops give NaN: caught per class."""
    name = "tests.observer_factories:nan_when_padded"
    argv = _distill(jpeg_tree, tmp_path / "o", "--skip-observer-check", observer=name)
    argv[argv.index("--factor") + 1] = "2"
    assert main(argv) == 2
    assert f"observer {name} gives NaN or infinite scores for 8 of 8 crops of class class_0" in _error(capsys)


def test_fp16_overflow_suggests_another_amp(jpeg_tree, tmp_path, capsys):
    name = "tests.observer_factories:huge_logits"
    assert main(_distill(jpeg_tree, tmp_path / "o", "--skip-observer-check", "--amp", "fp16", observer=name)) == 2
    assert "use --amp bf16 or --amp none" in _error(capsys)
    assert main(_distill(jpeg_tree, tmp_path / "o32", "--skip-observer-check", "--amp", "none", observer=name)) == 0


def test_a_run_that_writes_no_image_does_not_succeed(tmp_path, capsys):
    from tests.conftest import write_synthetic_jpegs

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=3)
    argv = _distill(data, tmp_path / "o", "--skip-observer-check")
    argv[argv.index("--ipc") + 1] = "4"  # 4 cells, 3 images of one crop each: every class is skipped
    argv[argv.index("--num-crop") + 1] = "1"
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "no class got an image" in err and "class_00 has only 3 usable crops" in out
    assert "contact sheet" not in out and not (tmp_path / "o" / "contact_sheet.png").exists()


# ---- 9: --workers is capped at a multiple of the usable cores, in every command that takes it ---------------


@pytest.mark.parametrize(
    "argv",
    [
        ["distill", "--data", "d", "--observer", "conv3", "--out", "o"],
        ["convert", "--format", "dali", "--data", "d", "--out", "o"],
        ["bench", "--data", "d"],
    ],
)
def test_too_many_workers_are_refused_before_any_work(argv, capsys):
    assert main([*argv, "--workers", str(max_workers() + 1)]) == 2
    assert f"--workers {max_workers() + 1}: more than 4 per usable core" in _error(capsys)


def test_too_many_workers_are_refused_by_the_library_and_the_scripts(tmp_path):
    from rded_fast.benchmarks import make_imagenet_like
    from rded_fast.converters import convert
    from rded_fast.distill import DistillConfig, distill
    from rded_fast.errors import UserError

    too_many = max_workers() + 1
    with pytest.raises(UserError, match="--workers"):
        distill(DistillConfig(data="d", out=str(tmp_path / "o"), observer="conv3", workers=too_many))
    with pytest.raises(UserError, match="--workers"):
        convert("dali", "d", str(tmp_path / "s"), workers=too_many)
    with pytest.raises(SystemExit):
        make_imagenet_like.main(["--out", str(tmp_path / "t"), "--workers", str(too_many)])
    assert not (tmp_path / "t").exists()


# ---- 10, 11: input sizes a model cannot take, or that cannot fit ---------------------------------------------


@pytest.mark.parametrize("size, nearest", [(1, "8"), (7, "8"), (31, "24 or 32")])
def test_input_size_a_convnet_cannot_take_is_one_line(jpeg_tree, tmp_path, capsys, size, nearest):
    argv = _distill(jpeg_tree, tmp_path / "o")
    argv[argv.index("--input-size") + 1] = str(size)
    assert main(argv) == 2
    assert f"--input-size {size}: conv3 takes only multiples of 8 (8, 16, 24, ...); the nearest: {nearest}" in _error(capsys)
    assert main(["train-observer", "--data", str(jpeg_tree), "--out", str(tmp_path / "c.pth"), "--input-size", str(size)]) == 2
    assert f"--input-size {size}: conv3 takes only multiples of 8" in _error(capsys)
    assert not (tmp_path / "c.pth").exists()


@pytest.mark.parametrize("observer", ["conv3", "resnet18"])
def test_input_size_that_cannot_fit_is_refused_up_front(jpeg_tree, tmp_path, capsys, observer):
    argv = _distill(jpeg_tree, tmp_path / "o", "--skip-observer-check", observer=observer)
    argv[argv.index("--input-size") + 1] = "100000"
    assert main(argv) == 2
    err = _error(capsys)
    assert "--input-size 100000: scoring 8 crops at a time at 100000x100000 px needs at least" in err and "GiB free" in err
    assert not (tmp_path / "o").exists()


def test_memory_estimate_is_a_lower_bound_that_passes_ordinary_runs(jpeg_tree, monkeypatch):
    """The estimate counts the scoring chunk's float input and the larger uint8 crop buffer: at 2048 px, 8 crops of
    2048^2 x 3 floats (384 MiB) beside the check's 12 uint8 images (144 MiB) = 528 MiB; 32 px needs under 1 MiB."""
    from dataclasses import replace

    import torch

    from rded_fast import device as dev
    from rded_fast.distill import DistillConfig, check_memory
    from rded_fast.errors import UserError
    from rded_fast.index import build_index
    from rded_fast.plan import make_plan

    index = build_index(str(jpeg_tree), show_progress=False)
    plan = make_plan(index, 0, 4, 2)
    monkeypatch.setattr(dev, "available_memory", lambda device: 527 * 2**20)
    cfg = DistillConfig(data="d", out="o", observer="conv3", mipc=4, num_crop=2, input_size=32)
    check_memory(cfg, plan, index.num_classes, torch.device("cpu"))
    with pytest.raises(UserError, match="--input-size 2048: scoring 8 crops .* needs at least 0.5 GiB .* 0.5 GiB free"):
        check_memory(replace(cfg, input_size=2048), plan, index.num_classes, torch.device("cpu"))
    monkeypatch.setattr(dev, "available_memory", lambda device: 528 * 2**20)
    check_memory(replace(cfg, input_size=2048), plan, index.num_classes, torch.device("cpu"))


def test_a_model_too_large_for_memory_is_one_line(monkeypatch):
    """ConvNet-D's head grows with the input's square: an allocation failure while building is one line."""
    import dataclasses

    from rded_fast.errors import UserError
    from rded_fast.models import build, get_entry, registry

    def builder(num_classes, input_size):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 320000000000 bytes")

    monkeypatch.setitem(registry._MODELS, "conv3", dataclasses.replace(get_entry("conv3"), builder=builder))
    with pytest.raises(UserError, match="model conv3 at input size 64 does not fit in memory; lower --input-size"):
        build("conv3", 2, None, 64)
