"""Hostile arguments and inputs (issue 22, second round): each ends in one line naming the argument or file and the
fix, exit code 2, never a traceback, never a run that claims success with nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rded_fast.cli import main
from tests.conftest import _one_line_error as _error


def max_workers() -> int:
    """The cap the rule gives here (rded_fast.device.max_workers), spelled out so the tests read on their own."""
    return 4 * len(os.sched_getaffinity(0))


def _distill(data, out, *extra, **flags) -> list[str]:
    """A small distill command line; `flags` (observer=..., factor=2, input_size=7, ...) replace the defaults."""
    values = dict(observer="conv3", input_size=32, factor=1, ipc=1, mipc=4, num_crop=2, device="cpu", workers=0) | flags
    pairs = [("--data", data), ("--out", out)] + [("--" + k.replace("_", "-"), v) for k, v in values.items()]
    return ["distill", *(str(x) for pair in pairs for x in pair), "--quiet", *extra]


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
    assert main(_distill(jpeg_tree, tmp_path / "o", "--skip-observer-check", observer=name, factor=2)) == 2
    assert f"observer {name} gives NaN or infinite scores for 8 of 8 crops of class class_0" in _error(capsys)


def test_fp16_overflow_suggests_another_amp(jpeg_tree, tmp_path, capsys):
    name = "tests.observer_factories:huge_logits"
    assert main(_distill(jpeg_tree, tmp_path / "o", "--skip-observer-check", observer=name, amp="fp16")) == 2
    assert "use --amp bf16 or --amp none" in _error(capsys)
    assert main(_distill(jpeg_tree, tmp_path / "o32", "--skip-observer-check", observer=name, amp="none")) == 0


def test_a_run_that_writes_no_image_does_not_succeed(tmp_path, capsys):
    from tests.conftest import write_synthetic_jpegs

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=3)
    # 4 cells, 3 images of one crop each: every class is skipped
    assert main(_distill(data, tmp_path / "o", "--skip-observer-check", ipc=4, num_crop=1)) == 2
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
    assert main(_distill(jpeg_tree, tmp_path / "o", input_size=size)) == 2
    assert f"--input-size {size}: conv3 takes only multiples of 8 (8, 16, 24, ...); the nearest: {nearest}" in _error(capsys)
    assert main(["train-observer", "--data", str(jpeg_tree), "--out", str(tmp_path / "c.pth"), "--input-size", str(size)]) == 2
    assert f"--input-size {size}: conv3 takes only multiples of 8" in _error(capsys)
    assert not (tmp_path / "c.pth").exists()


@pytest.mark.parametrize("observer", ["conv3", "resnet18"])
def test_input_size_that_cannot_fit_is_refused_up_front(jpeg_tree, tmp_path, capsys, observer):
    assert main(_distill(jpeg_tree, tmp_path / "o", "--skip-observer-check", observer=observer, input_size=100000)) == 2
    err = _error(capsys)
    assert "--input-size 100000: scoring 8 crops at a time at 100000x100000 px needs at least" in err and "GiB free" in err
    assert not (tmp_path / "o").exists()


def test_memory_estimate_is_a_lower_bound_that_passes_ordinary_runs(jpeg_tree, monkeypatch):
    """The estimate counts the scoring chunk's float input and the larger uint8 crop buffer: at 2048 px, 8 crops of
    2048^2 x 3 floats (384 MiB) beside the check's 12 uint8 images (144 MiB) = 528 MiB; 32 px needs under 1 MiB."""
    from dataclasses import replace

    import torch

    from rded_fast import device as dev
    from rded_fast.distill import DistillConfig
    from rded_fast.errors import UserError
    from rded_fast.formats.folder import build_index
    from rded_fast.memory_check import check_memory
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


# ---- 13: a .beton damaged in ffcv's header or tables, same size ------------------------------------------------


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory, jpeg_tree):
    from rded_fast.converters.beton import convert as convert_beton

    beton = tmp_path_factory.mktemp("beton") / "train.beton"
    convert_beton(str(jpeg_tree), str(beton), workers=1, show_progress=False)
    return beton


@pytest.mark.parametrize("where", ["version", "num_samples", "metadata", "old sidecar"])
def test_damaged_beton_is_one_line(small_beton, tmp_path, capsys, where):
    import json
    import shutil

    from rded_fast.formats.beton import keep_torch_threads, sidecar_path

    beton = tmp_path / "train.beton"
    shutil.copy(small_beton, beton)
    with keep_torch_threads():
        from ffcv.reader import Reader

        reader = Reader(str(small_beton))
    tables = reader.header.nbytes + reader.field_descriptors.nbytes + reader.metadata.nbytes  # where samples start
    offset = {"version": 0, "num_samples": 8, "metadata": tables - 3, "old sidecar": 0}[where]
    side = json.loads(sidecar_path(small_beton).read_text())
    if where == "old sidecar":  # written before the sidecar recorded the hash: the header check alone
        side.pop("bookkeeping", None)
    sidecar_path(beton).write_text(json.dumps(side))
    data = bytearray(beton.read_bytes())
    data[offset] ^= 0x5A
    beton.write_bytes(bytes(data))
    assert main(_distill(beton, tmp_path / "o", "--skip-observer-check", loader="ffcv")) == 2
    assert f"--data {beton}: damaged" in _error(capsys) and not (tmp_path / "o").exists()


