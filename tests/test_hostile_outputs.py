"""Issue 35, outputs: signals on a busy machine, readers and writers of one converted source, what --overwrite
deletes (our records, not names that look like ours), and over-long output names. Each test failed on 0.2.3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from rded_fast.cli import main
from tests.conftest import _distill_argv, _one_line_error

ROOT = Path(__file__).parent.parent


@contextmanager
def busy_machine(processes: int = 2):
    """Processes that keep the CPUs busy for the block (a shared machine, another job beside the tests)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until `path` exists (the process writes it when it is ready); fails when the process ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)


# ---- bad 1: SIGTERM ends the run and puts the folder back, whatever threads are alive, on a busy machine -------


def test_sigterm_on_a_busy_machine_ends_the_run_whatever_threads_are_alive(small, tmp_path):
    data, weights = small
    user = tmp_path / "U"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    ready = tmp_path / "ready"
    argv = _distill_argv(data, weights, user, "--overwrite-any")
    argv[argv.index("conv3")] = "tests.observer_factories:stuck_thread_then_wait"
    env = {**os.environ, "RDED_TEST_READY": str(ready)}
    with busy_machine():
        proc = subprocess.Popen(
            [sys.executable, "-m", "rded_fast.cli", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _wait_for(ready, proc)  # the output is claimed (moved aside) and a thread that never ends is alive
            assert any(".rded-old-" in p.name for p in tmp_path.iterdir())
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "put back" in proc.stderr.read().decode()
    assert sorted(p.name for p in user.iterdir()) == ["thesis.txt"] and (user / "thesis.txt").read_text() == "years of work"
    assert not [p.name for p in tmp_path.iterdir() if ".rded-" in p.name]


def test_a_preloaded_loader_never_holds_up_the_exit(tmp_path):
    """A signal that lands while the main thread holds the import lock leaves it held for ever (CPython restores
    no lock a KeyboardInterrupt skipped): the preload thread then waits on it, and the process must still end."""
    code = (
        "import _imp, sys\n"
        "from rded_fast.loaders import preload\n"
        "sys.modules.pop('rded_fast.loaders.torch_loader', None)\n"
        "_imp.acquire_lock()\n"  # as an interrupted import leaves it
        "preload('torch')\n"
        "sys.exit(143)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True)
    assert proc.returncode == 143, proc.stderr.decode()


def test_a_signal_inside_the_import_machinery_is_raised_just_after_it(tmp_path):
    """Raised inside importlib's own locking, Terminated would leave an import lock held for ever, or be swallowed by
    its weakref callback: the handler lets that code finish and the signal arrives again a few ms later."""
    import time
    import types

    from rded_fast.errors import Terminated
    from rded_fast.outputs import DISTILLED_SET, claim_output

    importing = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename="<frozen importlib._bootstrap>"))
    reached = False
    with pytest.raises(Terminated):
        with claim_output(tmp_path / "o", "--out", {}, DISTILLED_SET):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, importing)  # returns instead of raising there
            reached = True
            time.sleep(60)  # the signal comes again here, outside the import machinery, and raises
    assert reached and not (tmp_path / "o").exists()


# ---- bad 8 and weak: an output name too long for the file system, or for the names kept beside it -----------


@pytest.mark.parametrize("size", [300, 250])
@pytest.mark.parametrize("command", ["distill", "convert-dali", "convert-ffcv", "train-observer"])
def test_an_output_name_too_long_is_one_line_naming_the_argument(small, tmp_path, capsys, command, size):
    data, weights = small
    out = tmp_path / ("x" * size)
    argv = {
        "distill": _distill_argv(data, weights, out),
        "convert-dali": ["convert", "--format", "dali", "--data", str(data), "--out", str(out), "--quiet"],
        "convert-ffcv": ["convert", "--format", "ffcv", "--data", str(data), "--out", str(out), "--quiet"],
        "train-observer": ["train-observer", "--data", str(data), "--out", str(out), "--epochs", "1", "--quiet"],
    }[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"--out {out}: the name xxxxxxxxxxxxxxxxxxxx... is" in err and "long" in err and "shorter" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "w.pth"]


