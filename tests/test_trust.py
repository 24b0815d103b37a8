"""What is checked, not trusted (issue 35): the resume's journal against the class order and the sources, the index
cache against the tree, shard contents against their sidecar, and the Python API's arguments as the command line's."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from rded_fast.cli import main
from rded_fast.distill import DistillConfig, distill
from rded_fast.errors import UserError
from rded_fast.index import load_index
from tests.conftest import _distill_argv, _one_line_error, age_folders, tree_digest, write_synthetic_jpegs

# ---- resume: the journal is checked against the class order and the sources ------------------------------


def test_resume_refuses_a_class_map_reordered_in_place(small, tmp_path, capsys):
    data, weights = small
    out, class_map = tmp_path / "o", tmp_path / "map.txt"
    class_map.write_text("class_00\nclass_01\n")
    assert main(_distill_argv(data, weights, out, "--class-map", str(class_map))) == 0
    (out / ".rded-journal" / "class_000001.json").unlink()  # as if killed before class_01 was journaled
    before = tree_digest(out)
    class_map.write_text("class_01\nclass_00\n")
    capsys.readouterr()
    assert main(_distill_argv(data, weights, out, "--class-map", str(class_map), "--resume")) == 2
    err = _one_line_error(capsys)
    assert "the class order changed" in err and "class 0 was 'class_00', now 'class_01'" in err and "--overwrite" in err
    assert tree_digest(out) == before  # nothing written, nothing removed


def test_a_redone_class_leaves_none_of_its_old_images(small, tmp_path, capsys):
    """A finished class whose sources changed is redone; when the redo gives no image (its images were removed),
    the images its journal record listed are gone too: nothing outside the manifest stays in the class folder."""
    data, weights = small
    data = Path(shutil.copytree(data, tmp_path / "data2"))
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0
    assert list((out / "class_00").iterdir())
    (out / ".rded-journal" / "class_000001.json").unlink()  # killed before class_01
    for image in (data / "class_00").iterdir():
        image.unlink()
    capsys.readouterr()
    assert main(_distill_argv(data, weights, out, "--resume")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["redone_classes"] == ["class_00"] and "class_00" in manifest["skipped_classes"]
    assert sorted(p.name for p in (out / "class_00").iterdir()) == []
    assert {m["file"] for m in manifest["images"]} == {str(p.relative_to(out)) for p in out.glob("class_*/*.png")}


def test_resume_from_another_working_directory_with_relative_paths(small, tmp_path, monkeypatch):
    data, weights = small
    (tmp_path / "elsewhere").mkdir()
    base = dict(
        observer="conv3",
        ipc=1,
        factor=1,
        mipc=4,
        num_crop=1,
        input_size=32,
        workers=0,
        device="cpu",
        skip_observer_check=True,
        show_progress=False,
    )
    monkeypatch.chdir(tmp_path)
    distill(DistillConfig(data="data", out="o", weights="w.pth", **base))
    (tmp_path / "o" / ".rded-journal" / "class_000001.json").unlink()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = distill(DistillConfig(data="../data", out="../o", weights="../w.pth", resume=True, **base))
    assert r.num_images == 2


# ---- the Python API checks its arguments as the command line does ---------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ipc", 2.5, "--ipc 2.5: must be an integer"),
        ("mipc", math.inf, "--mipc inf: must be an integer"),
        ("input_size", 32.0, "--input-size 32.0: must be an integer"),
        ("num_crop", None, "--num-crop None: a value is required"),
        ("seed", True, "--seed True: must be an integer"),
        ("loader_options", {"hw_decoder_load": math.nan}, "--hw-decoder-load nan: must be a finite number"),
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


# ---- the index cache is checked against the tree -------------------------------------------------------------


def _random_crops_argv(data, cache, out, *extra):
    """A small random-crops distill (no observer needed) with the index cache `cache`."""
    fixed = "--observer conv3 --input-size 32 --factor 1 --ipc 1 --mipc 50 --num-crop 1 --device cpu --workers 0 --quiet"
    return [
        "distill",
        "--data",
        str(data),
        "--index",
        str(cache),
        "--out",
        str(out),
        "--select",
        "random-crops",
        *fixed.split(),
        *extra,
    ]


@pytest.fixture
def indexed_tree(tmp_path, capsys):
    """2 classes x 4 JPEGs at rest (folders dated back) and their complete index cache from `rded-fast index`."""
    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=4)
    age_folders(data)
    cache = tmp_path / "index.npz"
    assert main(["index", "--data", str(data), "--out", str(cache), "--quiet"]) == 0
    capsys.readouterr()
    return data, cache


def test_images_and_class_folders_added_after_indexing_are_used(indexed_tree, tmp_path, capsys):
    data, cache = indexed_tree
    more = write_synthetic_jpegs(tmp_path / "more", classes=3, per_class=6, seed=1)
    for image in (more / "class_00").iterdir():
        shutil.copy(image, data / "class_00" / f"new_{image.name}")
    shutil.copytree(more / "class_02", data / "class_02")
    assert main(_random_crops_argv(data, cache, tmp_path / "o")) == 0
    err = capsys.readouterr().err
    assert "2 folder(s) of" in err and "changed since the cache was written (the data root, class_00)" in err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["short_classes"] == {"class_00": 10, "class_01": 4, "class_02": 6}
    assert load_index(cache).classes == ["class_00", "class_01", "class_02"] and len(load_index(cache)) == 20


def test_a_removed_image_is_not_planned_from_a_stale_cache(indexed_tree, tmp_path, capsys):
    data, cache = indexed_tree
    (data / "class_01" / "img_000.jpg").unlink()
    assert main(_random_crops_argv(data, cache, tmp_path / "o")) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["short_classes"] == {"class_00": 4, "class_01": 3} and not manifest["decode_failures"]
    assert manifest["skipped_files"] == []  # gone from the tree, not "a file that is not a readable image"


def test_a_truncated_index_cache_of_ours_is_named_so_and_rebuilt(indexed_tree, tmp_path, capsys):
    data, cache = indexed_tree
    whole = cache.read_bytes()
    cache.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match="a damaged or truncated index cache of rded-fast .*delete it .* to rebuild it"):
        load_index(cache)
    assert main(_random_crops_argv(data, cache, tmp_path / "o")) == 0
    assert "a damaged or truncated index cache of rded-fast (BadZipFile); it is rebuilt" in capsys.readouterr().err
    assert len(load_index(cache)) == 8


def test_a_complete_index_cache_on_read_only_storage_is_used(indexed_tree, tmp_path, monkeypatch):
    """Read-only storage simulated (root may write anywhere): nothing can be created in the cache's folder."""
    import errno
    import tempfile

    data, cache = indexed_tree
    before = cache.read_bytes()
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == cache.parent.resolve():
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    (tmp_path / "outs").mkdir()
    assert main(_random_crops_argv(data, cache, tmp_path / "outs" / "o")) == 0
    assert cache.read_bytes() == before


