"""The student engine: many seeds in one process, the teacher check, the decoded-val cache, stored labels' recipe
version, the distilled set as its manifest lists it, and the compiled step."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from rded_fast.errors import UserError
from rded_fast.train import val_cache
from rded_fast.train.distilled_set import load_distilled
from rded_fast.train.student import StudentConfig, evaluate, relabel

TINY = "tests.observer_factories:tiny_student"


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    from rded_fast.data import fashion_mnist

    return fashion_mnist.write_image_folder(tmp_path_factory.mktemp("val") / "test", "test", per_class=20, show_progress=False)


def _base(distilled, observer, val_dir, **kw) -> dict:
    base = dict(teacher="conv3", teacher_weights=str(observer), student=TINY, epochs=2, device="cpu", show_progress=False)
    return {**base, "distilled": str(distilled), "val": str(val_dir), **kw}


def test_many_seeds_train_each_as_its_single_run(factor2_distilled, fashion_observer, val):
    """Own initialisation, augmentation and dropout stream per seed; the teacher labels both students' batches in
    one call: each student's losses and accuracy equal the single run's, bit for bit."""
    both = evaluate(StudentConfig(**_base(factor2_distilled, fashion_observer, val, seeds=(3, 5))))
    alone = {s: evaluate(StudentConfig(**_base(factor2_distilled, fashion_observer, val, seed=s))) for s in (3, 5)}
    assert [r["seed"] for r in both["runs"]] == [3, 5] and both["parameters"]["seeds"] == [3, 5]
    for run in both["runs"]:
        single = alone[run["seed"]]
        assert run["epoch_loss"] == single["epoch_loss"] and run["final_top1"] == single["final_top1"]
    assert alone[3]["epoch_loss"] != alone[5]["epoch_loss"]
    assert both["final_top1"] == pytest.approx((alone[3]["final_top1"] + alone[5]["final_top1"]) / 2)
    assert both["final_top1_std"] >= 0 and both["train_img_per_s"] > 0
    assert set(both["fixed_seconds"]) >= {"set_load", "val_load", "teacher_check", "compile"}
    assert both["teacher_check"]["accuracy"] > both["teacher_check"]["threshold"]


def test_permuted_val_folders_are_refused_before_epoch_0(factor2_distilled, fashion_observer, val, tmp_path, monkeypatch):
    swapped = tmp_path / "val"
    names = sorted(p.name for p in val.iterdir() if p.is_dir())
    for i, name in enumerate(names):  # each folder holds the next class's images
        shutil.copytree(val / names[(i + 1) % len(names)], swapped / name)
    from rded_fast.train import student

    monkeypatch.setattr(student, "train_epoch", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(UserError, match="near chance.*class order.*--skip-teacher-check"):
        evaluate(StudentConfig(**_base(factor2_distilled, fashion_observer, swapped)))
    monkeypatch.undo()
    result = evaluate(StudentConfig(**_base(factor2_distilled, fashion_observer, swapped, epochs=1, skip_teacher_check=True)))
    assert result["teacher_check"] is None


def test_decoded_val_is_cached_on_disk_and_a_changed_file_is_noticed(val, tmp_path, monkeypatch):
    from rded_fast.formats.folder import build_index

    monkeypatch.setenv("RDED_FAST_CACHE", str(tmp_path / "cache"))
    tree = shutil.copytree(val, tmp_path / "val")
    index = lambda: build_index(tree, show_progress=False, headers=False)
    loads = []
    for _ in range(2):
        val_cache._IN_PROCESS.clear()  # a new process
        loads.append(val_cache.load_val(index(), 32, show_progress=False))
    assert [source for *_, source in loads] == ["decoded", "disk"]
    assert torch.equal(loads[0][0], loads[1][0]) and torch.equal(loads[0][1], loads[1][1])
    some = sorted(tree.rglob("*.png"))[3]
    os.utime(some, ns=(some.stat().st_atime_ns, some.stat().st_mtime_ns + 10**9))
    val_cache._IN_PROCESS.clear()
    assert val_cache.load_val(index(), 32, show_progress=False)[2] == "decoded"
    entries = sorted(p.name for p in (tmp_path / "cache" / "val").iterdir())
    assert len(entries) == 2
    # the bound: one entry's worth; the least recently used goes, a file not ours stays
    (tmp_path / "cache" / "val" / "mine.txt").write_text("user's")
    monkeypatch.setenv("RDED_FAST_CACHE_GB", str(1.5 * loads[0][0].numel() / 2**30))
    val_cache._IN_PROCESS.clear()
    assert val_cache.load_val(index(), 16, show_progress=False)[2] == "decoded"
    left = sorted(p.name for p in (tmp_path / "cache" / "val").iterdir())
    assert "mine.txt" in left and len(left) == 3 and not set(entries) <= set(left)


def test_stored_labels_of_another_recipe_version_are_refused(factor2_distilled, fashion_observer, val, tmp_path):
    base = _base(factor2_distilled, fashion_observer, val, epochs=1)
    stored = relabel(StudentConfig(**base, out=str(tmp_path / "labels")))
    assert stored["top_k"] == 10 and stored["teacher_check"]["images"] > 0
    header_path = tmp_path / "labels" / "header.json"
    header = json.loads(header_path.read_text())
    assert header["recipe_version"] == 2
    evaluate(StudentConfig(**base, soft_labels=str(tmp_path / "labels")))
    header_path.write_text(json.dumps({**header, "recipe_version": 1}))
    with pytest.raises(UserError, match="recipe version 1.*rded-fast relabel"):
        evaluate(StudentConfig(**base, soft_labels=str(tmp_path / "labels")))


def test_the_set_is_what_the_manifest_lists(factor2_distilled, tmp_path):
    root = shutil.copytree(factor2_distilled, tmp_path / "d")
    listed = [m["file"] for m in json.loads((root / "manifest.json").read_text())["images"]]
    (root / listed[0]).unlink()  # deleted
    (root / listed[1]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # damaged
    shutil.copy(root / listed[2], root / listed[2].replace(".png", "_extra.png"))  # stray
    data = load_distilled(root)
    assert data.files == listed[2:] and len(data.images) == len(listed) - 2
    text = " | ".join(data.notes)
    assert "1 image(s) the manifest lists are missing" in text and listed[0] in text
    assert "could not be decoded" in text and listed[1] in text
    assert "not in the manifest" in text and "_extra.png" in text


def test_compiled_steps_match_eager_and_compile_once(factor2_distilled, fashion_observer, val):
    from torch._dynamo.utils import counters

    student = "tests.observer_factories:tiny_student_without_dropout"  # compiled dropout draws its own random numbers
    base = _base(factor2_distilled, fashion_observer, val, labels="hard", teacher=None, student=student, epochs=3, amp="none")
    eager = evaluate(StudentConfig(**base, compile="off"))
    before = counters["stats"]["unique_graphs"]
    compiled = evaluate(StudentConfig(**base, compile="on", seeds=(0, 1)))
    assert compiled["parameters"]["resolved_compile"] and not eager["parameters"]["resolved_compile"]
    assert compiled["fixed_seconds"]["compile"] > 0 and eager["fixed_seconds"]["compile"] == 0
    graphs = counters["stats"]["unique_graphs"] - before
    assert 0 < graphs <= 2  # the step and the BN refresh, one batch shape, for both students
    np.testing.assert_allclose(compiled["runs"][0]["epoch_loss"], eager["epoch_loss"], rtol=1e-4)


def test_bench_train_reports_the_engine_beside_its_model_only_loop(tmp_path):
    from rded_fast.cli import main

    out = tmp_path / "train.json"
    argv = ["bench", "--stage", "train", "--observer", "conv3", "--student", TINY, "--input-size", "32", "--factor", "2"]
    argv += ["--ipc", "4", "--classes", "3", "--epochs", "2", "--seeds", "2", "--device", "cpu", "--compile", "off"]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["labels"] == "online" and result["images"] == 12 and result["batch_size"] == 12
    assert result["engine"]["samples"] == result["model_only"]["samples"] == 2 * 12 * 2
    assert result["engine"]["img_per_s"] > 0 and result["model_only"]["img_per_s"] > 0
    assert result["fraction_of_model_only"] == pytest.approx(result["model_only"]["seconds"] / result["engine"]["seconds"])
    assert result["cpu"]["cores"] >= 1 and not result["compiled"]


def test_the_teacher_check_samples_every_part_of_a_large_class_list():
    """More classes than the check's images: the sample is spread over all of them, not the first ones only."""
    import numpy as np

    from rded_fast.train.teacher import check_sample

    labels = np.repeat(np.arange(1000), 50)
    picked = labels[check_sample(labels, seed=0, limit=500)]
    assert len(picked) == 500 and picked.max() >= 900 and picked.min() < 100
