"""Output-path safety: an output never overlaps an input, replaces only what rded-fast wrote, and has one writer.

Every command that writes (distill, convert, relabel, evaluate --json, train-observer, demo) claims its
output with `claim_output` before it writes anything:

1. Overlap: the output (symlinks and `..` resolved) may not be an input, contain one, or lie inside one;
   otherwise `--overwrite` could delete the data or `--resume` write into its class folders.
2. Ownership: an existing non-empty target is replaced only when it is a previous rded-fast output of
   this kind (its journal, manifest, sidecar, header...) and the command's replace flag is given;
   anything else needs `--overwrite-any`.
3. Replacing moves the old target aside (a hidden sibling) and deletes it only after the new run
   succeeded; a failed run puts it back. A killed run leaves it as `.NAME.rded-old-PID`, never deleted.
4. Lock: `.NAME.rded-lock` beside the target, created atomically (a hard link) holding pid and host, is
   held for the whole run; a second process is refused in one line. A lock whose pid is dead on this
   host is stale and taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rded_fast.errors import UserError

LOCK_SUFFIX = ".rded-lock"
ASIDE_TAG = ".rded-old-"


def resolve(path: str | os.PathLike) -> Path:
    """Absolute path with `~`, `..` and every symlink resolved (also for paths that do not exist yet)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def check_separate(out: str | os.PathLike, out_flag: str, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output that is an input, contains one (parent) or lies inside one; `inputs`: flag -> path."""
    o = resolve(out)
    for flag, path in inputs.items():
        if path is None or str(path) == "":
            continue
        i = resolve(path)
        if o == i:
            raise UserError(
                f"{out_flag} {out} is the same path as {flag} {path} ({i}); an output must be a new path "
                f"outside every input, e.g. {i.parent / (i.name + '-out')}"
            )
        if i.is_relative_to(o):
            raise UserError(
                f"{out_flag} {out} contains {flag} {path} ({i} is inside {o}); write the output to a "
                f"folder outside the inputs, e.g. {o.parent / (o.name + '-out')}"
            )
        if o.is_relative_to(i):
            raise UserError(
                f"{out_flag} {out} lies inside {flag} {path} ({o} is inside {i}); write the output "
                f"outside it, e.g. {i.parent / (i.name + '-out')}"
            )


# ---- what counts as our own output -------------------------------------------------------------------


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_distilled_set(path: Path) -> bool:
    """A folder written by `distill`: its journal, or a manifest that names rded-fast."""
    manifest = _json(path / "manifest.json")
    return (path / ".rded-journal").is_dir() or (manifest is not None and manifest.get("tool") == "rded-fast")


def is_label_folder(path: Path) -> bool:
    """A folder written by `relabel`: header.json with the soft-label keys."""
    header = _json(path / "header.json")
    return header is not None and {"format", "teacher", "files"} <= set(header)


def is_shard_folder(path: Path) -> bool:
    """A folder written by `convert --format dali`: dataset.json, or shards of ours."""
    from rded_fast.loaders.shards import DATASET_FILE, FORMAT_NAME

    record = _json(path / DATASET_FILE)
    return (record is not None and record.get("format") == FORMAT_NAME) or any(path.glob("shard-[0-9][0-9][0-9][0-9][0-9].*"))


def is_demo_folder(path: Path) -> bool:
    """A folder written by `demo`: only the names the demo writes, its distilled set one of ours."""
    names = {p.name for p in path.iterdir()}
    known = {"observer_conv3.pth", "observer_conv3.pth.state", "distilled", "train_index.npz", "evaluate.json"}
    return names <= known and (not (path / "distilled").exists() or is_distilled_set(path / "distilled"))


def is_beton(path: Path) -> bool:
    """A .beton written by `convert --format ffcv`: its sidecar names our format."""
    from rded_fast.loaders.beton import FORMAT_NAME, sidecar_path

    record = _json(sidecar_path(path))
    return record is not None and record.get("format") == FORMAT_NAME


def is_checkpoint(path: Path) -> bool:
    """A checkpoint written by `train-observer`: a torch zip file with our keys."""
    if not zipfile.is_zipfile(path):
        return False
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and {"model", "arch", "input_size"} <= set(obj)


def is_result_json(path: Path) -> bool:
    """A result written by `evaluate --json`."""
    record = _json(path)
    return record is not None and "final_top1" in record and "evaluations" in record


# ---- the lock ----------------------------------------------------------------------------------------


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _holder(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_lock(target: Path, flag: str) -> Path:
    """Create the lock of `target` exclusively; refuse when a live process holds it. Returns the lock path."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written in full under a private name, then hard-linked into place: link() fails when the lock exists,
    # and a lock is never seen without its holder (an O_EXCL file would be empty for a moment)
    mine = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    mine.write_text(f"{os.getpid()} {socket.gethostname()}\n")
    try:
        return _link_lock(mine, path, target, flag)
    finally:
        mine.unlink(missing_ok=True)


def _link_lock(mine: Path, path: Path, target: Path, flag: str) -> Path:
    for _ in range(3):
        try:
            os.link(mine, path)
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and (holder[1] != socket.gethostname() or _alive(holder[0])):
                raise UserError(
                    f"{flag} {target}: in use by another rded-fast process (pid {holder[0]} on {holder[1]}, "
                    f"lock {path}); wait for it to finish, or delete the lock if no such process runs"
                ) from None
            _break_stale(path, holder)
            continue
        return path
    raise UserError(f"{flag} {target}: could not take the lock {path}; delete it if no rded-fast process runs")


def _break_stale(path: Path, holder: tuple[int, str] | None) -> None:
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
        if _holder(path) == (os.getpid(), socket.gethostname()):
            os.unlink(path)
    except OSError:
        pass


# ---- claiming an output ------------------------------------------------------------------------------


def _non_empty(target: Path) -> bool:
    if target.is_dir() and not target.is_symlink():
        return any(target.iterdir())
    return target.exists() or target.is_symlink()


def _aside_path(target: Path) -> Path:
    return target.parent / f".{target.name}{ASIDE_TAG}{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def decide(
    target: Path,
    flag: str,
    kind: str,
    owned: Callable[[Path], bool],
    *,
    overwrite: bool,
    overwrite_any: bool,
    resume: bool,
    replace_hint: str,
    any_flag: str | None = "--overwrite-any",
) -> str:
    """What to do with `target`: `new` (absent or empty folder), `keep` (resume / reuse in place),
    `replace` (move aside, delete after success). Raises UserError with the fix otherwise."""
    if kind == "dir" and target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target}: exists and is a file; give a folder")
    if kind == "file" and target.is_dir():
        raise UserError(f"{flag} {target}: is a folder; give a file name, e.g. {target / 'out'}")
    if not _non_empty(target):
        return "new"
    ours = owned(target)
    if resume:
        if not ours:
            raise UserError(f"{flag} {target}: not an output of rded-fast, nothing to resume; give a new or empty path")
        return "keep"
    if overwrite_any or (ours and overwrite):
        return "replace"
    what = "a folder" if kind == "dir" else "a file"
    if ours:
        raise UserError(f"{flag} {target}: holds an earlier rded-fast output; {replace_hint}, or give another path")
    more = " and is not empty" if kind == "dir" else ""
    fix = (
        f", or {any_flag} to replace it (it is moved aside and deleted only when the new run succeeds)"
        if any_flag
        else "; rded-fast replaces only files it wrote itself"
    )
    raise UserError(f"{flag} {target}: {what} that rded-fast did not write exists there{more}; give a new path{fix}")