# ---- shard contents are checked against their sidecar; a resume sees a new conversion ------------------------


def _one_image_shards(data: Path, out: Path) -> None:
    """`data` converted to one image per shard: tiny JPEGs, so every tar is one 10 KiB tar record long."""
    assert main(["convert", "--format", "dali", "--data", str(data), "--out", str(out), "--shard-size", "1", "--quiet"]) == 0


def test_two_same_size_shards_swapped_are_refused(small, tmp_path, capsys):
    from rded_fast.formats import open as open_source

    data, weights = small
    shards = tmp_path / "shards"
    _one_image_shards(data, shards)
    a, b = shards / "shard-00000.tar", shards / "shard-00004.tar"  # class_00's first image, class_01's first
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    a.rename(tmp_path / "a.tar")
    b.rename(a)
    (tmp_path / "a.tar").rename(b)
    with pytest.raises(UserError, match="shard-00000.tar: its first and last images are not those dataset.json records"):
        open_source(shards)
    capsys.readouterr()
    assert main(_distill_argv(shards, weights, tmp_path / "o", "--loader", "tvjpeg")) == 2
    assert "shards swapped, replaced, or from another conversion" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_resume_redoes_the_classes_of_shards_converted_again_from_changed_images(small, tmp_path, capsys):
    from PIL import Image

    data, weights = small
    data = Path(shutil.copytree(data, tmp_path / "data2"))
    shards, out, fresh = tmp_path / "shards", tmp_path / "o", tmp_path / "fresh"
    _one_image_shards(data, shards)
    argv = lambda where, *extra: _distill_argv(shards, weights, where, "--loader", "tvjpeg", *extra)  # noqa: E731
    assert main(argv(out)) == 0
    (out / ".rded-journal" / "class_000001.json").unlink()  # as if killed before class_01
    for image in (data / "class_00").iterdir():  # the images change, their pixel sizes do not
        with Image.open(image) as im:
            Image.fromarray(255 - np.asarray(im.convert("RGB"))).save(image, quality=90)
    _one_image_shards(data, shards)  # the same command again: the changed images' shards are rewritten
    capsys.readouterr()
    assert main(argv(out, "--resume")) == 0
    assert "redone because their source images changed" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["redone_classes"] == ["class_00"]
    assert main(argv(fresh)) == 0  # the same bytes as a fresh run on the new shards
    images = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in root.glob("class_*/*")}  # noqa: E731
    assert images(out) == images(fresh)
    assert (
        json.loads((out / "manifest.json").read_text())["images"] == json.loads((fresh / "manifest.json").read_text())["images"]
    )