def test_the_os_error_message_survives_a_second_failure_while_looking_for_kept_work(tmp_path):
    import argparse
    import errno

    from rded_fast.recovery import os_error_message

    out = str(tmp_path / ("x" * 300))
    exc = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), out)
    for command in ("distill", "train-observer", "convert"):
        args = argparse.Namespace(command=command, out=out, format="dali", checkpoint=None)
        assert os_error_message(args.command, vars(args), exc).endswith(f"File name too long ({out}); fix it and rerun {command}")


# ---- bad 7: --overwrite deletes what our records say we wrote, never a name that merely looks like ours ------


def _looks_like_ours(folder: Path, files: list[str]) -> dict[str, bytes]:
    """User files named as a run of ours names its files, none of which a record of ours lists."""
    made = {}
    for rel in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(made.setdefault(rel, f"mine: {rel}".encode()))
    return made


def _kept_note(err: str) -> str:
    notes = [line for line in err.splitlines() if "rded-fast did not write" in line]
    assert len(notes) == 1, err
    return notes[0]


def test_distill_overwrite_keeps_user_files_that_look_like_ours(small, tmp_path, capsys):
    from rded_fast.outputs import DISTILLED_SET, foreign_entries

    data, weights = small
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0
    mine = _looks_like_ours(
        out, ["favorites/class00000_id00000.png", "class_00/class00000_id00099.png", "class00000_id00000.png"]
    )
    capsys.readouterr()
    assert main(_distill_argv(data, weights, out, "--overwrite", "--seed", "3")) == 0
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    note = _kept_note(capsys.readouterr().err)
    assert "kept 3 entries" in note and all(rel.split("/")[0] in note for rel in mine)
    assert sorted(foreign_entries(out, DISTILLED_SET.written(out))) == sorted(["favorites/", *list(mine)[1:]])


def test_distill_overwrite_deletes_what_an_interrupted_run_was_writing(small, tmp_path, capsys):
    """A run killed between a class's images and its journal record: the images are ours (run.json and index.npz
    say which names that run was writing), not the user's."""
    data, weights = small
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0
    (out / "manifest.json").unlink()
    (out / ".rded-journal" / "class_000001.json").unlink()  # class_01's image is on disk, its record is not
    (out / "class_01" / ".class00001_id00000.png.k3j9x2ab.tmp").write_bytes(b"half")  # and a write it had begun
    capsys.readouterr()
    assert main(_distill_argv(data, weights, out, "--overwrite")) == 0
    assert "did not write" not in capsys.readouterr().err
    assert sorted(p.name for p in (out / "class_01").iterdir()) == ["class00001_id00000.png"]


def test_convert_dali_keeps_user_files_named_like_shards(tmp_path, capsys):
    from tests.conftest import write_synthetic_jpegs

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=3)
    out = tmp_path / "shards"
    argv = ["convert", "--format", "dali", "--data", str(data), "--out", str(out), "--workers", "1", "--quiet"]
    assert main(argv) == 0
    mine = _looks_like_ours(out, ["shard-00042.tar", "shard-00042.meta.json", ".shard-00042.tar.k3j9x2ab.tmp"])
    assert main(argv) == 0  # a rerun (shards reused) removes stale shards of ours only
    assert main(argv + ["--overwrite"]) == 0
    assert {rel: (out / rel).read_bytes() for rel in mine} == mine
    assert "kept 3 entries" in _kept_note(capsys.readouterr().err)


def test_convert_dali_rerun_removes_only_its_own_stale_shards(tmp_path):
    from tests.conftest import write_synthetic_jpegs

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=6)
    out = tmp_path / "shards"
    argv = ["convert", "--format", "dali", "--data", str(data), "--out", str(out), "--workers", "1", "--quiet"]
    assert main(argv + ["--shard-size", "8KB"]) == 0
    many = sorted(p.name for p in out.glob("shard-*.tar"))
    assert len(many) > 2
    assert main(argv + ["--overwrite"]) == 0  # one shard now: the others are stale, and recorded as ours
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json",
        "shard-00000.idx",
        "shard-00000.meta.json",
        "shard-00000.tar",
    ]


