"""The `rded-fast` command leaves without the interpreter's teardown, and loses nothing by it: its output, its exit
status, the exit handlers, and work still running in a thread (then it exits the normal way)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_exit_keeps_status_output_and_exit_handlers(tmp_path):
    marker = tmp_path / "handler_ran"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "from rded_fast.process import exit_promptly\n"
        "print('x' * 100000)\n"  # more than a pipe's buffer: it must all arrive
        "print('to stderr', file=sys.stderr)\n"
        "exit_promptly(5)\n"
        "print('never')\n"
    )
    proc = _run(code)
    assert proc.returncode == 5
    assert proc.stdout == "x" * 100000 + "\n" and proc.stderr == "to stderr\n"
    assert marker.read_text() == "ran"


def test_exit_waits_for_a_thread_still_working(tmp_path):
    done = tmp_path / "thread_done"
    code = (
        "import threading, time\n"
        "from rded_fast.process import exit_promptly\n"
        f"worker = threading.Thread(target=lambda: (time.sleep(0.5), open({str(done)!r}, 'w').write('done')))\n"
        "worker.start()\n"
        "exit_promptly(3)\n"
    )
    proc = _run(code)
    assert proc.returncode == 3 and done.read_text() == "done"


def test_command_status_and_error_line():
    """The installed command's way out: a user mistake is one line and status 2, a success 0."""
    bad = subprocess.run(
        [sys.executable, "cli.py", "distill", "--data", "x", "--observer", "conv3", "--out", "y", "--ipc", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--ipc 0" in bad.stderr
    good = subprocess.run([sys.executable, "cli.py", "models"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and "conv3" in good.stdout
