"""Nothing of the user's is lost (issue 22, output half): permissions, replacing only what a run of ours wrote,
other sources' shards, signals, resume identity, locks, disk full, the index cache, one-line errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from rded_fast.cli import main
from rded_fast.formats.shards import SHARD_FOLDER
from rded_fast.lock import lock_path, lock_record
from rded_fast.outputs import DISTILLED_SET, LABEL_FOLDER, claim_output, foreign_entries
from tests.conftest import _distill_argv, _one_line_error, _relabel_argv, tree_digest, write_synthetic_jpegs

ROOT = Path(__file__).parent.parent


def _user_files(folder: Path) -> dict[str, bytes]:
    """Files of the user's inside an earlier output: notes at the top, a folder of their own, a file in a class folder."""
    files = {"NOTES.txt": b"my notes", "mystuff/a.txt": b"a", "mystuff/deep/b.bin": b"\x00\x01", "class_00/mine.txt": b"x"}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def _still_there(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (folder / rel).read_bytes() == data, rel


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".rded-old-" in p.name or ".rded-lock" in p.name or p.name.endswith(".tmp")]


# ---- bad 1: every file gets the user's umask ------------------------------------------------------------


def test_distilled_images_and_journal_follow_the_umask(small, tmp_path):
    data, weights = small
    old = os.umask(0o022)
    try:
        assert main(_distill_argv(data, weights, tmp_path / "o")) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path / "o")): p.stat().st_mode & 0o777 for p in (tmp_path / "o").rglob("*")}
    assert any(name.endswith(".png") and "/" in name for name in modes) and ".rded-journal/class_000000.json" in modes
    assert {name: mode for name, mode in modes.items() if mode not in (0o644, 0o755)} == {}


# ---- bad 2: a trained checkpoint is replaced only with --overwrite --------------------------------------


def test_train_observer_needs_overwrite_to_replace_a_checkpoint(small, tmp_path, capsys):
    data, _ = small
    argv = ["train-observer", "--data", str(data), "--out", str(tmp_path / "obs.pth"), "--epochs", "1", "--batch-size", "8"]
    argv += ["--device", "cpu", "--quiet"]
    assert main(argv) == 0
    before = (tmp_path / "obs.pth").read_bytes()
    capsys.readouterr()
    assert main(argv + ["--seed", "1"]) == 2
    assert "holds an earlier rded-fast output; pass --overwrite" in _one_line_error(capsys)
    assert (tmp_path / "obs.pth").read_bytes() == before
    assert main(argv + ["--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "obs.pth").read_bytes() != before
    assert "replaced the earlier checkpoint" in capsys.readouterr().out


def test_train_observer_resume_without_state_says_so(small, tmp_path, capsys):
    data, _ = small
    argv = ["train-observer", "--data", str(data), "--out", str(tmp_path / "obs.pth"), "--epochs", "1", "--quiet"]
    assert main(argv + ["--device", "cpu", "--resume"]) == 2
    err = _one_line_error(capsys)
    assert f"no {tmp_path / 'obs.pth'}.state" in err and "run without --resume" in err
    assert not (tmp_path / "obs.pth").exists()


# ---- bad 3, 4, 5: --overwrite replaces only what a run of ours wrote ------------------------------------


def test_distill_overwrite_keeps_the_users_files(small, tmp_path, capsys):
    data, weights = small
    out = tmp_path / "ow1"
    assert main(_distill_argv(data, weights, out)) == 0
    assert foreign_entries(out, DISTILLED_SET.written(out)) == []  # the records name everything distill writes
    mine = _user_files(out)
    capsys.readouterr()
    assert main(_distill_argv(data, weights, out, "--overwrite", "--seed", "3")) == 0
    _still_there(out, mine)
    err = capsys.readouterr().err
    assert "kept 3 entries rded-fast did not write: NOTES.txt, class_00/mine.txt, mystuff/" in err
    assert json.loads((out / "manifest.json").read_text())["parameters"]["seed"] == 3
    assert sorted(foreign_entries(out, DISTILLED_SET.written(out))) == ["NOTES.txt", "class_00/mine.txt", "mystuff/"]
    _no_leftovers(tmp_path)


def test_convert_dali_overwrite_keeps_the_users_files(tmp_path, capsys):
    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=3)
    out = tmp_path / "shards"
    argv = ["convert", "--format", "dali", "--data", str(data), "--out", str(out), "--workers", "1", "--quiet"]
    assert main(argv) == 0
    assert foreign_entries(out, SHARD_FOLDER.written(out)) == []
    (out / "README.mine").write_text("where these shards came from")
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "README.mine").read_text() == "where these shards came from" and (out / "dataset.json").is_file()
    assert "kept 1 entry rded-fast did not write: README.mine" in capsys.readouterr().err
    _no_leftovers(tmp_path)