def test_relabel_overwrite_keeps_an_epoch_file_it_did_not_announce(small, tmp_path, capsys):
    from tests.conftest import _relabel_argv

    data, weights = small
    assert main(_distill_argv(data, weights, tmp_path / "d")) == 0
    labels = tmp_path / "labels"
    assert main(_relabel_argv(tmp_path / "d", weights, labels)) == 0
    mine = _looks_like_ours(labels, ["epoch_0007.npz"])
    capsys.readouterr()
    assert main(_relabel_argv(tmp_path / "d", weights, labels, "--overwrite")) == 0
    assert (labels / "epoch_0007.npz").read_bytes() == mine["epoch_0007.npz"]
    assert "kept 1 entry rded-fast did not write: epoch_0007.npz" in _kept_note(capsys.readouterr().err)


def test_a_demo_folder_is_judged_by_its_distilled_sets_records(small, tmp_path):
    from rded_fast.outputs import DEMO_FOLDER, foreign_entries

    data, weights = small
    demo = tmp_path / "demo"
    demo.mkdir()
    assert main(_distill_argv(data, weights, demo / "distilled")) == 0
    (demo / "evaluate.json").write_text("{}")
    _looks_like_ours(demo, ["distilled/favorites/class00000_id00000.png", "distilled/class_00/class00000_id00003.png"])
    assert foreign_entries(demo, DEMO_FOLDER.written(demo)) == [
        "distilled/class_00/class00000_id00003.png",
        "distilled/favorites/",
    ]


# ---- weak: an immutable user file, a mount point, a factory inside --out ------------------------------------


def test_a_user_file_that_cannot_be_moved_is_named_with_the_real_reason(tmp_path, capsys, monkeypatch):
    """chattr +i makes rename fail with EPERM (simulated: tests may run where chattr is unavailable)."""
    import errno

    from rded_fast.outputs import DISTILLED_SET, claim_output

    out = tmp_path / "o"
    (out / ".rded-journal").mkdir(parents=True)
    (out / ".rded-journal" / "run.json").write_text("{}")
    (out / "frozen.txt").write_text("chattr +i")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name == "frozen.txt":
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with claim_output(out, "--out", {}, DISTILLED_SET, overwrite=True):
        (out / "manifest.json").parent.mkdir()
    err = capsys.readouterr().err
    assert "frozen.txt (Operation not permitted: an immutable or append-only file?)" in err
    assert "the new output has that name" not in err
    aside = [p for p in tmp_path.iterdir() if ".rded-old-" in p.name]
    assert len(aside) == 1 and (aside[0] / "frozen.txt").read_text() == "chattr +i" and str(aside[0]) in err


def test_overwrite_of_a_mount_point_says_it_cannot_be_moved_aside(small, tmp_path, capsys, monkeypatch):
    data, weights = small
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0
    mounted = os.path.realpath(out)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.path.realpath(p) == mounted or real_ismount(p))
    capsys.readouterr()
    assert main(_distill_argv(data, weights, out, "--overwrite")) == 2
    err = _one_line_error(capsys)
    assert "a mount point" in err and "cannot be done to a mount point" in err and "--resume" not in err
    assert (out / "manifest.json").is_file()


def test_a_factory_file_inside_out_is_refused_up_front(small, tmp_path, capsys):
    data, weights = small
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.py").write_text((ROOT / "tests" / "observer_factories.py").read_text())
    argv = _distill_argv(data, weights, out, "--overwrite-any")
    argv[argv.index("conv3")] = f"{out / 'mine.py'}:tiny_observer"
    argv[argv.index(str(weights)) - 1 : argv.index(str(weights)) + 1] = []  # a random-init factory model
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert f"--out {out} contains --observer {out / 'mine.py'}" in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.py"]


# ---- bad 6: a reader and the writer of one shard folder (or .beton) never meet -------------------------------


def _convert_argv(data: Path, out: Path, fmt: str = "dali") -> list[str]:
    return ["convert", "--format", fmt, "--data", str(data), "--out", str(out), "--workers", "1", "--quiet"]


def _no_use_locks(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".rded-lock" in p.name]


