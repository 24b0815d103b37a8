"""Output-path safety: an output never overlaps an input, replaces only what rded-fast wrote, and has one writer.

Every command that writes (distill, convert, relabel, evaluate --json, train-observer, demo) claims its
output with `claim_output` before it writes anything:

1. Place: the output (symlinks and `..` resolved) may not be an input, contain one, or lie inside one
   (otherwise `--overwrite` could delete the data or `--resume` write into its class folders); it is made
   only inside an existing, writable folder (rded-fast creates the output itself, never the folders above it).
2. Ownership: an existing non-empty target is replaced only when it is an earlier output of the same
   command (its `Layout` recognises it: journal, manifest, sidecar, header...) and the command's replace
   flag (`--overwrite`) is given; anything else needs `--overwrite-any` where a command offers it.
3. What a replace removes: only the entries our records say a run of ours wrote (rded_fast.records). Anything else
   inside an earlier output of ours (the user's NOTES.txt, a folder of their own) is kept: it is moved into
   the new output at the same place, and listed in a note. Only `--overwrite-any` on a target rded-fast
   does not recognise replaces all of it.
4. Replacing moves the old target aside (a hidden sibling `.NAME.rded-old-PID`) and deletes what was ours
   in it only after the new run succeeded; a failed or interrupted run (Ctrl-C, SIGTERM, SIGHUP) puts it
   back as it was. A killed run (SIGKILL, power loss) leaves it aside, never deleted, and every later
   claim of the same output names it in a note until the user moves it back or deletes it.
5. Lock: `.NAME.rded-lock` beside the target (rded_fast.lock) is held for the whole run; a second process
   is refused in one line before anything else is judged. The writer of a converted source also holds its
   exclusive lock (rded_fast.sharing), which a distill reading it holds shared: the second to come is refused.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from rded_fast.errors import Terminated, UserError
from rded_fast.layout import TEMPORARY, Layout, read_json
from rded_fast.lock import LOCK_SUFFIX, acquire_lock, check_not_held, release_lock
from rded_fast.manifest import is_manifest
from rded_fast.records import demo_records, distilled_records, label_records
from rded_fast.sharing import using

ASIDE_TAG = ".rded-old-"


def resolve(path: str | os.PathLike) -> Path:
    """Absolute path with `~`, `..` and every symlink resolved (also for paths that do not exist yet)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def _elsewhere(o: Path, i: Path, kind: str) -> Path:
    """An example output path outside input `i` for the output `o`: a sibling folder, or the same file name."""
    if kind == "dir":
        base = o if i.is_relative_to(o) else i
        return base.parent / (base.name + "-out")
    if i.is_relative_to(o):  # the "file" is a folder holding the input
        return o.parent / (o.stem + "-out" + o.suffix)
    example = i.parent / o.name
    return example if example != i else i.with_name(f"{i.stem}-out{i.suffix}")


def check_separate(out: str | os.PathLike, out_flag: str, inputs: dict[str, str | os.PathLike | None], kind: str = "dir") -> None:
    """Refuse an output that is an input, contains one (parent) or lies inside one; `inputs`: flag -> path.
    The example fix is a folder for a folder output (`kind` "dir") and a file name for a file output."""
    o = resolve(out)
    for flag, path in inputs.items():
        if path is None or str(path) == "":
            continue
        i = resolve(path)
        example = _elsewhere(o, i, kind)
        if o == i:
            raise UserError(
                f"{out_flag} {out} is the same path as {flag} {path} ({i}); an output must be a new path "
                f"outside every input, e.g. {example}"
            )
        if i.is_relative_to(o):
            raise UserError(
                f"{out_flag} {out} contains {flag} {path} ({i} is inside {o}); write the output outside "
                f"the inputs, e.g. {example}"
            )
        if o.is_relative_to(i):
            raise UserError(
                f"{out_flag} {out} lies inside {flag} {path} ({o} is inside {i}); write the output outside it, e.g. {example}"
            )


