"""The baselines select what they say: random-images are whole source images, random-crops are RDED's cells
chosen at random (and `random` is that)."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rded_fast.distill import distill
from rded_fast.errors import UserError
from rded_fast.loaders.torch_loader import cut_crops, decode_rgb
from tests.conftest import fashion_config, random_observer


def test_random_images_are_whole_images_at_the_input_size(jpeg_tree, tmp_path):
    weights = random_observer(tmp_path, 3)
    run = distill(fashion_config(jpeg_tree, weights, tmp_path / "ri", select="random-images", ipc=3, factor=2, mipc=8))
    manifest = json.loads(run.manifest.read_text())
    assert manifest["parameters"]["factor"] == 1 and manifest["parameters"]["select"] == "random-images"
    assert run.num_images == 9 and manifest["observer"]["check"] is None
    per_class = {}
    for meta in manifest["images"]:
        (cell,) = meta["cells"]  # one cell: the whole image
        w, h = cell["source_size"]
        side = min(w, h)
        assert cell["box"] == [(h - side) // 2, (w - side) // 2, side, side] and cell["score"] is None
        image = decode_rgb(str(jpeg_tree / cell["source"]))
        expect = cut_crops(image, np.array([cell["box"]]), 32)[0]
        with Image.open(run.out / meta["file"]) as im:
            assert im.size == (32, 32) and torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), expect)
        per_class.setdefault(meta["class"], set()).add(cell["source"])
    assert all(len(sources) == 3 for sources in per_class.values())  # distinct images within a class


def test_random_is_random_crops(jpeg_tree, tmp_path):
    weights = random_observer(tmp_path, 3)
    runs = [
        distill(fashion_config(jpeg_tree, weights, tmp_path / name, select=name, ipc=2, factor=2, mipc=8))
        for name in ("random", "random-crops")
    ]
    files = [sorted(p.relative_to(r.out) for p in r.out.rglob("*.png") if p.name != "contact_sheet.png") for r in runs]
    assert files[0] == files[1] and len(files[0]) == 6
    for rel in files[0]:
        assert (runs[0].out / rel).read_bytes() == (runs[1].out / rel).read_bytes()
    cells = json.loads(runs[1].manifest.read_text())["images"][0]["cells"]
    assert len(cells) == 4 and all(c["score"] is None for c in cells)


def test_mixed_targets_give_the_pasted_box_to_the_partner():
    from rded_fast.train.augment import aug_constants, mixed_targets, prepare_epoch, sample_epoch

    aug = sample_epoch(3, 0, n=12, batch_size=5, factor=1, size=16)
    labels = torch.arange(12) % 4
    for b in range(aug.num_batches):
        t = mixed_targets(labels, prepare_epoch(aug, aug_constants(16, 1, torch.device("cpu"))), 4)[aug.batch_slice(b)]
        sl = aug.batch_slice(b)
        r1, c1, r2, c2 = aug.mix_box[b].tolist()
        share = (r2 - r1) * (c2 - c1) / 256
        assert torch.allclose(t.sum(1), torch.ones(len(t)))
        own, partner = labels[aug.order[sl]], labels[aug.order[sl]][aug.mix_perm[sl]]
        for i in range(len(t)):
            expect = torch.zeros(4)
            expect[own[i]] += 1 - share
            expect[partner[i]] += share
            assert torch.allclose(t[i], expect)


def test_hard_labels_need_no_teacher_and_bn_refresh_counts_twice(jpeg_tree, tmp_path):
    from rded_fast.train import student as student_mod
    from rded_fast.train.augment import Augmenter
    from rded_fast.train.distilled_set import load_distilled
    from rded_fast.train.engine import StudentRun, make_steps, train_epoch
    from rded_fast.train.labels import LabelSource
    from rded_fast.train.recipe import Recipe

    weights = random_observer(tmp_path, 3)
    distill(fashion_config(jpeg_tree, weights, tmp_path / "ri", select="random-images", ipc=2, mipc=8))
    cfg = student_mod.StudentConfig(
        distilled=str(tmp_path / "ri"),
        teacher="no-such-model",
        val=str(jpeg_tree),
        student="conv3",
        epochs=2,
        device="cpu",
        labels="hard",
        show_progress=False,
    )
    result = student_mod.evaluate(cfg)  # a teacher would be built (and fail) with soft labels
    assert result["parameters"]["soft_label_source"] == "hard" and 0 <= result["final_top1"] <= 1
    assert all(np.isfinite(result["epoch_loss"]))

    data = load_distilled(str(tmp_path / "ri"))
    cpu = torch.device("cpu")
    source = LabelSource("hard", Recipe(epochs=1, batch_size=2, lr=0.01), 3, 32, 1, data.labels, cpu)
    counts = {}
    for refresh in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(3))
        model.eval()(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer without counting a batch
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        run = StudentRun(
            0, model.train(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0), {"cpu": torch.get_rng_state()}
        )
        train_epoch([run], source, make_steps(source, False), Augmenter(data.images, 1), 0, refresh)
        counts[refresh] = int(model[1].num_batches_tracked)
    assert counts[True] == 2 * counts[False] == 2 * 3  # 6 images, batches of 2: 3 steps


def test_quality_table_formats_and_plots():
    from rded_fast.benchmarks.quality import LABELS, ROWS, format_table, plot

    stats = {
        row: {str(i): {lab: {"mean": 0.5 + 0.01 * k + 0.02 * i, "std": 0.01, "runs": []} for lab in LABELS} for i in (1, 10)}
        for k, row in enumerate(ROWS)
    }
    margins = {f"ipc{i}_{lab}": {"points": 2.0, "in_base_std": 2.0} for i in (1, 10) for lab in LABELS}
    settings = {
        "ipcs": [1, 10],
        "factor": 1,
        "input_size": 32,
        "observer": "conv3",
        "student": "conv3",
        "observer_test_top1": 0.9,
    }
    result = {"settings": settings, "final_top1": stats, "rded_vs_random_images": margins}
    text = format_table(result)
    assert "random-images" in text and "rded-cover" in text and "IPC 10 hard" in text and "+2.00 points" in text
    png = plot({"f1_32px": result, "f2_64px": result}, "fashion-mnist: cpu, 2026-12-04")
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (640, 840)  # one 640 x 420 panel per shape
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    purple = np.abs(pixels.astype(int) - [148, 103, 189]).sum(1) < 30  # matplotlib's tab:purple: the rded-cover line
    assert purple.sum() > 200


def test_evaluate_amp_final_only_and_one_decode_of_the_val_split(jpeg_tree, tmp_path, monkeypatch):
    from rded_fast.train import student as student_mod, val_cache

    weights = random_observer(tmp_path, 3)
    distill(fashion_config(jpeg_tree, weights, tmp_path / "ri", select="random-images", ipc=2, mipc=8))
    decoded = []
    load = val_cache.load_tensor_dataset
    monkeypatch.setattr(val_cache, "load_tensor_dataset", lambda *a, **k: decoded.append(1) or load(*a, **k))
    val = shutil.copytree(jpeg_tree, tmp_path / "val")
    base = dict(distilled=str(tmp_path / "ri"), teacher="-", val=str(val), student="conv3", device="cpu", show_progress=False)
    # bf16 is emulated (4-5x slower) on CPUs without native bf16: its students train a few epochs only
    runs = {
        (amp, final, epochs): student_mod.evaluate(
            student_mod.StudentConfig(**base, epochs=epochs, labels="hard", amp=amp, final_only=final)
        )
        for amp, final, epochs in (("none", False, 100), ("none", True, 100), ("none", False, 3), ("bf16", False, 3))
    }
    assert [e["epoch"] for e in runs["none", False, 100]["evaluations"]] == [89, 99]  # the reference's: > 80 %, every 10th
    assert [e["epoch"] for e in runs["none", True, 100]["evaluations"]] == [99]
    assert (
        runs["none", False, 3]["parameters"]["resolved_amp"] == "fp32"
        and runs["bf16", False, 3]["parameters"]["resolved_amp"] == "bf16"
    )
    assert runs["none", False, 3]["epoch_loss"] != runs["bf16", False, 3]["epoch_loss"]  # autocast really ran
    assert runs["none", True, 100]["epoch_loss"] == runs["none", False, 100]["epoch_loss"]  # tests change no training
    assert len(decoded) == 1  # one decode of the val split for four students
    some = sorted(val.rglob("*.jpg"))[0]
    os.utime(some, ns=(some.stat().st_atime_ns, some.stat().st_mtime_ns + 10**9))
    student_mod.evaluate(student_mod.StudentConfig(**base, labels="hard", epochs=1))
    assert len(decoded) == 2  # a changed file is decoded again
    with pytest.raises(UserError, match="--amp 'fp16'"):
        student_mod.evaluate(student_mod.StudentConfig(**base, labels="hard", amp="fp16"))


def test_selection_diagnostic_measures():
    from rded_fast.benchmarks.selection_diagnostic import diagnose, features
    from rded_fast.models.convnet import ConvNet

    torch.manual_seed(0)
    model = ConvNet(3, 4, 32).eval()
    test_x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    test_y = torch.arange(12) % 4
    test = (features(model, test_x)[0], test_y)
    whole = diagnose(test_x, test_y, test, model)  # the set is the test split itself: every test image is in it
    assert whole["nearest_top1"] == 1.0 and abs(whole["test_to_set"]) < 1e-5 and whole["spread"] > 0
    twins = diagnose(test_x[:4].repeat(2, 1, 1, 1), test_y[:4].repeat(2), test, model)  # two copies per class
    assert abs(twins["spread"]) < 1e-5 and twins["test_to_set"] > 1e-3 and 0.0 <= twins["confidence"] <= 1.0