def test_convert_refuses_to_rewrite_a_source_a_distill_is_reading(tmp_path, capsys):
    import json

    from rded_fast.formats import reading
    from tests.conftest import tree_digest, write_synthetic_jpegs

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=3)
    shards = tmp_path / "shards"
    assert main(_convert_argv(data, shards)) == 0
    beton = tmp_path / "train.beton"  # a .beton of ours as far as the lock is concerned: its sidecar names our format
    beton.write_bytes(b"beton")
    Path(f"{beton}.json").write_text(json.dumps({"format": "rded-fast/ffcv-beton"}))
    before = tree_digest(tmp_path)
    capsys.readouterr()
    with reading(shards), reading(beton):  # two distill runs reading them
        for argv in (_convert_argv(data, shards), _convert_argv(data, shards) + ["--overwrite"]):
            assert main(argv) == 2
            assert f"--out {shards}: being read by another rded-fast process" in _one_line_error(capsys)
        assert main(_convert_argv(data, beton, "ffcv") + ["--overwrite"]) == 2
        assert f"--out {beton}: being read by another rded-fast process" in _one_line_error(capsys)
    assert tree_digest(tmp_path) == before
    assert main(_convert_argv(data, shards) + ["--overwrite"]) == 0  # the readers are done
    _no_use_locks(tmp_path)


def test_distill_refuses_a_source_a_convert_is_writing(small, tmp_path, capsys):
    from rded_fast.formats.shards import SHARD_FOLDER
    from rded_fast.outputs import claim_output

    data, weights = small
    shards = tmp_path / "shards"
    assert main(_convert_argv(data, shards)) == 0
    argv = _distill_argv(shards, weights, tmp_path / "o", "--loader", "dali")
    capsys.readouterr()
    for rewrite in ({"resume": True}, {"overwrite": True}):  # a rerun rewriting shards in place; --overwrite
        with pytest.raises(RuntimeError), claim_output(shards, "--out", {}, SHARD_FOLDER, **rewrite):  # a convert (us)
            assert main(argv) == 2
            assert f"--data {shards}: in use by another rded-fast process (pid {os.getpid()}" in _one_line_error(capsys)
            raise RuntimeError("that convert fails: the shards are put back as they were")
    assert not (tmp_path / "o").exists()
    assert main(argv) == 0
    _no_use_locks(tmp_path)