@contextmanager
def claim_output(
    out: str | os.PathLike,
    flag: str,
    inputs: dict[str, str | os.PathLike | None],
    *,
    kind: str = "dir",
    owned: Callable[[Path], bool] = is_distilled_set,
    overwrite: bool = False,
    overwrite_any: bool = False,
    resume: bool = False,
    replace_hint: str = "pass --overwrite to replace it",
    any_flag: str | None = "--overwrite-any",
    on_replace: Callable[[Path], None] | None = None,
) -> Iterator[str]:
    """Check, lock and (when replacing) move aside the output `out` for the duration of the block.

    Yields the action taken (`new`, `keep`, `replace`). On success a moved-aside target is deleted; on any
    failure (an exception, Ctrl-C) this run's new output is removed and the old target is put back.
    `on_replace(target)` is called once a replacement is decided (e.g. to say so on the console)."""
    target = resolve(out)
    check_separate(out, flag, inputs)
    rules = dict(overwrite=overwrite, overwrite_any=overwrite_any, resume=resume, replace_hint=replace_hint, any_flag=any_flag)
    decide(target, flag, kind, owned, **rules)  # refuse before creating the lock or any folder
    lock = acquire_lock(target, flag)
    aside = None
    try:
        # decided again under the lock: another process may have written meanwhile
        action = decide(target, flag, kind, owned, **rules)
        if action == "replace":
            if on_replace is not None:
                on_replace(target)
            aside = _aside_path(target)
            os.rename(target, aside)
        try:
            yield action
        except BaseException:
            if aside is not None:
                _remove(target)
                os.rename(aside, target)
            raise
        if aside is not None:
            _remove(aside)
    finally:
        release_lock(lock)


def check_writable_file(path: str | os.PathLike, flag: str) -> None:
    """Early check of an output file (before hours of work): not a folder, and its folder can be made and written."""
    p = resolve(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name, e.g. {Path(path) / 'result.json'}")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {parent} (permission denied); give a writable path")