# ---- what counts as our own output -------------------------------------------------------------------


def is_distilled_set(path: Path) -> bool:
    """A folder written by `distill`: its journal, or a manifest that names rded-fast."""
    return (path / ".rded-journal").is_dir() or is_manifest(read_json(path / "manifest.json"))


def is_label_folder(path: Path) -> bool:
    """A folder written by `relabel`: header.json with the soft-label keys."""
    header = read_json(path / "header.json")
    return header is not None and {"format", "teacher", "files"} <= set(header)


def is_demo_folder(path: Path) -> bool:
    """A folder written by `demo`: its distilled set, or else its observer checkpoint, is one of ours."""
    if (path / "distilled").exists():
        return (path / "distilled").is_dir() and is_distilled_set(path / "distilled")
    return (path / "observer_conv3.pth").is_file() and is_checkpoint(path / "observer_conv3.pth")


def _torch_keys(path: Path) -> set[str]:
    """The keys of the dict a torch zip file holds (loaded without running pickled code); empty for anything else."""
    if not zipfile.is_zipfile(path):
        return set()
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return set()
    return set(obj) if isinstance(obj, dict) else set()


def is_checkpoint(path: Path) -> bool:
    """A checkpoint written by `train-observer`: a torch zip file with our keys."""
    return {"model", "arch", "input_size"} <= _torch_keys(path)


def is_training_state(path: Path) -> bool:
    """`OUT.state`, the per-epoch state train-observer keeps beside its checkpoint (rded_fast.train.checkpoint)."""
    return {"epoch", "model", "opt", "sched"} <= _torch_keys(path)


def is_result_json(path: Path) -> bool:
    """A result written by `evaluate --json`."""
    record = read_json(path)
    return record is not None and "final_top1" in record and "evaluations" in record


# What a run of ours wrote inside each folder output is what its records say (rded_fast.records), never a name that
# merely looks like ours. tests/test_safety.py checks that a real output of every command holds nothing else.
DISTILLED_SET = Layout("dir", is_distilled_set, distilled_records)
LABEL_FOLDER = Layout("dir", is_label_folder, label_records)
DEMO_FOLDER = Layout("dir", is_demo_folder, demo_records)
CHECKPOINT = Layout("file", is_checkpoint, beside=(".state",), beside_ours=is_training_state)  # rded_fast.train.observer
RESULT_JSON = Layout("file", is_result_json)


def foreign_entries(folder: Path, written: Callable[[str], bool]) -> list[str]:
    """The entries of `folder` a run of ours did not write, as relative paths; a sub-folder holding nothing of
    ours is one entry (written with a trailing `/`). Symlinks are entries, never followed."""
    return _foreign(folder, written, "")[0]


def _foreign(folder: Path, written: Callable[[str], bool], rel: str) -> tuple[list[str], bool]:
    """(foreign entries below `folder`, whether anything below it is ours)."""
    found, ours = [], False
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = rel + entry.name
        if entry.is_dir(follow_symlinks=False):
            inner, inner_ours = _foreign(Path(entry.path), written, path + "/")
            found.extend(inner if inner_ours else [path + "/"])
            ours = ours or inner_ours
        elif written(path):
            ours = True
        else:
            found.append(path)
    return found, ours


def _put_back(aside: Path, target: Path, entries: list[str]) -> dict[str, str]:
    """Move the user's `entries` from the moved-aside old output into the new one at the same place; returns
    those that could not be moved, each with why (the new output has that name; an immutable file: EPERM)."""
    stuck = {}
    for rel in entries:
        src, dst = aside / rel.rstrip("/"), target / rel.rstrip("/")
        try:
            if dst.exists() or dst.is_symlink():
                raise FileExistsError(errno.EEXIST, "the new output has that name")
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
        except OSError as exc:
            why = exc.strerror or str(exc)
            stuck[rel] = f"{why}: an immutable or append-only file?" if exc.errno == errno.EPERM else why
    return stuck