def test_relabel_needs_overwrite_and_keeps_the_users_files(small, tmp_path, capsys):
    data, weights = small
    assert main(_distill_argv(data, weights, tmp_path / "d")) == 0
    labels = tmp_path / "labu"
    assert main(_relabel_argv(tmp_path / "d", weights, labels)) == 0
    assert foreign_entries(labels, LABEL_FOLDER.written(labels)) == []
    (labels / "README.mine").write_text("mine")
    before = tree_digest(labels)
    capsys.readouterr()
    assert main(_relabel_argv(tmp_path / "d", weights, labels)) == 2
    assert "holds an earlier rded-fast output; pass --overwrite" in _one_line_error(capsys)
    assert tree_digest(labels) == before
    assert main(_relabel_argv(tmp_path / "d", weights, labels, "--overwrite")) == 0
    assert (labels / "README.mine").read_text() == "mine" and (labels / "header.json").is_file()
    _no_leftovers(tmp_path)


def test_a_user_entry_the_new_output_also_names_stays_aside_and_is_named(tmp_path, capsys):
    out = tmp_path / "o"
    (out / ".rded-journal").mkdir(parents=True)
    (out / ".rded-journal" / "run.json").write_text("{}")
    (out / "class_05").write_text("a file of mine named like a class")
    with claim_output(out, "--out", {}, DISTILLED_SET, overwrite=True):
        (out / "class_05").mkdir(parents=True)  # the new run writes a class folder of that name
    err = capsys.readouterr().err
    aside = [p for p in tmp_path.iterdir() if ".rded-old-" in p.name]
    assert len(aside) == 1 and (aside[0] / "class_05").read_text() == "a file of mine named like a class"
    assert "could not move into the new output: class_05 (the new output has that name)" in err and str(aside[0]) in err


# ---- bad 6: shards of another source are another dataset -----------------------------------------------


def test_convert_dali_refuses_another_sources_shards_and_resumes_its_own(tmp_path, capsys):
    a = write_synthetic_jpegs(tmp_path / "A", classes=2, per_class=3, seed=0)
    b = write_synthetic_jpegs(tmp_path / "B", classes=2, per_class=3, seed=1)  # the same relative names
    out = tmp_path / "S"

    def convert(data, *extra):
        return main(["convert", "--format", "dali", "--data", str(data), "--out", str(out), "--workers", "1", "--quiet", *extra])

    assert convert(a) == 0
    shards = tree_digest(out)
    capsys.readouterr()
    assert convert(b) == 2
    err = _one_line_error(capsys)
    assert f"holds the shards of another source ({a.resolve()})" in err and "--overwrite" in err
    assert tree_digest(out) == shards
    (out / "dataset.json").unlink()  # an interrupted conversion of A: only its complete shards are there
    assert convert(b) == 2
    capsys.readouterr()
    assert convert(a) == 0  # the same source again: its complete shards are kept
    assert json.loads(capsys.readouterr().out)["reused_shards"] == 1 and tree_digest(out) == shards
    assert convert(b, "--overwrite") == 0
    assert json.loads((out / "dataset.json").read_text())["source_root"] == str(b.resolve())


# ---- bad 7: SIGTERM and SIGHUP clean up like Ctrl-C; a killed run's aside is named ------------------------


