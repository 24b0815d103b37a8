"""One writer per output: the lock file `.NAME.rded-lock` beside the output `NAME`.

The lock holds the pid, the host and the process's start time. It is made atomically (written in full
under a private name, then hard-linked into place: link() fails when a lock exists, and a lock is never
seen without its holder). A lock is held while its process runs; one whose process is gone, or whose pid
now belongs to another process (the start time differs, e.g. after a container restart), is stale and
taken over. A lock from another host cannot be checked and is always respected.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from rded_fast.errors import UserError

LOCK_SUFFIX = ".rded-lock"


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def lock_record(pid: int) -> str:
    """The text of a lock held by process `pid` of this host."""
    return f"{pid} {socket.gethostname()} {start_time(pid) or '-'}\n"


def _holder(path: Path) -> tuple[int, str, str | None] | None:
    """(pid, host, start time or None) of a lock; None when the file is not a lock of ours."""
    try:
        fields = path.read_text().split()
        return int(fields[0]), fields[1], (fields[2] if len(fields) > 2 and fields[2] != "-" else None)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _held(holder: tuple[int, str, str | None]) -> bool:
    """Whether the process that wrote the lock still runs: same pid and same start time (a lock written before
    start times were recorded: the pid runs rded-fast)."""
    pid, host, started = holder
    if host != socket.gethostname():
        return True
    if not _alive(pid):
        return False
    now = start_time(pid)
    if now is None:  # no /proc: a live pid is all there is to go on
        return True
    if started is not None:
        return now == started
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"rded_fast" in command or b"rded-fast" in command


def _in_use(flag: str, target: Path, path: Path, holder: tuple[int, str, str | None]) -> UserError:
    return UserError(
        f"{flag} {target}: in use by another rded-fast process (pid {holder[0]} on {holder[1]}, lock {path}); "
        "wait for it to finish, or delete the lock if no such process runs"
    )


def check_not_held(target: Path, flag: str) -> None:
    """Refuse at once when a live process holds the lock of `target` (before judging what `target` holds)."""
    path = lock_path(target)
    holder = _holder(path) if path.is_file() else None
    if holder is not None and _held(holder):
        raise _in_use(flag, target, path, holder)


def acquire_lock(target: Path, flag: str) -> Path:
    """Create the lock of `target` exclusively; refuse when a live process holds it. Returns the lock path."""
    path = lock_path(target)
    mine = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    mine.write_text(lock_record(os.getpid()))
    try:
        return _link_lock(mine, path, target, flag)
    finally:
        mine.unlink(missing_ok=True)


def _link_lock(mine: Path, path: Path, target: Path, flag: str) -> Path:
    for _ in range(3):
        try:
            os.link(mine, path)
        except FileExistsError:
            holder = _holder(path) if path.is_file() and not path.is_symlink() else None
            if holder is None:
                raise UserError(
                    f"{flag} {target}: {path} exists and is not a lock rded-fast made (rded-fast keeps its lock file "
                    "there); move it away, then rerun"
                ) from None
            if _held(holder):
                raise _in_use(flag, target, path, holder) from None
            _break_stale(path, holder)
            continue
        return path
    raise UserError(f"{flag} {target}: could not take the lock {path}; delete it if no rded-fast process runs")


def _break_stale(path: Path, holder: tuple[int, str, str | None]) -> None:
    """Remove a stale lock; rename first so that a fresh lock another process just made is not removed."""
    grab = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, grab)
    except FileNotFoundError:
        return
    if _holder(grab) != holder and not os.path.exists(path):
        os.rename(grab, path)  # not the stale lock we read: it belongs to a live process, put it back
        return
    os.unlink(grab)


def release_lock(path: Path) -> None:
    try:
        holder = _holder(path)
        if holder is not None and holder[:2] == (os.getpid(), socket.gethostname()):
            os.unlink(path)
    except OSError:
        pass