def _note_stuck(flag: str, target: Path, stuck: dict[str, str], aside: Path) -> None:
    """One note for the entries that stay in the moved-aside folder, grouped by why."""
    by_reason: dict[str, list[str]] = {}
    for rel, why in stuck.items():
        by_reason.setdefault(why, []).append(rel)
    listed = "; ".join(f"{_listed(rels)} ({why})" for why, rels in by_reason.items())
    note(f"{flag} {target}: could not move into the new output: {listed}; they are in {aside}")


def _listed(entries: list[str], most: int = 5) -> str:
    return ", ".join(entries[:most]) + (f" and {len(entries) - most} more" if len(entries) > most else "")


def note(message: str) -> None:
    """A one-line note on stderr (the command's results stay on stdout)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# ---- moved aside -------------------------------------------------------------------------------------


def _aside_path(target: Path) -> Path:
    """A free hidden sibling name for the old target (a pid can be reused: never rename over an earlier one)."""
    base = target.parent / f".{target.name}{ASIDE_TAG}{os.getpid()}"
    path, n = base, 1
    while path.exists() or path.is_symlink():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def leftovers(target: Path) -> list[Path]:
    """What killed runs left moved aside beside `target` (`.NAME.rded-old-*`)."""
    prefix = f".{target.name}{ASIDE_TAG}"
    try:
        return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def _note_leftovers(target: Path, flag: str) -> None:
    found = leftovers(target)
    if found:
        note(
            f"{flag} {target}: {_listed([p.name for p in found])} beside it hold(s) what an interrupted run had moved "
            "aside (the output it was replacing); look inside, then move it back or delete it"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Terminated` (a KeyboardInterrupt) in this process while the block runs, so that
    they clean up as Ctrl-C does; signals set to be ignored (nohup) stay ignored, a forked child dies as before.

    A signal that lands while the main thread runs the import machinery's own code is raised a few milliseconds
    later instead: raised there, it would leave an import lock held for ever (another thread importing then never
    ends), or be swallowed by the import lock's weakref callback (the run would go on as if never signalled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked worker: the default action, as if no handler were set
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            again = threading.Timer(0.005, os.kill, (owner, signum))
            again.daemon = True
            again.start()
            return
        raise Terminated(signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    for s, h in old.items():
        if h == signal.SIG_DFL:
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            if h == signal.SIG_DFL:
                signal.signal(s, h)


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP while an old output is put back (a second signal must not stop it halfway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---- claiming an output ------------------------------------------------------------------------------


def _non_empty(target: Path) -> bool:
    if target.is_dir() and not target.is_symlink():
        return any(target.iterdir())
    return target.exists() or target.is_symlink()


def decide(
    target: Path,
    flag: str,
    layout: Layout,
    *,
    overwrite: bool,
    overwrite_any: bool,
    resume: bool,
    replace_hint: str,
    any_flag: str | None = "--overwrite-any",
) -> str:
    """What to do with `target`: `new` (absent or empty folder), `keep` (resume / reuse in place),
    `replace` (move aside, delete what was ours after success). Raises UserError with the fix otherwise."""
    if layout.kind == "dir" and target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target}: exists and is a file; give a folder")
    if layout.kind == "file" and target.is_dir():
        raise UserError(f"{flag} {target}: is a folder; give a file name, e.g. {target / 'out'}")
    if not _non_empty(target):
        return "new"
    ours = layout.recognise(target)
    if resume:
        if not ours:
            raise UserError(f"{flag} {target}: not an output of rded-fast, nothing to resume; give a new or empty path")
        return "keep"
    if overwrite_any or (ours and overwrite):
        if os.path.ismount(target):
            raise UserError(
                f"{flag} {target}: a mount point; rded-fast replaces an output by moving it aside, which cannot be done to "
                f"a mount point: give a path inside it (e.g. {target / 'run2'}), or empty it yourself"
            )
        return "replace"
    what = "a folder" if layout.kind == "dir" else "a file"
    if ours:
        raise UserError(f"{flag} {target}: holds an earlier rded-fast output; {replace_hint}, or give another path")
    more = " and is not empty" if layout.kind == "dir" else ""
    fix = (
        f", or {any_flag} to replace it (it is moved aside and deleted only when the new run succeeds)"
        if any_flag
        else "; rded-fast replaces only files it wrote itself"
    )
    raise UserError(f"{flag} {target}: {what} that rded-fast did not write exists there{more}; give a new path{fix}")


# The longest name rded-fast makes beside an output NAME: `.NAME.rded-lock.stale-PID` (a pid has at most 7 digits).
_BESIDE_EXTRA = len(f".{LOCK_SUFFIX}.stale-") + 7


def _name_max(path: Path) -> int:
    """The longest file name (bytes) the file system holding `path` (or its nearest existing folder) allows."""
    for folder in (path, *path.parents):
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def check_name_length(path: str | os.PathLike, flag: str) -> None:
    """An output path whose every name the file system can hold, the output's own with room for the names rded-fast
    keeps beside it (lock, moved-aside copy, temporaries): one line naming the argument, not ENAMETOOLONG from
    wherever the first long name is made."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    limit = _name_max(p)
    for part in p.parts[1:]:
        size = len(os.fsencode(part))
        if size > limit:
            raise UserError(
                f"{flag} {path}: the name {part[:20]}... is {size} bytes long, more than the {limit} the file system "
                "allows; give a shorter path"
            )
    size, room = len(os.fsencode(p.name)), limit - _BESIDE_EXTRA
    if size > room:
        raise UserError(
            f"{flag} {path}: the name {p.name[:20]}... is too long ({size} bytes): rded-fast keeps files named "
            f".NAME{LOCK_SUFFIX}... beside an output, so its name may be at most {room} bytes here; give a shorter name"
        )


