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
from tests.test_safety import _distill_argv, _one_line_error

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

    from rded_fast.cli import os_error_message

    out = str(tmp_path / ("x" * 300))
    exc = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), out)
    for command in ("distill", "train-observer", "convert"):
        args = argparse.Namespace(command=command, out=out, format="dali", checkpoint=None)
        assert os_error_message(args, exc).endswith(f"File name too long ({out}); fix it and rerun {command}")
