"""Never lose a user's data (issue 10): output overlap, ownership, locks, corrupt JPEGs, argument ranges."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rded_fast.arguments import NUMBER_RANGES
from rded_fast.chance import near_chance_threshold
from rded_fast.cli import build_parser, main
from rded_fast.distill import DistillConfig, distill
from rded_fast.errors import UserError
from rded_fast.formats.folder import build_index
from rded_fast.index import UNLISTED_CLASS, read_class_map
from rded_fast.jpeg_check import jpeg_problem
from rded_fast.lock import acquire_lock, lock_path, lock_record, release_lock
from tests.conftest import _distill_argv, _one_line_error, tree_digest, write_synthetic_jpegs

# ---- case 1: an output never overlaps an input ---------------------------------------------------------


@pytest.mark.parametrize("where", ["same", "parent", "inside", "dotdot", "symlink"])
@pytest.mark.parametrize("flag", [[], ["--overwrite"], ["--resume"], ["--overwrite-any"]])
def test_distill_out_overlapping_data_is_refused_and_data_untouched(small, tmp_path, capsys, where, flag):
    data, weights = small
    os.symlink(data, tmp_path / "link")
    out = {
        "same": data,
        "parent": tmp_path,
        "inside": data / "class_00",
        "dotdot": data / "class_00" / "..",
        "symlink": tmp_path / "link",
    }[where]
    before = tree_digest(tmp_path)
    assert main(_distill_argv(data, weights, out, *flag)) == 2
    err = _one_line_error(capsys)
    assert str(out) in err and "--data" in err and str(data) in err
    assert "--overwrite" not in err.split(";")[-1]  # the fix offered is never "overwrite your data"
    assert tree_digest(tmp_path) == before
    assert not (data / "class_00" / "distilled").exists()


def test_every_command_refuses_an_output_inside_its_input(small, tmp_path, capsys):
    data, weights = small
    distilled = tmp_path / "d"
    assert main(_distill_argv(data, weights, distilled)) == 0
    capsys.readouterr()
    before = tree_digest(tmp_path)
    cases = [
        ["convert", "--format", "ffcv", "--data", str(data), "--out", str(data / "x.beton")],
        ["convert", "--format", "dali", "--data", str(data), "--out", str(data)],
        [
            "relabel",
            "--distilled",
            str(distilled),
            "--teacher",
            "conv3",
            "--teacher-weights",
            str(weights),
            "--out",
            str(distilled / "labels"),
            "--epochs",
            "1",
        ],
        [
            "evaluate",
            "--distilled",
            str(distilled),
            "--val",
            str(data),
            "--teacher",
            "conv3",
            "--teacher-weights",
            str(weights),
            "--student",
            "conv3",
            "--json",
            str(data / "eval.json"),
            "--epochs",
            "1",
        ],
        ["train-observer", "--data", str(data), "--out", str(data / "class_00" / "o.pth"), "--epochs", "1"],
        ["demo", "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path)],
    ]
    for argv in cases:
        assert main(argv + (["--quiet"] if argv[0] != "convert" else ["--quiet"])) == 2, argv
        err = _one_line_error(capsys)
        assert "inside" in err or "same path" in err or "contains" in err, err
    assert tree_digest(tmp_path) == before


# ---- case 2: --overwrite replaces only our own output; --overwrite-any moves aside until success -------


def test_foreign_out_needs_overwrite_any_and_comes_back_on_failure(small, tmp_path, capsys):
    data, weights = small
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    assert main(_distill_argv(data, weights, out, "--overwrite")) == 2
    assert "did not write" in _one_line_error(capsys)
    assert (out / "thesis.txt").read_text() == "years of work"
    # a run that fails after the move puts the folder back as it was
    assert main(_distill_argv(data, tmp_path / "missing.pth", out, "--overwrite-any")) == 2
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
    assert not [p for p in tmp_path.iterdir() if ".rded-old-" in p.name or p.name.endswith(".rded-lock")]
    # a run that succeeds replaces it
    assert main(_distill_argv(data, weights, out, "--overwrite-any")) == 0
    assert (out / "manifest.json").is_file() and not (out / "thesis.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".rded-old-" in p.name]


def test_overwrite_replaces_our_own_output(small, tmp_path):
    data, weights = small
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0
    assert main(_distill_argv(data, weights, out, "--overwrite", "--seed", "3")) == 0
    assert json.loads((out / "manifest.json").read_text())["parameters"]["seed"] == 3


# ---- case 3: one process per output ---------------------------------------------------------------------


def test_second_process_is_refused_and_stale_locks_are_taken_over(small, tmp_path, capsys):
    data, weights = small
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(out).write_text(lock_record(holder.pid))  # as the live process would have written it
        assert main(_distill_argv(data, weights, out)) == 2
        err = _one_line_error(capsys)
        assert "in use by another rded-fast process" in err and str(holder.pid) in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(_distill_argv(data, weights, out)) == 0  # the holder is dead: its lock is stale
    assert not lock_path(out).exists()


def test_lock_is_exclusive_within_a_process(tmp_path):
    path = acquire_lock(tmp_path / "x", "--out")
    with pytest.raises(UserError, match="in use"):
        acquire_lock(tmp_path / "x", "--out")
    release_lock(path)
    release_lock(acquire_lock(tmp_path / "x", "--out"))


# ---- case 4: convert never replaces a file it did not write --------------------------------------------


def test_convert_refuses_to_replace_a_foreign_file_or_without_overwrite(small, tmp_path, capsys):
    data, _ = small
    notes = tmp_path / "n.txt"
    notes.write_text("my notes")
    assert main(["convert", "--format", "ffcv", "--data", str(data), "--out", str(notes), "--quiet", "--overwrite"]) == 2
    assert "did not write" in _one_line_error(capsys)
    assert notes.read_text() == "my notes"
    beton = tmp_path / "t.beton"  # an earlier .beton of ours (recognised by its sidecar)
    beton.write_bytes(b"old")
    Path(str(beton) + ".json").write_text(json.dumps({"format": "rded-fast/ffcv-beton"}))
    assert main(["convert", "--format", "ffcv", "--data", str(data), "--out", str(beton), "--quiet"]) == 2
    assert "pass --overwrite" in _one_line_error(capsys)
    assert beton.read_bytes() == b"old"


# ---- case 5: broken JPEG structure is found before DALI sees it ------------------------------------------


def _jpeg(**kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_jpeg_structure_check():
    good = _jpeg(quality=90)
    assert jpeg_problem(good) is None and jpeg_problem(_jpeg(progressive=True)) is None
    assert "truncated" in jpeg_problem(good[: len(good) // 2])
    bad = bytearray(good)
    bad[len(bad) // 2 : len(bad) // 2 + 2] = b"\xff\x01"
    assert "invalid marker 0xFF01 inside the image data" in jpeg_problem(bytes(bad))
    bad = bytearray(good)
    bad[20:28] = b"\x13" * 8  # a header segment overwritten
    assert jpeg_problem(bytes(bad)) is not None
    assert "not a JPEG" in jpeg_problem(b"\x89PNG\r\n")


def test_dali_run_on_a_shard_corrupted_in_the_middle_lists_the_files(tmp_path):
    pytest.importorskip("nvidia.dali")
    from rded_fast.converters import convert

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=6)
    convert("dali", str(data), str(tmp_path / "shards"), workers=1, show_progress=False)
    tar = tmp_path / "shards" / "shard-00000.tar"
    raw = bytearray(tar.read_bytes())
    ds = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    for i in (1, 7):  # overwrite bytes in the middle of two images' headers and data
        off = ds["samples"]["offset"][i]
        raw[off + 20 : off + 28] = b"\x46" * 8
    tar.write_bytes(bytes(raw))
    torch.manual_seed(0)
    from rded_fast.models import build

    torch.save(build("conv3", 2, None, 32).model.state_dict(), tmp_path / "w.pth")
    argv = [sys.executable, "-m", "rded_fast.cli"] + _distill_argv(
        tmp_path / "shards", tmp_path / "w.pth", tmp_path / "o", "--loader", "dali", "--mipc", "6"
    )
    run = subprocess.run(argv, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Invalid marker" not in run.stderr  # DALI's parser never saw the broken bytes
    failures = json.loads((tmp_path / "o" / "manifest.json").read_text())["decode_failures"]
    assert {f["path"] for f in failures} == {ds["index"]["paths"][1], ds["index"]["paths"][7]}
    assert all("corrupt JPEG structure" in f["reason"] for f in failures)


def test_dali_converter_leaves_out_broken_jpegs(tmp_path):
    from rded_fast.converters.shards import _sanitize

    path = tmp_path / "b.jpg"
    good = _jpeg()
    bad = bytearray(good)
    bad[len(bad) // 2 : len(bad) // 2 + 2] = b"\xff\x01"
    path.write_bytes(bytes(bad))
    result = _sanitize(str(path))
    assert isinstance(result, str) and "corrupt JPEG structure" in result, result


# ---- case 6: a class map that leaves out folders is refused ------------------------------------------------


def test_class_map_leaving_out_a_folder_is_refused_and_bom_is_ignored(small, tmp_path, capsys):
    data, weights = small
    cmap = tmp_path / "map.txt"
    cmap.write_bytes("\ufeffclass_01\n".encode("utf-8"))
    assert read_class_map(cmap) == ["class_01"]
    index = build_index(data, class_map=["class_01"], show_progress=False)
    assert {"path": "class_00", "reason": UNLISTED_CLASS} in index.skipped
    torch.manual_seed(0)
    from rded_fast.models import build

    torch.save({"model": build("conv3", 1, None, 32).model.state_dict()}, tmp_path / "w1.pth")
    # distill refuses a map that leaves out a class folder (issue 13: every data folder must be named)
    assert main(_distill_argv(data, tmp_path / "w1.pth", tmp_path / "o", "--class-map", str(cmap))) == 2
    err = capsys.readouterr().err
    assert "does not name the class folder 'class_00'" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ---- case 7: stored soft labels are bound to the set's content ------------------------------------------


def test_soft_labels_of_another_set_with_the_same_names_are_refused(small, tmp_path):
    from rded_fast.train.distilled_set import load_distilled
    from rded_fast.train.recipe import Recipe
    from rded_fast.train.student import _check_labels_match, content_sha256

    data, weights = small
    for seed in (0, 1):
        assert main(_distill_argv(data, weights, tmp_path / f"d{seed}", "--select", "random", "--seed", str(seed))) == 0
    a, b = load_distilled(tmp_path / "d0"), load_distilled(tmp_path / "d1")
    assert a.files == b.files and content_sha256(a) != content_sha256(b)
    header = {"distilled": "d0", "files": a.files, "content_sha256": content_sha256(a), "epochs": 1}
    _check_labels_match(header, a, Recipe(epochs=1, batch_size=2, lr=1e-3), "labels")
    with pytest.raises(UserError, match="--soft-labels labels: made for another distilled set"):
        _check_labels_match(header, b, Recipe(epochs=1, batch_size=2, lr=1e-3), "labels")


# ---- case 8: output paths are checked before any training -----------------------------------------------


def test_evaluate_json_is_checked_before_training(small, tmp_path, capsys):
    data, weights = small
    base = [
        "evaluate",
        "--distilled",
        str(tmp_path / "nonexistent-yet"),
        "--val",
        str(data),
        "--teacher",
        "conv3",
        "--student",
        "conv3",
        "--quiet",
    ]
    (tmp_path / "adir").mkdir()
    assert main(base + ["--json", str(tmp_path / "adir")]) == 2
    assert "is a folder" in _one_line_error(capsys)  # refused before the missing --distilled is even read
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    assert main(base + ["--json", str(tmp_path / "notes.json")]) == 2
    assert "did not write" in _one_line_error(capsys)


def test_demo_out_file_is_refused_at_once(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f"), "--data-dir", str(tmp_path / "cache"), "--quiet"]) == 2
    assert "is a file" in _one_line_error(capsys)
    assert not (tmp_path / "cache").exists()


# ---- case 9: every numeric argument is range-checked ----------------------------------------------------


def test_every_numeric_argument_has_a_range():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    numeric = {a.dest for p in sub.choices.values() for a in p._actions if a.type in (int, float)}
    assert numeric and numeric <= set(NUMBER_RANGES), numeric - set(NUMBER_RANGES)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["distill", "--data", "d", "--observer", "conv3", "--out", "o", "--seed", "-1"], "--seed -1: must be >= 0"),
        (["bench", "--data", "d", "--batch-size", "-5"], "--batch-size -5: must be >= 1"),
        (["train-observer", "--data", "d", "--out", "o", "--lr", "0"], "--lr 0.0: must be > 0"),
        (["evaluate", "--distilled", "d", "--val", "v", "--teacher", "t", "--student", "s", "--epochs", "0"], "--epochs 0"),
        (["convert", "--format", "ffcv", "--data", "d", "--out", "o", "--workers", "-2"], "--workers -2"),
        (["relabel", "--distilled", "d", "--teacher", "t", "--out", "o", "--top-k", "-1"], "--top-k -1: must be >= 0"),
        (["demo", "--student-epochs", "-1"], "--student-epochs -1"),
        (["train-observer", "--data", "d", "--out", "o", "--weight-decay", "nan"], "finite"),
        (["distill", "--data", "d", "--observer", "conv3", "--out", "o", "--crop-scale", "0.5,0.2"], "0 < MIN <= MAX <= 1"),
    ],
)
def test_bad_numbers_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


# ---- the weak list ---------------------------------------------------------------------------------------


def test_os_errors_name_the_argument_and_the_fix(tmp_path):
    from rded_fast.recovery import os_error_message

    args = build_parser().parse_args(["distill", "--data", "d", "--observer", "conv3", "--out", str(tmp_path / "o")])
    exc = OSError(28, "No space left on device", str(tmp_path / "o" / "class_00" / ".x.png.abc.tmp"))
    msg = os_error_message(args.command, vars(args), exc)
    assert msg.startswith(f"--out {tmp_path / 'o'}: No space left on device") and "--resume" not in msg  # no class ran
    (tmp_path / "o" / ".rded-journal").mkdir(parents=True)
    (tmp_path / "o" / ".rded-journal" / "class_000000.json").write_text("{}")
    assert "finished classes are kept; fix it and rerun with --resume" in os_error_message(args.command, vars(args), exc)
    args = build_parser().parse_args(
        ["evaluate", "--distilled", "d", "--val", "v", "--teacher", "t", "--student", "s", "--json", str(tmp_path / "e.json")]
    )
    msg = os_error_message(args.command, vars(args), OSError(13, "Permission denied", str(tmp_path / ".e.json.xyz.tmp")))
    assert msg.startswith(f"--json {tmp_path / 'e.json'}") and "distill" not in msg


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_follow_the_umask(tmp_path, umask):
    from rded_fast.fileio import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_observer_training_removes_its_state_and_replaces_only_checkpoints(small, tmp_path):
    from rded_fast.train.observer import ObserverConfig, train_observer

    data, _ = small
    cfg = dict(data=str(data), arch="conv3", input_size=32, epochs=1, batch_size=8, device="cpu", show_progress=False)
    out = tmp_path / "obs.pth"
    train_observer(ObserverConfig(out=str(out), **cfg))
    assert out.is_file() and not Path(f"{out}.state").exists()
    with pytest.raises(UserError, match="pass --overwrite"):  # a trained checkpoint is replaced only on request
        train_observer(ObserverConfig(out=str(out), **cfg))
    assert train_observer(ObserverConfig(out=str(out), overwrite=True, **cfg))["replaced"] == str(out)
    (tmp_path / "x.pth").write_text("someone else's file")
    with pytest.raises(UserError, match="did not write"):
        train_observer(ObserverConfig(out=str(tmp_path / "x.pth"), **cfg))


def test_near_chance_rule_can_be_passed_with_one_or_two_classes():
    assert near_chance_threshold(1, 300) <= 1.0
    assert near_chance_threshold(2, 300) < 0.8
    assert abs(near_chance_threshold(10, 300) - (0.2 + 3 * (0.09 / 300) ** 0.5)) < 1e-12  # unchanged for 10


def test_checkpoint_of_another_arch_and_pickled_objects_get_short_messages(tmp_path):
    from rded_fast.models import build

    torch.save({"model": build("conv4", 2, None, 32).model.state_dict(), "arch": "conv4"}, tmp_path / "c4.pth")
    with pytest.raises(UserError, match="a checkpoint of conv4, not of conv3"):
        build("conv3", 2, str(tmp_path / "c4.pth"), 32)
    torch.save({"model": build("conv3", 2, None, 32).model.state_dict(), "obj": Path("x")}, tmp_path / "p.pth")
    with pytest.raises(UserError) as info:
        build("conv3", 2, str(tmp_path / "p.pth"), 32)
    assert "Python objects" in str(info.value) and "weights_only" not in str(info.value)


def test_resume_accepts_the_same_data_given_as_an_absolute_path(small, tmp_path, monkeypatch):
    data, weights = small
    monkeypatch.chdir(tmp_path)
    base = dict(
        observer="conv3",
        weights=str(weights),
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
    distill(DistillConfig(data="data", out="o", **base))
    r = distill(DistillConfig(data=str(data.resolve()), out=str(tmp_path / "o"), resume=True, **base))
    assert r.num_images == 2


def test_resume_redoes_a_finished_class_whose_sources_changed(small, tmp_path, capsys):
    from rded_fast import journal

    data, weights = small
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0
    for path in (out / ".rded-journal").glob("class_000001.json"):
        path.unlink()  # as if the run had stopped before class_01
    first = (out / "class_00").rglob("*.png").__next__().read_bytes()
    used = json.loads((out / "manifest.json").read_text())["images"][0]["cells"][0]["source"]
    assert used.startswith("class_00/")
    Image.new("RGB", (48, 48), (255, 0, 0)).save(data / used)  # a source it used, changed meanwhile
    assert main(_distill_argv(data, weights, out, "--resume")) == 0
    assert "redone because their source images changed" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["redone_classes"] == ["class_00"] and journal.read_redone(out) == ["class_00"]
    assert (out / "class_00").rglob("*.png").__next__().read_bytes() != first


def test_unusable_inductor_cache_does_not_stop_a_run(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": "/proc/no-such-dir/cache"}
    run = subprocess.run(
        [sys.executable, "-m", "rded_fast.cli", "models"],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "conv3" in run.stdout, run.stderr
    assert "TORCHINDUCTOR_CACHE_DIR /proc/no-such-dir/cache is unusable" in run.stderr


def test_random_init_observer_is_named_as_such(small, tmp_path, capsys):
    data, _ = small
    argv = [
        "distill",
        "--data",
        str(data),
        "--observer",
        "conv3",
        "--out",
        str(tmp_path / "o"),
        "--input-size",
        "32",
        "--factor",
        "1",
        "--ipc",
        "1",
        "--mipc",
        "4",
        "--num-crop",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--quiet",
    ]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "randomly initialised" in err and "class order" not in err
    assert not (tmp_path / "o").exists()


def test_a_real_second_run_on_the_same_out_is_refused_while_the_first_runs(small, tmp_path, capsys):
    import signal
    import time

    data, weights = small
    out = tmp_path / "o"
    first = subprocess.Popen(
        [sys.executable, "-m", "rded_fast.cli"] + _distill_argv(data, weights, out),
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while not lock_path(out).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, lock taken
        assert first.poll() is None and lock_path(out).exists()
        assert main(_distill_argv(data, weights, out, "--overwrite", "--select", "random")) == 2
        assert "in use by another rded-fast process" in _one_line_error(capsys)
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=240) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["select"] == "rded" and not lock_path(out).exists()