def test_convert_and_distill_processes_on_one_shard_folder(small, tmp_path, capsys):
    """A distill paused mid-run keeps convert out; once it is killed (no clean-up at all) nothing it held blocks
    the next convert or distill."""
    data, weights = small
    shards, out = tmp_path / "shards", tmp_path / "o"
    assert main(_convert_argv(data, shards)) == 0
    cmd = [sys.executable, "-m", "rded_fast.cli", *_distill_argv(shards, weights, out, "--loader", "dali")]
    for end in ("finish", "kill"):
        capsys.readouterr()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for(tmp_path / ".o.rded-lock", proc)  # its --out is claimed: the source is locked before that
            os.kill(proc.pid, signal.SIGSTOP)
            assert main(_convert_argv(data, shards) + ["--overwrite"]) == 2
            assert f"being read by another rded-fast process (pid {proc.pid})" in _one_line_error(capsys)
            if end == "kill":
                proc.kill()
            os.kill(proc.pid, signal.SIGCONT)
            assert proc.wait(timeout=240) == (0 if end == "finish" else -signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert main(_convert_argv(data, shards) + ["--overwrite"]) == 0
        cmd.append("--overwrite")
    assert subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0  # the killed run's --out lock is stale
    _no_use_locks(tmp_path)


# ---- weak: ffcv's writer workers die with a killed convert; a rerun removes only our own stale temporaries ----

_FFCV_PARENT = """
import multiprocessing, os, sys, time, types
from rded_fast.converters.beton import _Samples

samples = _Samples(types.SimpleNamespace(root="/nonexistent", paths=["a.jpg"], labels=[0]), False)

def worker(ready):
    samples[0]  # ffcv's worker: its first sample
    open(ready, "w").write(str(os.getpid()))
    while True:  # as a worker with a long queue left goes on writing
        time.sleep(1)

multiprocessing.get_context("fork").Process(target=worker, args=(sys.argv[1],)).start()
while True:
    time.sleep(1)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def test_ffcv_writer_workers_die_with_a_killed_convert(tmp_path):
    import time

    ready = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-c", _FFCV_PARENT, str(ready)], cwd=ROOT, stderr=subprocess.PIPE)
    worker = None
    try:
        _wait_for(ready, parent)
        worker = int(ready.read_text())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 60
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(worker)
    finally:
        parent.kill()
        parent.wait()
        if worker is not None and not _gone(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_rerun_removes_only_our_own_stale_temporaries(small, tmp_path):
    import json

    from rded_fast.formats.beton import BETON
    from rded_fast.outputs import claim_output

    beton = tmp_path / "train.beton"
    stale = [".train.beton.k3j9x2ab.tmp", ".train.beton.json.x8a0c1qq.tmp"]  # what a killed convert --format beton left
    kept = [".train.beton.mine.tmp", ".other.beton.k3j9x2ab.tmp", "train.beton.k3j9x2ab.tmp", ".train.beton.k3j9x2ab.tmp.bak"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 2048)
    with claim_output(beton, "--out", {}, BETON):
        beton.write_bytes(b"new")
        Path(f"{beton}.json").write_text(json.dumps({"format": "rded-fast/ffcv-beton"}))
    assert not [n for n in stale if (tmp_path / n).exists()] and all((tmp_path / n).exists() for n in kept)

    data, weights = small  # a distill continued in place: its records name the temporaries of its own files
    out = tmp_path / "o"
    assert main(_distill_argv(data, weights, out)) == 0
    ours, mine = out / "class_00" / ".class00000_id00000.png.k3j9x2ab.tmp", out / "class_00" / ".notes.txt.k3j9x2ab.tmp"
    ours.write_bytes(b"half")
    mine.write_bytes(b"mine")
    assert main(_distill_argv(data, weights, out, "--resume")) == 0
    assert not ours.exists() and mine.read_bytes() == b"mine"


# ---- weak: no torch CUDA_HOME warning on a CPU machine ---------------------------------------------------------


def test_no_cuda_home_warning_when_compiling_on_a_cpu(tmp_path):
    """Inductor imports torch.utils.cpp_extension when it compiles on a CPU, which warns where a CUDA toolkit is
    installed but no GPU is usable (the demo showed it); CUDA_HOME makes that machine here."""
    code = "import rded_fast, torch.utils.cpp_extension, torch; print(torch.cuda.is_available())"
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
    assert "No CUDA runtime is found" not in proc.stderr


# ---- weak: libjpeg's warnings under the tvjpeg loader on a CPU name the file -----------------------------------


def test_tvjpeg_on_a_cpu_names_the_file_libjpeg_warns_about(small, tmp_path):
    data, weights = small
    good = (data / "class_01" / "img_002.jpg").read_bytes()
    scan = good.index(b"\xff\xda")
    bad = data / "class_01" / "img_009.jpg"  # its scan cut short, the end marker kept: a sound structure
    bad.write_bytes(good[: scan + (len(good) - scan) // 2] + b"\xff\xd9")
    argv = _distill_argv(data, weights, tmp_path / "o", "--loader", "tvjpeg", "--mipc", "8")
    proc = subprocess.run([sys.executable, "-m", "rded_fast.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if line.startswith("Corrupt JPEG data")], proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "libjpeg" in line]
    assert notes == [
        f"note: {bad}: libjpeg: Corrupt JPEG data: premature end of data segment (decoded all the same, as PIL decodes it)"
    ]


def test_train_observer_refuses_a_user_file_where_it_keeps_its_state(small, tmp_path, capsys):
    import torch

    from rded_fast.outputs import is_training_state
    from rded_fast.train import checkpoint

    data, _ = small
    out = tmp_path / "obs.pth"
    Path(f"{out}.state").write_text("my notes, named like a training state")
    argv = ["train-observer", "--data", str(data), "--out", str(out), "--epochs", "1", "--quiet"]
    capsys.readouterr()
    for extra in ([], ["--resume"]):
        assert main(argv + extra) == 2
        assert f"--out {out}: obs.pth.state beside it is not a file of rded-fast's" in _one_line_error(capsys)
    assert Path(f"{out}.state").read_text() == "my notes, named like a training state" and not out.exists()
    model = torch.nn.Linear(2, 2)  # a state as train-observer saves it is recognised
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    checkpoint.save_state(tmp_path / "real.state", checkpoint.capture(model, opt, sched, torch.Generator(), 0, losses=[1.0]))
    assert is_training_state(tmp_path / "real.state")