# ---- 15: a class map that is not UTF-8 --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding, what", [("latin-1", "byte 15 is 0xe9"), ("utf-16", "UTF-16 text")])
@pytest.mark.parametrize(
    "command",
    [
        ["distill", "--observer", "conv3", "--out", "o"],
        ["index", "--out", "i.npz"],
        ["convert", "--format", "dali", "--out", "s"],
    ],
)
def test_class_map_that_is_not_utf8_is_one_line(jpeg_tree, tmp_path, capsys, monkeypatch, encoding, what, command):
    monkeypatch.chdir(tmp_path)
    class_map = tmp_path / "classes.txt"
    class_map.write_text("class_00\nclass_é01\n", encoding=encoding)
    assert main([*command, "--data", str(jpeg_tree), "--class-map", str(class_map)]) == 2
    assert f"--class-map {class_map}: not UTF-8 ({what}); save it as UTF-8" in _error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt"]


# ---- 16: evaluate --labels hard needs no teacher -----------------------------------------------------------------


def test_evaluate_with_hard_labels_needs_no_teacher(jpeg_tree, tmp_path, capsys):
    import json

    from rded_fast.distill import DistillConfig, distill

    distilled = tmp_path / "set"
    distill(
        DistillConfig(
            data=str(jpeg_tree), out=str(distilled), observer="conv3", select="random-images", ipc=2, mipc=4, input_size=32,
            workers=0, device="cpu", show_progress=False,
        )
    )  # fmt: skip
    base = ["evaluate", "--distilled", str(distilled), "--val", str(jpeg_tree), "--student", "conv3", "--epochs", "1"]
    base += ["--device", "cpu", "--quiet"]
    assert main([*base, "--labels", "hard", "--json", str(tmp_path / "r.json")]) == 0
    assert "(hard labels, no teacher)" in capsys.readouterr().out
    parameters = json.loads((tmp_path / "r.json").read_text())["parameters"]
    assert parameters["teacher"] is None and parameters["teacher_used"] is None and parameters["soft_label_source"] == "hard"
    assert main(base) == 2  # soft labels (the default) come from a teacher
    assert "--labels soft (the default) needs the teacher that labels each batch: give --teacher NAME" in _error(capsys)


# ---- the weak list: one true line naming the fix ------------------------------------------------------------------


def _saved_conv3(path: Path, classes: int) -> Path:
    import torch

    from rded_fast.models import build

    torch.manual_seed(0)
    torch.save({"model": build("conv3", classes, None, 32).model.state_dict()}, path)
    return path


def test_empty_class_folders_are_counted_and_named(tmp_path, capsys):
    from tests.conftest import write_synthetic_jpegs

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=3)
    for i in range(5):
        (data / f"zz_empty_{i}").mkdir()
    assert main(["index", "--data", str(data), "--out", str(tmp_path / "i.npz"), "--quiet"]) == 0
    assert "note: 5 of the 7 class folders hold no image (zz_empty_0, zz_empty_1, zz_empty_2, ...)" in capsys.readouterr().out
    weights = _saved_conv3(tmp_path / "w.pth", 2)
    assert main(_distill(data, tmp_path / "o", weights=weights)) == 2
    err = _error(capsys)
    assert "head has 2 outputs but the dataset has 7 classes" in err and "5 of the 7 class folders hold no image" in err


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_shards_without_their_dataset_file_are_named(tmp_path, capsys, loader):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-00000.tar").write_bytes(b"\0" * 1024)
    (tmp_path / "shards" / "shard-00000.idx").write_text("")
    assert main(_distill(tmp_path / "shards", tmp_path / "o", loader=loader)) == 2
    assert "holds tar shards (shard-00000.tar, ...) but no dataset.json" in _error(capsys)


def test_models_filter_names_only_what_was_given(capsys):
    assert main(["models", "--family", "nosuch"]) == 2
    err = _error(capsys)
    assert "no models with --family nosuch;" in err and "None" not in err and "--source" not in err