def test_a_users_dataset_json_or_stray_tar_does_not_make_an_image_folder_shards(tmp_path):
    from rded_fast.formats import FOLDER, detect, open as open_source

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=2)
    (data / "backup.tar").write_bytes(b"\0" * 1024)
    assert open_source(data, show_progress=False).index.classes == ["class_00", "class_01"]
    (data / "dataset.json").write_text('{"name": "my photos", "format": "jpeg"}')
    assert detect(data) == FOLDER and len(open_source(data, show_progress=False).index) == 4


def test_a_renamed_beton_is_recognised_by_its_content(tmp_path, capsys):
    from rded_fast.formats import BETON, detect
    from rded_fast.formats.beton import FFCV_HEADER

    header = np.zeros(1, FFCV_HEADER)
    header[0] = (2, 2, 1 << 21, 10, 4096)
    renamed = tmp_path / "train.bin"
    renamed.write_bytes(header.tobytes() + b"\0" * 8192)
    assert detect(renamed) == BETON
    assert main(["distill", "--data", str(renamed), "--observer", "conv3", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert "an FFCV .beton (by its content) under another name" in err and "NAME.beton beside NAME.beton.json" in err


# ---- crop arguments that would only mislead ----------------------------------------------------------------


def test_crops_under_a_pixel_are_refused(small, tmp_path, capsys):
    data, weights = small
    assert main(_distill_argv(data, weights, tmp_path / "o", "--crop-scale", "1e-6,1e-6")) == 2
    err = _one_line_error(capsys)
    assert "--crop-scale 1e-06,1e-06: its largest crop is under one pixel on 8 planned image(s)" in err and "0.08,1" in err
    assert not (tmp_path / "o").exists()


def test_whole_images_with_several_crops_are_refused_and_the_advice_fits(small, tmp_path, capsys):
    data, weights = small
    assert main(_distill_argv(data, weights, tmp_path / "o", "--crop-scale", "1", "--num-crop", "5")) == 2
    assert "--crop-scale 1 with --num-crop 5: every crop is the whole image" in _one_line_error(capsys)
    argv = _distill_argv(data, weights, tmp_path / "o", "--crop-scale", "1", "--ipc", "5", "--mipc", "5")
    assert main(argv) == 2  # 4 images a class, 5 cells: no class gets an image
    skipped = json.loads((tmp_path / "o" / "manifest.json").read_text())["skipped_classes"]
    assert set(skipped) == {"class_00", "class_01"}
    assert all("at --crop-scale 1 every crop of an image is the same" in r and "--num-crop" not in r for r in skipped.values())


def test_rded_cover_says_why_it_needs_a_linear_head(small, tmp_path, capsys):
    data, _ = small
    argv = _distill_argv(data, "x", tmp_path / "o", "--select", "rded-cover")
    argv[argv.index("--weights") : argv.index("--weights") + 2] = []
    argv[argv.index("conv3")] = "tests.observer_factories:fixed_conv_head"
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "--select rded-cover: observer tests.observer_factories:fixed_conv_head has no Linear classifier head" in err
    assert "use --select rded, which scores with any observer" in err


def test_random_images_names_the_crop_arguments_it_ignores(small, tmp_path, capsys):
    data, weights = small
    argv = _distill_argv(data, weights, tmp_path / "o", "--select", "random-images", "--factor", "3", "--num-crop", "3")
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "note: --select random-images uses one whole image (its centred square) per output image" in err
    assert "--factor 3, --num-crop 3 do not apply and are ignored" in err
    argv = _distill_argv(data, weights, tmp_path / "o2", "--select", "random-images")
    assert main(argv) == 0 and "random-images" not in capsys.readouterr().err  # --factor 1 --num-crop 1: what it uses


def test_a_val_folder_lacking_classes_is_named_for_the_caller(tmp_path):
    from rded_fast.formats.folder import build_index

    val = write_synthetic_jpegs(tmp_path / "val", classes=1, per_class=1)
    with pytest.raises(UserError, match=r"^class map names 1 folder\(s\) missing"):  # the default wording stays
        build_index(val, class_map=["class_00", "digit7"], show_progress=False)
    with pytest.raises(UserError) as info:
        build_index(val, class_map=["class_00", "digit7"], show_progress=False, flag="--val", classes_from="the distilled set")
    assert str(info.value) == (
        f"--val {val} lacks 1 class folder(s) of the distilled set, e.g. 'digit7'; give --val a folder for every class of "
        "the distilled set"
    )