def test_sigterm_during_a_replace_puts_the_users_folder_back(small, tmp_path):
    data, weights = small
    user = tmp_path / "U"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    argv = [sys.executable, "-m", "rded_fast.cli", *_distill_argv(data, weights, user, "--overwrite-any")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not any(".rded-old-" in p.name for p in tmp_path.iterdir()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGSTOP)  # hold it mid-run, the user's folder moved aside
        assert proc.poll() is None and any(".rded-old-" in p.name for p in tmp_path.iterdir())
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(p.name for p in user.iterdir()) == ["thesis.txt"] and (user / "thesis.txt").read_text() == "years of work"
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_each_signal_puts_the_old_output_back_and_releases_the_lock(tmp_path, signum):
    from rded_fast.errors import Terminated

    if signal.getsignal(signum) == signal.SIG_IGN:
        pytest.skip(f"{signal.Signals(signum).name} is ignored here (nohup)")
    out = tmp_path / "o"
    (out / ".rded-journal").mkdir(parents=True)
    (out / ".rded-journal" / "run.json").write_text("{}")
    (out / "NOTES.txt").write_text("mine")
    before = tree_digest(out)
    with pytest.raises(KeyboardInterrupt) as info:
        with claim_output(out, "--out", {}, DISTILLED_SET, overwrite=True):
            (out / "manifest.json").parent.mkdir()
            (out / "manifest.json").write_text("half")
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here
    assert isinstance(info.value, Terminated) == (signum != signal.SIGINT)
    assert tree_digest(out) == before
    _no_leftovers(tmp_path)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are the caller's again


def test_what_a_killed_run_left_aside_is_named_on_every_later_run(small, tmp_path, capsys):
    data, weights = small
    out = tmp_path / "o"
    aside = tmp_path / ".o.rded-old-4242"  # as SIGKILL during a replace leaves it
    aside.mkdir()
    (aside / "thesis.txt").write_text("years of work")
    for extra in ([], ["--resume"]):
        assert main(_distill_argv(data, weights, out, *extra)) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if ".o.rded-old-4242" in line]
        assert len(notes) == 1 and "move it back or delete it" in notes[0]
    assert (aside / "thesis.txt").read_text() == "years of work"


# ---- bad 14: a resume with another observer is refused ----------------------------------------------------


def test_resume_refuses_an_observer_retrained_into_the_same_path(small, tmp_path, capsys):
    from rded_fast.models import build

    data, weights = small
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0
    (out / ".rded-journal" / "class_000001.json").unlink()  # as if killed after class_00
    torch.manual_seed(1)  # retrained into the same path
    torch.save({"model": build("conv3", 2, None, 32).model.state_dict()}, weights)
    capsys.readouterr()
    assert main(_distill_argv(data, weights, out, "--resume")) == 2
    err = _one_line_error(capsys)
    assert "the observer's weights changed since the interrupted run" in err and "start a new --out" in err
    assert not (out / ".rded-journal" / "class_000001.json").exists()


# ---- weak: errors before any work are user errors that do not promise a resume -----------------------------


def _writable(folder: str) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.mark.skipif(_writable("/sys"), reason="needs a folder no process may write in")
def test_an_out_in_a_read_only_place_is_refused_up_front(small, capsys):
    data, weights = small
    assert main(_distill_argv(data, weights, "/sys/rded-fast-out")) == 2
    err = _one_line_error(capsys)
    assert "--out /sys/rded-fast-out: cannot write in /sys" in err and "--resume" not in err


def test_bad_index_paths_are_refused_up_front(small, tmp_path, capsys):
    data, weights = small
    out = tmp_path / "o"
    (tmp_path / "adir").mkdir()
    (tmp_path / "w2.pth").write_bytes(weights.read_bytes())  # the user's checkpoint given as --index by mistake
    cases = {
        "": "--index '': an empty path",
        str(tmp_path / "adir"): "is a folder; give a file name",
        str(out / "index.npz"): "lies in --out",
        str(tmp_path / "w2.pth"): "not an index cache of rded-fast (rded-fast did not write it); give another path",
        str(tmp_path / "no" / "index.npz"): f"the folder {tmp_path / 'no'} does not exist",
    }
    for index, message in cases.items():
        assert main(_distill_argv(data, weights, out, "--index", index)) == 2, index
        err = _one_line_error(capsys)
        assert message in err and "--resume" not in err and "delete" not in err and "allow_pickle" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adir", "data", "w.pth", "w2.pth"]
    assert (tmp_path / "w2.pth").read_bytes() == weights.read_bytes()


def test_a_lock_path_that_is_a_folder_is_named(small, tmp_path, capsys):
    data, weights = small
    lock_path(tmp_path / "o").mkdir()
    assert main(_distill_argv(data, weights, tmp_path / "o")) == 2
    err = _one_line_error(capsys)
    assert "is not a lock rded-fast made" in err and "move it away" in err and "--resume" not in err


def test_resume_with_overwrite_any_names_that_flag(small, tmp_path, capsys):
    data, weights = small
    assert main(_distill_argv(data, weights, tmp_path / "o", "--resume", "--overwrite-any")) == 2
    assert "--resume and --overwrite-any exclude each other" in _one_line_error(capsys)


# ---- weak: locks --------------------------------------------------------------------------------------------