def check_place(path: str | os.PathLike, flag: str) -> None:
    """An output is made only inside an existing folder that this process can write in (checked by writing a
    temporary file there: permission bits do not show a read-only file system, nor stop root)."""
    check_name_length(path, flag)
    p = resolve(path)
    parent = p.parent
    if not parent.is_dir():
        missing = parent
        while not missing.parent.exists():
            missing = missing.parent
        raise UserError(
            f"{flag} {path}: the folder {missing} does not exist; create it first, or give a path inside an existing folder"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({exc.strerror}); give a path in a writable folder") from None


def check_writable_file(path: str | os.PathLike, flag: str) -> None:
    """Early check of an output file (before hours of work): a file name, inside an existing writable folder."""
    if str(path) == "":
        raise UserError(f"{flag} '': an empty path; give a file name")
    if resolve(path).is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name, e.g. {Path(path) / 'result.json'}")
    check_place(path, flag)


def check_result_file(path: str | os.PathLike, flag: str, keys: set[str]) -> None:
    """Early check of a JSON result rded-fast rewrites on every run (bench): a writable place, and a file already
    there must be such a result (its `keys` present), never a file of the user's."""
    check_writable_file(path, flag)
    if resolve(path).exists() and not keys <= set(read_json(resolve(path)) or {}):
        raise UserError(f"{flag} {path}: a file that rded-fast did not write exists there; give a new path")


@contextmanager
def claim_output(
    out: str | os.PathLike,
    flag: str,
    inputs: dict[str, str | os.PathLike | None],
    layout: Layout = DISTILLED_SET,
    *,
    overwrite: bool = False,
    overwrite_any: bool = False,
    resume: bool = False,
    replace_hint: str = "pass --overwrite to replace it",
    any_flag: str | None = "--overwrite-any",
    on_replace: Callable[[Path], None] | None = None,
) -> Iterator[str]:
    """Check, lock and (when replacing) move aside the output `out` for the duration of the block (module
    docstring: rules 1-5).

    Yields the action taken (`new`, `keep`, `replace`). On success the old target's own entries are deleted
    and the user's are moved into the new output (a note lists them); on any failure (an exception, Ctrl-C,
    SIGTERM, SIGHUP) a replacing run's new output is removed and the old target put back as it was.
    `on_replace(target)` is called once a replacement is decided (e.g. to say so on the console)."""
    if str(out) == "":
        raise UserError(f"{flag} '': an empty path; give a {'folder' if layout.kind == 'dir' else 'file name'}")
    check_name_length(out, flag)
    target = resolve(out)
    check_separate(out, flag, inputs, layout.kind)
    check_not_held(target, flag)  # a run in progress is named as such, whatever its output holds so far
    _note_leftovers(target, flag)
    rules = dict(overwrite=overwrite, overwrite_any=overwrite_any, resume=resume, replace_hint=replace_hint, any_flag=any_flag)
    decide(target, flag, layout, **rules)  # refuse before creating the lock or any folder
    _check_beside(target, flag, layout)
    check_place(target, flag)
    with _signals_raise():
        lock = acquire_lock(target, flag)
        try:
            with using(target, flag, exclusive=True) if layout.shared else nullcontext():  # no reader meets the writer
                # decided again under the lock: another process may have written meanwhile
                action = decide(target, flag, layout, **rules)
                _remove_stale_temporaries(target, layout, inside=action == "keep")
                with _replacing(target, flag, layout, action == "replace", on_replace):
                    yield action
        finally:
            release_lock(lock)


def _check_beside(target: Path, flag: str, layout: Layout) -> None:
    """Refuse a file of the user's where the run keeps one of its own beside the output (`OUT.state`): the run would
    overwrite it, then remove it."""
    for suffix in layout.beside if layout.beside_ours is not None else ():
        path = target.with_name(target.name + suffix)
        if (path.exists() or path.is_symlink()) and not layout.beside_ours(path):
            raise UserError(
                f"{flag} {target}: {path.name} beside it is not a file of rded-fast's, and a run keeps one of its own "
                "under that name (and removes it when done); move it away, or give another path"
            )


def _remove_stale_temporaries(target: Path, layout: Layout, inside: bool) -> None:
    """Remove the temporary files (`.NAME.XXXXXXXX.tmp`) killed runs of ours left: beside `target`, those of its own
    name and of the files its layout writes beside it; with `inside` (an output continued in place), those in it
    of a name its records list. No run of ours writes them now: this one holds the output's lock. Nothing else is
    touched, whatever its name."""
    ours = {target.name, *(target.name + suffix for suffix in layout.beside)}
    stale = [target.parent / e for e in _entries(target.parent) if (m := TEMPORARY.fullmatch(e)) and m["name"] in ours]
    if inside and layout.kind == "dir" and target.is_dir():
        written = layout.written(target)
        stale += [target / rel for rel in _files_below(target) if TEMPORARY.fullmatch(rel) and written(rel)]
    for path in stale:
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)


def _entries(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _files_below(folder: Path) -> list[str]:
    """Relative paths of the files below `folder` (symlinked folders are not followed)."""
    return [
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder, followlinks=False)
        for name in names
    ]


@contextmanager
def _replacing(target: Path, flag: str, layout: Layout, replace: bool, on_replace) -> Iterator[None]:
    """Move `target` aside for the block when `replace`; afterwards keep the user's entries, or put it all back."""
    if not replace:
        yield
        return
    keep = foreign_entries(target, layout.written(target)) if layout.kind == "dir" and layout.recognise(target) else []
    if on_replace is not None:
        on_replace(target)
    aside = _aside_path(target)
    os.rename(target, aside)
    try:
        yield
    except BaseException as exc:
        with _uninterrupted():
            _remove(target)
            os.rename(aside, target)
        exc.put_back = str(target)  # for the error message: this run's partial output is gone, the old one is back
        raise
    stuck = _put_back(aside, target, keep)
    kept = [e for e in keep if e not in stuck]
    if kept:
        note(f"{flag} {target}: kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} rded-fast did not write: {_listed(kept)}")
    if stuck:
        _note_stuck(flag, target, stuck, aside)
    else:
        _remove(aside)
