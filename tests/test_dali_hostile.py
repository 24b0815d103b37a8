"""The DALI loader under hostile files: every bad file is one named, counted skip; nothing crashes, no run is lost.

The JPEG structure check runs beside DALI (rded_fast/loaders/jpeg_gate.py), so a broken file can be found before
the pipeline starts (left out of it) or while it runs (the feed stops before its batch and a new pipeline starts
there); both ways are forced below, and the check's worker processes are forced once (the path plans of 20k+
files take).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rded_fast.cli import main
from rded_fast.formats import FOLDER, Source
from rded_fast.formats.folder import build_index
from rded_fast.loaders import make_loader, open_source
from rded_fast.loaders.dali_loader import DaliCropLoader
from rded_fast.loaders.jpeg_gate import JpegGate
from rded_fast.plan import make_plan
from tests.conftest import (
    DALI_MAX_DIFF,
    DALI_MEAN_DIFF,
    DALI_P99_DIFF,
    _crop_diff,
    _distill_argv,
    _run_loader,
    write_synthetic_jpegs,
)

NON_UTF8 = b"img_\xff\xfe.jpg"


def _damage(folder: Path) -> dict[str, str]:
    """Spoil files of `folder` in place (after indexing and planning, as a file changes under a cached index);
    returns file name -> a word its failure reason must hold (None: the file must decode)."""
    files = sorted(p for p in folder.iterdir())
    good = files[0].read_bytes()
    mid = bytearray(files[1].read_bytes())
    mid[len(mid) // 2 : len(mid) // 2 + 2] = b"\xff\x01"  # an invalid marker in the middle of the image data
    files[1].write_bytes(bytes(mid))
    head = bytearray(files[2].read_bytes())
    head[20:28] = b"\x46" * 8  # a header segment overwritten
    files[2].write_bytes(bytes(head))
    files[3].write_bytes(good[: len(good) // 2])  # truncated
    with Image.open(files[4]) as im:  # a PNG under a .jpg name: DALI decodes it
        pixels = np.asarray(im.convert("RGB"))
    Image.fromarray(pixels).save(files[4], format="PNG")
    Image.fromarray(pixels).save(files[5], format="GIF")  # structurally not a JPEG; DALI cannot decode a GIF
    with Image.open(files[6]) as im:  # replaced by an image of another size
        im.convert("RGB").resize((im.width + 3, im.height)).save(files[6], format="JPEG")
    files[7].write_bytes(b"")
    return {
        files[1].name: "corrupt JPEG structure",
        files[2].name: "corrupt JPEG structure",
        files[3].name: "corrupt JPEG structure",
        files[4].name: None,
        files[5].name: "DALI",
        files[6].name: "decoded size",
        files[7].name: "empty file",
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, jpeg_tree):
    """jpeg_tree (3 classes x 8) plus a non-UTF-8 file name in class_00, planned whole; then class_01 (the middle of
    the plan) spoiled. Returns (index, plan, name -> expected reason word)."""
    root = tmp_path_factory.mktemp("hostile") / "tree"
    shutil.copytree(jpeg_tree, root)
    shutil.copyfile(root / "class_00" / "img_000.jpg", os.path.join(os.fsencode(root / "class_00"), NON_UTF8))
    index = build_index(root, show_progress=False)
    plan = make_plan(index, seed=1, mipc=9, num_crop=2)
    expected = _damage(root / "class_01")
    expected[os.fsdecode(NON_UTF8)] = "UTF-8"
    return index, plan, expected


@pytest.mark.parametrize("mode", ["before", "while", "processes"])
def test_every_hostile_file_is_one_named_skip(hostile, monkeypatch, mode):
    index, plan, expected = hostile
    if mode == "while":  # nothing is known when a pipeline starts: each broken file stops a running pipeline
        monkeypatch.setattr(JpegGate, "known", lambda self: {})
    loader = DaliCropLoader(
        Source(FOLDER, index), plan, 24, batch_size=5, workers=2, device="cpu", check_processes=mode == "processes"
    )
    reasons: dict[int, str] = {}
    rows, got, ok = _run_loader(loader, len(plan), 5, reasons)
    assert rows == list(range(len(plan)))  # plan order, every row once
    names = {Path(index.paths[int(plan.image_ids[r])]).name: why for r, why in reasons.items()}
    assert set(names) == {n for n, word in expected.items() if word}, names
    for name, word in expected.items():
        if word:
            assert word in names[name], (name, names[name])
    assert not got[~ok].any()  # failed rows' crops are zeros
    timings = loader.timings()
    assert timings["jpeg_check"] > 0 and 0 <= timings["jpeg_check_wait"] <= timings["jpeg_check"] + 1

    ref_rows, ref, ref_ok = _run_loader(
        make_loader("torch", Source(FOLDER, index), plan, 24, batch_size=5, workers=0), len(plan), 5
    )
    same = ok & ref_ok  # every row both decode: the same crops up to the resize filters
    assert int(same.sum()) >= len(plan) - len(expected)
    max_d, mean_d, p99 = _crop_diff(got[same], ref[same])
    assert max_d <= DALI_MAX_DIFF and mean_d <= DALI_MEAN_DIFF and p99 <= DALI_P99_DIFF


def test_corrupt_jpeg_in_the_middle_of_a_shard_is_a_named_skip(jpeg_tree, tmp_path, monkeypatch):
    from rded_fast.converters import convert

    out = tmp_path / "shards"
    convert("dali", str(jpeg_tree), str(out), shard_size="1GB", workers=1, show_progress=False)
    dataset = json.loads((out / "dataset.json").read_text())
    tar = out / dataset["shards"][0]["tar"]
    raw = bytearray(tar.read_bytes())
    middle = len(dataset["index"]["paths"]) // 2
    offset, nbytes = dataset["samples"]["offset"][middle], dataset["samples"]["nbytes"][middle]
    raw[offset + nbytes // 2 : offset + nbytes // 2 + 2] = b"\xff\x01"
    tar.write_bytes(bytes(raw))
    with tarfile.open(tar) as t:  # still a valid tar: only the image's bytes changed
        assert len(t.getmembers()) == 3 * len(dataset["index"]["paths"])
    monkeypatch.setattr(JpegGate, "known", lambda self: {})  # found while the pipeline runs
    source = open_source("dali", str(out))
    index = source.index
    plan = make_plan(index, seed=0, mipc=8, num_crop=2)
    reasons: dict[int, str] = {}
    rows, _, ok = _run_loader(DaliCropLoader(source, plan, 16, batch_size=5, workers=2, device="cpu"), len(plan), 5, reasons)
    assert rows == list(range(len(plan))) and int((~ok).sum()) == 1
    ((row, why),) = reasons.items()
    assert index.paths[int(plan.image_ids[row])] == dataset["index"]["paths"][middle]
    assert "corrupt JPEG structure" in why and "invalid marker 0xFF01" in why


def test_jpeg_gate_waits_only_for_the_rows_asked(tmp_path, monkeypatch):
    pooled = []  # chunks the worker processes delivered: all of them, none left to the thread's fallback
    run_pool = JpegGate._run_pool
    monkeypatch.setattr(JpegGate, "_run_pool", lambda self: pooled.append(run_pool(self)) or pooled[-1])
    root = write_synthetic_jpegs(tmp_path / "t", classes=1, per_class=6)
    files = sorted(str(p) for p in (root / "class_00").iterdir())
    Path(files[4]).write_bytes(b"\xff\xd8\xff")
    rows = np.arange(10, 16)
    source = dict(zip(rows.tolist(), files)).__getitem__
    for processes in (False, True):
        gate = JpegGate(rows, source, cores=2, processes=processes)
        try:
            assert gate.verdicts([10, 11, 99]) == {}
            found = gate.verdicts(rows)
            assert list(found) == [14] and "truncated" in found[14]
            assert gate.known() == found
        finally:
            gate.close()
        assert pooled == ([1] if processes else [])  # closed: the check's thread has ended
    gate = JpegGate(np.arange(3), files.__getitem__, cores=2)
    gate.close()  # closing early never hangs, and leaves no verdict pending
    assert gate.verdicts(np.arange(3)) == {}


def test_one_non_utf8_file_name_costs_one_file(tmp_path):
    """Issue 22 item 12: one file name that is not UTF-8 made DALI refuse the whole file list (95 of 120 images
    failed, 3 of 4 classes got no output, rc 0). Now it costs that file alone, named in the manifest."""
    from rded_fast.models import build

    data = write_synthetic_jpegs(tmp_path / "data", classes=4, per_class=6)
    shutil.copyfile(data / "class_03" / "img_000.jpg", os.path.join(os.fsencode(data / "class_03"), NON_UTF8))
    torch.manual_seed(0)
    torch.save(build("conv3", 4, None, 32).model.state_dict(), tmp_path / "w.pth")
    more = ("--loader", "dali", "--ipc", "2", "--mipc", "7", "--num-crop", "2", "--batch-size", "4", "--workers", "1")
    assert main(_distill_argv(data, tmp_path / "w.pth", tmp_path / "o", *more)) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert len(manifest["images"]) == 4 * 2  # every class has its output
    failures = manifest["decode_failures"]
    assert [f["path"] for f in failures] == ["class_03/" + os.fsdecode(NON_UTF8)], failures
    assert "UTF-8" in failures[0]["reason"]
    assert {"jpeg_check", "jpeg_check_wait"} <= set(manifest["run"]["seconds"])


def test_gif_under_a_jpeg_name_is_found_by_halving_the_batch(tmp_path, monkeypatch):
    """DALI's error for an image it cannot decode does not always name the sample (a GIF: "nvImageCodec failure");
    the loader then halves the batch until the failing row is alone: a few DALI runs, not one per row."""
    root = write_synthetic_jpegs(tmp_path / "t", classes=1, per_class=16)
    index = build_index(root, show_progress=False)
    plan = make_plan(index, seed=0, mipc=16, num_crop=1)
    target = root / index.paths[int(plan.image_ids[11])]
    with Image.open(target) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="GIF")
    target.write_bytes(buf.getvalue())
    runs = []
    real = DaliCropLoader._run
    monkeypatch.setattr(DaliCropLoader, "_run", lambda self, batches, *a: runs.append(len(batches[0])) or real(self, batches, *a))
    reasons: dict[int, str] = {}
    rows, _, ok = _run_loader(
        DaliCropLoader(Source(FOLDER, index), plan, 16, batch_size=16, workers=1, device="cpu"), 16, 16, reasons
    )
    assert rows == list(range(16)) and list(reasons) == [11] and ok.sum() == 15
    assert reasons[11].startswith("DALI: ") and "Critical error" not in reasons[11], reasons[11]
    assert runs[0] == 16 and len(runs) <= 1 + 2 * 4 + 1, runs  # the batch, halving (log2 16 = 4 levels), the rerun
