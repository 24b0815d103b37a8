"""The command's process around its work: an inductor cache it can use at the start, what it says when a signal
ends it, a prompt exit at the end."""

from __future__ import annotations

import atexit
import os
import sys
import threading


def usable_inductor_cache() -> None:
    """An unusable TORCHINDUCTOR_CACHE_DIR makes `import torchvision` fail (torch creates it at import),
    even for runs that never compile: point it at a fresh temporary folder for this run, and say so."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK | os.X_OK):
            return
        why = "not writable"
    except OSError as exc:
        why = exc.strerror or str(exc)
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rded-fast-inductor-")
    print(
        f"note: TORCHINDUCTOR_CACHE_DIR {path} is unusable ({why}); using {os.environ['TORCHINDUCTOR_CACHE_DIR']} for this run",
        file=sys.stderr,
    )


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """What the command says when Ctrl-C, SIGTERM or SIGHUP ended it (`exc.signum`, when not SIGINT), and whether the
    earlier output was put back (`exc.put_back`, rded_fast.outputs)."""
    signum = getattr(exc, "signum", 2)
    back = f"; the earlier output {exc.put_back} was put back as it was" if getattr(exc, "put_back", None) else ""
    return f"interrupted{f' ({exc})' if signum != 2 else ''}{back}"


def exit_promptly(code: int) -> None:
    """Exit with `code` without the interpreter's teardown of torch and its libraries (about a second after every
    command: benchmarks/README.md, "Timings the code quotes"): streams are flushed and exit handlers run, as at a
    normal exit. By then every file is written and renamed (each write is atomic). Only when a thread other than
    idle executor workers is still alive (work a normal exit would wait for) is the exit the normal one; unnamed
    executor workers are library pools (torch's compile workers) that a normal exit joins idle. After a signal
    (`code` 128 + signum) nothing is waited for: the run has cleaned up (the earlier output is back), a scheduler
    expects the process gone within seconds, and a thread the signal interrupted mid-import may never end."""
    busy = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive() and not t.name.startswith("ThreadPoolExecutor-")
    ]
    if busy and code <= 128:
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs after joining threads: logging, process pools, torchrun's group
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say there
            pass
    os._exit(code)
