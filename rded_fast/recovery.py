"""After an OS error (disk full, permissions, a vanished file): which argument's path failed, and how to go on.

`os_error_message` names the argument whose path holds the failing file and says what the run kept: finished
classes of a distill (its journal), an observer's per-epoch state, evaluate's checkpoint, complete shards of a
conversion; a replacing run that failed has put the earlier output back. Each output's own module says what it kept.
"""

from __future__ import annotations

import os
from pathlib import Path

# arguments whose values are names, not paths: never the argument at fault
NOT_PATHS = ("command", "device", "loader", "observer", "arch")


def os_error_message(command: str, arguments: dict, exc: OSError) -> str:
    """`--out DIR: No space left on device (...); fix`: the argument (of `arguments`, dest -> value, as parsed) whose
    path holds the failing file, the error, and the fix for `command`."""
    where = f" ({exc.filename})" if exc.filename else ""
    flag = _flag_at_fault(arguments, exc.filename) if exc.filename else None
    head = f"{flag}: " if flag else ""
    return f"{head}{exc.strerror or exc}{where}; {os_error_fix(command, arguments, exc)}"


def _flag_at_fault(arguments: dict, filename) -> str | None:
    """`--dest value` of the first path argument that is the failing file, holds it, or names a file beside it
    (a temporary or lock file named after it)."""
    failing = Path(os.path.abspath(str(filename)))
    for dest, value in arguments.items():
        if isinstance(value, str) and value and dest not in NOT_PATHS:
            mine = Path(os.path.abspath(value))
            if failing == mine or failing.is_relative_to(mine) or (failing.parent == mine.parent and mine.name in failing.name):
                return f"--{dest.replace('_', '-')} {value}"
    return None


def os_error_fix(command: str, arguments: dict, exc: OSError) -> str:
    """What to do after an OS error: continue with --resume only where finished work was kept; a replacing run that
    failed has put the earlier output back. Looking for that work may fail the same way (a name too long, a folder
    unreadable): then the plain advice."""
    try:
        return _kept_work_fix(command, arguments, exc) or f"fix it and rerun {command}"
    except OSError:
        return f"fix it and rerun {command}"


def _kept_work_fix(command: str, arguments: dict, exc: OSError) -> str | None:
    """The advice when `command` kept finished work (or put the earlier output back); None when it kept none."""
    if getattr(exc, "put_back", None):
        return f"the earlier output {exc.put_back} was put back as it was; fix it and rerun"
    out = arguments.get("out") or ""
    if command == "distill" and out:
        from rded_fast.journal import journal_dir

        if any(journal_dir(out).glob("class_*.json")):  # a finished class's record (rded_fast.journal)
            return "finished classes are kept; fix it and rerun with --resume"
    if command == "train-observer":
        from rded_fast.train.observer import state_path

        if Path(state_path(out)).is_file():
            return "the per-epoch state OUT.state is kept; fix it and rerun with --resume"
    checkpoint = arguments.get("checkpoint")
    if command == "evaluate" and checkpoint and Path(checkpoint).is_file():
        return "fix it and rerun with --resume (--checkpoint holds the last finished epoch)"
    if command == "convert" and out:
        from rded_fast.formats.shards import recorded_shards

        if recorded_shards(Path(out)):  # a shard folder's records (a .beton is a file: none)
            return "fix it and rerun convert (complete shards are kept)"
    return None
