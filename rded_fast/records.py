"""What our own records say a run of ours wrote inside an output folder: all that a replace (`--overwrite`) deletes.

Names are never judged by their look: `favorites/class00000_id00000.png`, or a `digit0/class00000_id00099.png` beside a
run of IPC 10, is the user's unless a record of ours lists it (rded_fast.outputs keeps, moves and lists everything
else). Each folder output has its records (paths relative to the folder):

- a distilled set (`distill`): the files every run writes (manifest.json, contact_sheet.png, index.npz, the journal's
  run.json and redone.json); every image manifest.json or a journal class record lists, and those class records;
  for a class without a record (a run stopped inside it) the names that run was writing: its folder from the
  run's index.npz, `class{label}_id{j}` for j below run.json's `ipc`, in run.json's format;
- a labels folder (`relabel`): header.json and what it announces: regions.npz, or one epoch file per epoch;
- a demo folder: its observer checkpoint and state, index cache and result, and its distilled set's records;
- a shard folder (`convert --format shards`): rded_fast.formats.shards.shard_records.
"""

from __future__ import annotations

from pathlib import Path

from rded_fast.layout import read_json

DISTILLED_FILES = ("manifest.json", "contact_sheet.png", "index.npz")  # rded_fast.distill; the journal's are below
JOURNAL_FILES = ("run.json", "redone.json")  # rded_fast.journal
DEMO_FILES = ("observer_conv3.pth", "observer_conv3.pth.state", "train_index.npz", "evaluate.json")  # rded_fast.demo
DEMO_DISTILLED = "distilled"


def _files(images: object) -> set[str]:
    """The `file` of every image record in a manifest's or class record's `images` list."""
    if not isinstance(images, list):
        return set()
    return {m["file"] for m in images if isinstance(m, dict) and isinstance(m.get("file"), str)}


def _class_records(folder: Path, journal_dir: str) -> dict[int, tuple[str, dict]]:
    """label -> (its record's relative path, the record) for every journal class record of ours in `folder`."""
    found = {}
    journal = folder / journal_dir
    if not journal.is_dir():
        return found
    for path in journal.iterdir():
        record = read_json(path) if path.name.startswith("class_") and path.is_file() else None
        label = None if record is None else record.get("label")
        if isinstance(label, int) and path.name == f"class_{label:06d}.json":
            found[label] = (f"{journal_dir}/{path.name}", record)
    return found


def _unrecorded_names(folder: Path, journal_dir: str, recorded: set[int]) -> set[str]:
    """The image names a run was writing for the classes it has not recorded (run.json and index.npz say which)."""
    run = read_json(folder / journal_dir / "run.json")
    ipc, fmt = (run or {}).get("ipc"), (run or {}).get("format")
    if not (isinstance(ipc, int) and isinstance(fmt, str)) or not (folder / "index.npz").is_file():
        return set()
    from rded_fast.errors import UserError
    from rded_fast.index import load_index
    from rded_fast.write import image_name

    try:
        classes = load_index(folder / "index.npz").classes
    except (UserError, OSError):
        return set()
    return {
        f"{name}/{image_name(label, j, fmt)}" for label, name in enumerate(classes) if label not in recorded for j in range(ipc)
    }


def distilled_records(folder: Path) -> set[str]:
    """What the records of a distilled set in `folder` say a run of ours wrote there (module docstring)."""
    from rded_fast.journal import JOURNAL_DIR
    from rded_fast.manifest import is_manifest

    names = {*DISTILLED_FILES, *(f"{JOURNAL_DIR}/{name}" for name in JOURNAL_FILES)}
    manifest = read_json(folder / "manifest.json")
    if is_manifest(manifest):
        names |= _files(manifest.get("images"))
    records = _class_records(folder, JOURNAL_DIR)
    for rel, record in records.values():
        names |= {rel, *_files(record.get("images"))}
    return names | _unrecorded_names(folder, JOURNAL_DIR, set(records))


def label_records(folder: Path) -> set[str]:
    """header.json of a labels folder and the files it announces (rded_fast.train.softlabels writes them)."""
    header = read_json(folder / "header.json")
    if header is None:
        return set()
    from rded_fast.train.softlabels import REGIONS_FILE, epoch_path

    if "region_grid" in header:
        return {"header.json", REGIONS_FILE}
    epochs = header.get("epochs")
    return {"header.json", *(epoch_path(Path(), e).name for e in range(epochs if isinstance(epochs, int) else 0))}


def demo_records(folder: Path) -> set[str]:
    """The demo's own files and its distilled set's records."""
    return {*DEMO_FILES, DEMO_DISTILLED, *(f"{DEMO_DISTILLED}/{rel}" for rel in distilled_records(folder / DEMO_DISTILLED))}