@pytest.mark.parametrize("command", ["evaluate", "relabel"])
def test_a_set_without_manifest_names_the_real_fix(tmp_path, capsys, command):
    from tests.conftest import write_synthetic_jpegs

    distilled = write_synthetic_jpegs(tmp_path / "set", classes=2, per_class=2)
    argv = [command, "--distilled", str(distilled), "--teacher", "conv3", "--device", "cpu", "--quiet"]
    argv += ["--val", str(distilled), "--student", "conv3"] if command == "evaluate" else ["--out", str(tmp_path / "l")]
    assert main(argv) == 2
    err = _error(capsys)
    assert f"--distilled {distilled}: no manifest.json" in err and "rded-fast distill" in err and "--factor" not in err
    (distilled / "manifest.json").write_text("{not json")
    assert main(argv) == 2
    assert "manifest.json is damaged" in _error(capsys)


def test_weights_that_are_not_a_checkpoint_say_what_they_are(jpeg_tree, tmp_path, capsys):
    (tmp_path / "random.pth").write_bytes(bytes(range(7, 256)) * 20)
    (tmp_path / "folder").mkdir()
    _saved_conv3(tmp_path / "folder" / "model.pth", 3)
    for weights, says in (
        (tmp_path / "random.pth", "not a checkpoint (torch.save writes a zip archive or a pickle; this file is neither)"),
        (tmp_path / "folder", "is a folder, not a checkpoint file; give the checkpoint file itself (it holds model.pth)"),
    ):
        for observer in ("conv3", "resnet18"):
            assert main(_distill(jpeg_tree, tmp_path / "o", weights=weights, observer=observer)) == 2
            err = _error(capsys)
            assert says in err and "Python objects" not in err and "no such file" not in err


def test_convert_names_the_class_folders_its_class_map_leaves_out(jpeg_tree, tmp_path, capsys):
    (tmp_path / "map.txt").write_text("class_00\nclass_02\n")
    argv = ["convert", "--format", "dali", "--data", str(jpeg_tree), "--out", str(tmp_path / "s"), "--quiet"]
    assert main([*argv, "--class-map", str(tmp_path / "map.txt")]) == 0
    err = capsys.readouterr().err
    assert "note: --class-map does not name 1 class folder(s) of --data; NOT converted: class_01" in err


def test_torch_home_that_is_a_file_is_named(tmp_path, monkeypatch):
    from rded_fast.errors import UserError
    from rded_fast.models import build

    (tmp_path / "home").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match=f"TORCH_HOME {tmp_path / 'home'} is a file; set TORCH_HOME to a folder") as info:
        build("resnet18", 2, "IMAGENET1K_V1", 32)
    assert "home/hub/checkpoints" not in str(info.value)


def test_offline_pretrained_download_fails_fast_without_retries(monkeypatch):
    """Without network, the hub is put in offline mode for the call (its cache only) instead of retrying ~40 s."""
    pytest.importorskip("timm")
    import timm
    from huggingface_hub import constants

    from rded_fast.errors import UserError
    from rded_fast.models import build, timm_source

    seen = []

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            seen.append(constants.HF_HUB_OFFLINE)
            raise RuntimeError("not in the local cache")
        return real(name, pretrained=False, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm_source, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match="timm could not load the pretrained weights"):
        build("timm:resnet18", 2, "a1_in1k", 32)
    assert seen == [True] and constants.HF_HUB_OFFLINE is False  # offline for the call only


def test_manifest_and_journal_record_how_the_observer_scored(jpeg_tree, tmp_path, monkeypatch):
    import json

    from rded_fast import device
    from rded_fast.distill import DistillConfig, distill
    from rded_fast.errors import UserError

    base = dict(data=str(jpeg_tree), out=str(tmp_path / "o"), observer="conv3", weights=str(_saved_conv3(tmp_path / "w.pth", 3)))
    base.update(ipc=1, mipc=4, num_crop=2, input_size=32, workers=0, device="cpu", skip_observer_check=True, show_progress=False)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    distill(DistillConfig(**base))
    scoring = json.loads((tmp_path / "o" / "manifest.json").read_text())["observer"]["scoring"]
    assert scoring["amp"] == "fp32" and scoring["compile"] is False and scoring["device"].startswith("cpu")
    assert {"model", "native_bf16", "flags", "cores"} <= set(scoring["cpu"])
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)  # the same command on a CPU with native bf16
    with pytest.raises(UserError, match="--resume: scored_on.amp was 'fp32'.* now 'bf16'"):
        distill(DistillConfig(**base, resume=True))


def test_one_version_and_a_changelog_entry_for_it():
    import re

    import rded_fast

    root = Path(__file__).resolve().parent.parent
    assert "version=VERSION" in (root / "setup.py").read_text()  # read from rded_fast/__init__.py, not written twice
    assert not re.search(r'version="\d', (root / "setup.py").read_text())
    assert f"## {rded_fast.__version__} (" in (root / "CHANGELOG.md").read_text()
