"""Readers and the writer of one converted source (a shard folder, a .beton) never meet.

`distill` reading a shard folder or a .beton holds a shared lock on it for the whole run; `convert` writing one (new,
`--overwrite`, or a rerun that rewrites shards in place) holds the exclusive lock. Whichever comes second is refused
in one line naming the other: a DALI or ffcv reader whose files are rewritten under it crashes (SIGSEGV) or reads
another dataset's bytes.

The lock is `flock` on `.NAME.rded-lock.use` beside the source (beside, not inside: `--overwrite` moves the source
aside). The kernel drops a lock when its process dies, so a crashed run never blocks the next one; the last user
removes the file (under the exclusive lock; a process that opened the removed file sees it is gone and tries again).
A reader that cannot create the file (read-only storage) reads without it: no writer of ours can write there either.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rded_fast.errors import UserError
from rded_fast.lock import LOCK_SUFFIX, check_not_held

TRIES = 50  # a lock held only while its last user removes the file is gone within these (20 ms apart)


def use_path(target: Path) -> Path:
    """The lock file of source `target`."""
    return target.parent / f".{target.name}{LOCK_SUFFIX}.use"


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open(path: Path, create: bool) -> int | None:
    """A descriptor of the lock file (made when `create`, or readable where it cannot be made), or None."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666) if create else os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return _open(path, False) if create else None


def _holders(fd: int) -> list[int]:
    """The processes holding a lock on the file of `fd`, from /proc/locks (empty where it cannot be read)."""
    inode = os.fstat(fd).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode) and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids) - {os.getpid()})


def _busy(target: Path, flag: str, exclusive: bool, pids: list[int]) -> UserError:
    who = f" (pid {', '.join(map(str, pids))})" if pids else ""
    if exclusive:
        return UserError(
            f"{flag} {target}: being read by another rded-fast process{who}, e.g. a distill of it; rewriting it now "
            "would crash that run: wait for it to finish, or give another path"
        )
    return UserError(f"{flag} {target}: being written by another rded-fast process{who}; wait for it to finish, then rerun")


def _take(target: Path, flag: str, exclusive: bool) -> int | None:
    """A descriptor holding the lock of `target` (None: no lock file can be made or read here); UserError when a
    process holds it the other way."""
    path, pids = use_path(target), []
    for _ in range(TRIES):
        fd = _open(path, create=True)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = _holders(fd)
            os.close(fd)
            if not exclusive:
                check_not_held(target, flag)  # a convert holds it: name it as the lock of its output does
            time.sleep(0.02)
            continue
        if _same_file(fd, path):
            return fd
        os.close(fd)  # removed by its last user meanwhile: lock the file there now
    raise _busy(target, flag, exclusive, pids)


def _release(fd: int, path: Path) -> None:
    """Unlock; the last user (the one that can take the exclusive lock) removes the file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def using(target: str | os.PathLike, flag: str, exclusive: bool) -> Iterator[None]:
    """Hold the shared (`exclusive` False: a reader) or exclusive (the writer) lock of source `target` for the block."""
    target = Path(os.path.realpath(os.path.expanduser(target)))
    fd = _take(target, flag, exclusive)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd, use_path(target))