def test_an_output_in_use_is_named_before_what_it_holds(small, tmp_path, capsys):
    data, weights = small
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0  # what a running distill's output looks like to another
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock_path(out).write_text(lock_record(holder.pid))
        capsys.readouterr()
        assert main(_distill_argv(data, weights, out)) == 2
        err = _one_line_error(capsys)
        assert "in use by another rded-fast process" in err and "--overwrite" not in err
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_of_a_pid_now_running_something_else_is_stale(small, tmp_path, capsys):
    data, weights = small
    holder = subprocess.Popen(["sleep", "60"])  # alive, and not rded-fast
    try:
        for n, text in enumerate([f"{holder.pid} {os.uname().nodename}\n", f"{holder.pid} {os.uname().nodename} 12345\n"]):
            out = tmp_path / f"o{n}"
            lock_path(out).write_text(text)  # a lock from before a restart: the pid now belongs to another process
            assert main(_distill_argv(data, weights, out)) == 0, capsys.readouterr().err
            assert not lock_path(out).exists()
    finally:
        holder.kill()
        holder.wait()


# ---- weak: disk full names the path and leaves no temporary file ---------------------------------------------


def test_disk_full_names_the_file_and_leaves_no_temporary_files(small, tmp_path, capsys, monkeypatch):
    import rded_fast.fileio as fileio

    data, weights = small
    real_fdopen = os.fdopen

    class FullDisk:
        """A file on a full disk: writes are buffered, every flush fails, and so does close() with data pending."""

        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def write(self, data):
            return len(data)

        def flush(self):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return self.f.fileno()

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode: FullDisk(fd, mode))
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 1
    err = _one_line_error(capsys)
    assert err.startswith(
        f"rded-fast distill: error: --out {out}: No space left on device ({out}/class_00/class00000_id00000.png)"
    )
    assert not [str(p) for p in tmp_path.rglob("*.tmp")]


# ---- weak: a stale index cache is read again, file by file --------------------------------------------------


def test_an_image_saved_again_at_another_size_is_not_planned_from_the_cache(tmp_path, capsys):
    tree = write_synthetic_jpegs(tmp_path / "tree", classes=2, per_class=3)
    cache = tmp_path / "index.npz"
    assert main(["index", "--data", str(tree), "--out", str(cache), "--quiet"]) == 0
    for path in sorted(tree.rglob("*.jpg")):
        with Image.open(path) as im:
            im.resize((im.width + 17, im.height + 9)).save(path)  # the same names, other sizes
    argv = ["distill", "--data", str(tree), "--index", str(cache), "--out", str(tmp_path / "o"), "--observer", "conv3"]
    argv += (
        "--input-size 32 --factor 1 --ipc 1 --mipc 3 --num-crop 1 --device cpu --workers 0 --quiet --select random-crops".split()
    )
    assert main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    for image in manifest["images"]:
        for cell in image["cells"]:
            with Image.open(tree / cell["source"]) as im:
                assert cell["source_size"] == [im.width, im.height]
    from rded_fast.index import load_index

    cached = load_index(cache)  # the cache now holds the new sizes
    for rel, (w, h) in zip(cached.paths, cached.sizes.tolist()):
        with Image.open(tree / rel) as im:
            assert (w, h) == im.size


# ---- weak: output files: suggestions, missing folders, bench ----------------------------------------------


def test_output_file_refusals_suggest_a_file_name_and_create_no_folder(small, tmp_path, capsys):
    data, _ = small
    base = ["evaluate", "--distilled", str(tmp_path / "nope"), "--val", str(data), "--teacher", "conv3"]
    base += ["--student", "conv3", "--epochs", "1", "--quiet"]
    assert main(base + ["--json", str(data / "eval.json")]) == 2
    assert f"e.g. {tmp_path / 'eval.json'}" in _one_line_error(capsys)
    assert main(base + ["--json", str(tmp_path / "missing" / "sub" / "r.json")]) == 2
    assert f"the folder {tmp_path / 'missing'} does not exist; create it first" in _one_line_error(capsys)
    assert not (tmp_path / "missing").exists()


def test_bench_json_is_checked_before_the_work(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    argv = ["bench", "--stage", "decode", "--data", str(tmp_path / "no-data"), "--device", "cpu"]
    assert main(argv + ["--json", str(notes)]) == 2
    assert "a file that rded-fast did not write exists there" in _one_line_error(capsys)
    assert notes.read_text() == "mine"
    assert main(argv + ["--json", str(tmp_path / "missing" / "b.json")]) == 2
    assert "does not exist; create it first" in _one_line_error(capsys)
