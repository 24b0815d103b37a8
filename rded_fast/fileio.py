"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A reader never sees a half-written file, and a crash leaves the previous version intact. The file gets
the permissions a plain `open(path, "w")` would give (0666 less the umask), not mkstemp's private 0600. An OS
error (disk full, quota) names the file being written, and no temporary file is left behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_fsync_pool: ThreadPoolExecutor | None = None


def _fsync_all(fds: list[int]) -> None:
    """fsync every descriptor, concurrently: the file system then commits them together (measured here on
    10 new files: ~5 ms in parallel against ~37 ms one after another)."""
    global _fsync_pool
    if len(fds) <= 1:
        for fd in fds:
            os.fsync(fd)
        return
    if _fsync_pool is None:
        _fsync_pool = ThreadPoolExecutor(8, thread_name_prefix="rded-fsync")
    list(_fsync_pool.map(os.fsync, fds))


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere a brief set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new regular file under the current umask."""
    return 0o666 & ~current_umask()


def _unnamed(exc: BaseException) -> bool:
    """An OS error without the file it concerns: a failed write() or close() (ENOSPC, EDQUOT) names none."""
    return isinstance(exc, OSError) and exc.filename is None


def _named(exc: OSError, path: str | os.PathLike) -> OSError:
    return OSError(exc.errno, exc.strerror or str(exc), os.fspath(path))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename `tmp_path` over `path`; the temp file is removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if _unnamed(exc):
            raise _named(exc, path) from exc
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_many(items: list[tuple[Path, bytes]]) -> None:
    """Write several files atomically with one durability pass: every file goes to a temporary name, then
    all are fsynced (concurrently), renamed, and each folder is fsynced once. Afterwards every file is
    complete and durable (name included); on error none of the temporary files is left behind."""
    tmps: list[str] = []
    files = []
    mode = file_mode()
    current = None
    try:
        for path, data in items:
            current = path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmps.append(tmp)
            os.fchmod(fd, mode)
            f = os.fdopen(fd, "wb")
            files.append(f)
            f.write(data)
            f.flush()
        current = None
        _fsync_all([f.fileno() for f in files])
        for f in files:
            f.close()
        for (path, _), tmp in zip(items, list(tmps)):
            os.replace(tmp, path)
            tmps.remove(tmp)
        folders = sorted({Path(path).parent for path, _ in items})
        dir_fds = [os.open(folder, os.O_RDONLY) for folder in folders]
        try:
            _fsync_all(dir_fds)
        finally:
            for fd in dir_fds:
                os.close(fd)
    except BaseException as exc:
        for f in files:
            with contextlib.suppress(OSError):  # close() flushes again and fails again on a full disk
                f.close()
        for tmp in tmps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if _unnamed(exc):
            raise _named(exc, current if current is not None else items[0][0]) from exc
        raise
