"""ImageFolder -> webdataset tar shards with DALI index files (`rded-fast convert --format shards`).

Per indexed image one sample `<key>.jpg` (the original bytes when the file is a plain RGB or gray
JPEG, baseline or progressive; an RGB re-encoding when it is not, e.g. CMYK, PNG named .JPEG, other
formats; see `converters/sanitize.py`), `<key>.cls` (the class index as ASCII digits) and `<key>.json`
(original relative path, size, class). Images that do not decode fully (truncated, corrupt) are left
out and listed. Each shard gets the index file `fn.readers.webdataset(index_paths=...)` takes, in the
format DALI's own `wds2idx` tool writes (`v1.2 <samples>`, then per sample `<ext> <data offset> <size>
<member name>` for each component; DALI rejects v1.2 lines without the member names).

Shards are planned up front from the source file sizes (so a rerun assigns the same images to the same
shard), each is written under a temporary name and renamed when complete, and a rerun from the same
source folder keeps every shard whose record still matches it (same files, sizes and modification times).
Each shard's record carries the digest of its first and last images (rded_fast.formats.shards.ends_sha256), which
the readers check, and the print of its source files (paths, sizes, modification times), which a resume compares.
A folder holding another source's shards is another dataset: it is replaced only with `--overwrite`. Tar
headers carry no time, owner or permissions from the source, so the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rded_fast.converters.sanitize import BadImage, jpeg_bytes
from rded_fast.converters.source import claiming, index_source
from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write, atomic_write_text
from rded_fast.formats.shards import (
    DATASET_FILE,
    IMAGE_EXT,
    LABEL_EXT,
    META_EXT,
    NAME,
    SHARD_FOLDER,
    dataset_record,
    is_shard_folder,
    planned_record,
    recorded_shards,
    sample_key,
    sample_record,
    shard_files,
    shard_stem,
    tar_ends,
)
from rded_fast.index import DatasetIndex
from rded_fast.jpeg_check import jpeg_problem
from rded_fast.outputs import resolve
from rded_fast.progress import progress

TAR_BLOCK = 512
INDEX_VERSION = "v1.2"
WINDOW = 256  # images sanitised ahead of the tar writer, bounding memory
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes in `text`: `1GB` (10^9), `256MB`, `512MiB` (2^20 units), or a plain integer."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise UserError(f"--shard-size {text}: not a size; write e.g. 1GB, 256MB or 512MiB")
        value, unit = float(m.group(1)), m.group(2).upper()
    size = int(value * _UNITS[unit])
    if size < 1:
        raise UserError(f"--shard-size {text}: must be at least 1 byte")
    return size


def _tar_bytes(payload: int) -> int:
    """Bytes a member of `payload` bytes takes in a tar: one header block plus padded data blocks."""
    return TAR_BLOCK + -(-payload // TAR_BLOCK) * TAR_BLOCK


def plan_shards(index: DatasetIndex, limit: int) -> list[list[int]]:
    """Index ids per shard, in index order, each shard's estimated size at most `limit` bytes (but at
    least one image). The estimate uses the source file sizes, so it is known before any decoding."""
    groups: list[list[int]] = [[]]
    used = 0
    for image_id, rel in enumerate(index.paths):
        need = _tar_bytes(os.path.getsize(os.path.join(index.root, rel))) + 2 * 2 * TAR_BLOCK  # + .cls, .json
        if groups[-1] and used + need > limit:
            groups.append([])
            used = 0
        groups[-1].append(image_id)
        used += need
    return [g for g in groups if g]


def _sanitize(path: str) -> tuple[bytes, bool] | str:
    """(JPEG bytes, re-encoded?) or why the file is left out; bytes whose JPEG structure is broken are
    left out too (rded_fast.jpeg_check), since DALI's parser fails on them at distill time."""
    try:
        data, reencoded = jpeg_bytes(path)
    except BadImage as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read ({exc.strerror})"
    problem = jpeg_problem(data)
    return (data, reencoded) if problem is None else f"corrupt JPEG structure: {problem}"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> int:
    """Append one regular file with fixed metadata; returns the byte offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tar.format, tar.encoding, tar.errors)
    data_offset = tar.offset + len(header)
    tar.addfile(info, io.BytesIO(payload))
    return data_offset


def source_of(out: Path) -> str | None:
    """The source folder (resolved) the shards in `out` were converted from: dataset.json's, or else an earlier
    run's shard records'; None when no record names one."""
    for path in [out / DATASET_FILE, *sorted(out.glob("shard-[0-9][0-9][0-9][0-9][0-9].meta.json"))]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("source_root"), str):
            return record["source_root"]
    return None


def _reusable(out: Path, number: int, ids: list[int], index: DatasetIndex) -> dict | None:
    """The shard's record when its files are complete and it holds exactly `ids` as indexed now."""
    stem = shard_stem(number)
    try:
        meta = json.loads((out / f"{stem}.meta.json").read_text())
    except (OSError, ValueError):
        return None
    expected = planned_record(number, ids, index)
    if any(meta.get(k) != v for k, v in expected.items()):
        return None
    if meta["tar"] is not None:
        tar, idx = out / meta["tar"], out / meta["idx"]
        if not (tar.is_file() and idx.is_file() and tar.stat().st_size == meta["tar_bytes"]):
            return None
        if "ends" not in meta:  # a shard of an earlier rded-fast: what readers check is added (two reads)
            meta["ends"] = tar_ends(tar, meta["samples"])
            atomic_write_text(out / f"{stem}.meta.json", json.dumps(meta))
    return meta


def _add_sample(tar: tarfile.TarFile, index: DatasetIndex, image_id: int, data: bytes, reencoded: bool) -> tuple[str, int]:
    """Append one image's members (JPEG, label, metadata) to `tar`; returns its DALI index line and the JPEG's offset."""
    label = int(index.labels[image_id])
    info = sample_record(index, image_id, reencoded)
    key = sample_key(image_id)
    parts, offsets = [], {}
    for ext, payload in (
        (IMAGE_EXT, data),
        (LABEL_EXT, str(label).encode()),
        (META_EXT, json.dumps(info, sort_keys=True).encode()),
    ):
        name = f"{key}.{ext}"
        offsets[ext] = _add_member(tar, name, payload)
        parts.append(f"{ext} {offsets[ext]} {len(payload)} {name}")
    return " ".join(parts), offsets[IMAGE_EXT]


def write_shard(out: Path, number: int, ids: list[int], index: DatasetIndex, workers: int = 4, bar=None) -> dict:
    """Write shard `number` holding index entries `ids`: tar, DALI index, then its record (last, as
    the mark of completion). Returns the record."""
    stem = shard_stem(number)
    samples, skipped, index_lines = [], [], []

    def write_tar(tmp: str) -> None:
        with (
            open(tmp, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar,
            ThreadPoolExecutor(max(1, workers)) as pool,
        ):
            for start in range(0, len(ids), WINDOW):
                window = ids[start : start + WINDOW]
                paths = [os.path.join(index.root, index.paths[i]) for i in window]
                for image_id, result in zip(window, pool.map(_sanitize, paths)):
                    if bar is not None:
                        bar.update(1)
                    rel = index.paths[image_id]
                    if isinstance(result, str):
                        skipped.append({"id": image_id, "path": rel, "reason": result})
                        continue
                    data, reencoded = result
                    line, offset = _add_sample(tar, index, image_id, data, reencoded)
                    index_lines.append(line)
                    samples.append({"id": image_id, "offset": offset, "nbytes": len(data), "reencoded": reencoded})

    tar_name = f"{stem}.tar"
    # recorded before its files exist (replaced by the full record below), so that whatever an interrupted run leaves
    # is named by a record of ours: a later --overwrite deletes it, a rerun removes its temporary files
    planned = {**planned_record(number, ids, index), "tar": tar_name, "idx": f"{stem}.idx", "tar_bytes": None}
    atomic_write_text(out / f"{stem}.meta.json", json.dumps(planned))
    atomic_write(out / tar_name, write_tar)
    record = {
        **planned_record(number, ids, index),
        "tar": tar_name,
        "idx": f"{stem}.idx",
        "tar_bytes": (out / tar_name).stat().st_size,
        "samples": samples,
        "skipped": skipped,
    }
    if samples:
        atomic_write_text(out / record["idx"], f"{INDEX_VERSION} {len(samples)}\n" + "\n".join(index_lines) + "\n")
        record["ends"] = tar_ends(out / tar_name, samples)
    else:  # DALI cannot read an empty archive: a shard whose every image was left out has no files
        os.unlink(out / tar_name)
        record.update(tar=None, idx=None, tar_bytes=0)
    atomic_write_text(out / f"{stem}.meta.json", json.dumps(record))
    return record


def _remove_stale(out: Path, num_shards: int) -> None:
    """Delete the shards of ours numbered beyond this conversion's (an earlier run with smaller shards), as their
    records name them; a file no record of ours names is never touched, whatever it is called. (Temporary files
    of killed runs were removed when the folder was claimed: rded_fast.outputs.)"""
    for number, record in recorded_shards(out).items():
        if number >= num_shards:
            for name in [*sorted(shard_files(record, number)), f"{shard_stem(number)}.meta.json"]:
                (out / name).unlink(missing_ok=True)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder for the shards")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / DATASET_FILE).exists() or any(out.glob("shard-*"))
        if not ours:
            raise UserError(f"--out {out}: holds files that are not DALI shards; give an empty or new folder")


def convert(
    data: str,
    out: str,
    *,
    class_map: str | list[str] | None = None,
    workers: int = 4,
    show_progress: bool = True,
    shard_size: str | int = "1GB",
    overwrite: bool = False,
    overwrite_any: bool = False,
) -> dict:
    """Write the ImageFolder `data` as webdataset shards + DALI index files + `dataset.json` in `out`.

    `class_map` is a class-map file (or the list of folder names) giving the class order; complete
    shards from an earlier run with the same input are kept (`overwrite`: replaced; `overwrite_any`: a
    folder rded-fast did not write is replaced, kept aside until success). Returns a summary for printing.
    """
    limit = parse_size(shard_size)
    out_dir = Path(out)
    target = resolve(out)
    earlier = target.is_dir() and is_shard_folder(target)
    if earlier and not (overwrite or overwrite_any) and (source := source_of(target)) != str(Path(data).resolve()):
        raise UserError(
            f"--out {out}: holds the shards of another source ({source or 'not recorded'}), not of --data {data}; "
            "give another folder, or pass --overwrite to replace them"
        )
    reuse = earlier and not (overwrite or overwrite_any)
    with claiming(out, data, class_map, SHARD_FOLDER, overwrite=overwrite, overwrite_any=overwrite_any, resume=reuse) as replaced:
        summary = _convert(data, out_dir, class_map=class_map, workers=workers, show_progress=show_progress, limit=limit)
    return {**summary, "replaced": str(replaced[0]) if replaced else None}


def _convert(data: str, out_dir: Path, *, class_map, workers: int, show_progress: bool, limit: int) -> dict:
    t0 = time.perf_counter()
    _check_out(out_dir)
    index = index_source(data, class_map, workers, show_progress)
    out_dir.mkdir(parents=True, exist_ok=True)

    groups = plan_shards(index, limit)
    records, reused = [], 0
    bar = progress(None, total=len(index), desc="dali shards", disable=not show_progress)
    try:
        for number, ids in enumerate(groups):
            record = _reusable(out_dir, number, ids, index)
            if record is None:
                record = write_shard(out_dir, number, ids, index, workers, bar)
            else:
                reused += 1
                bar.update(len(ids))
            records.append(record)
    finally:
        bar.close()
    dataset = dataset_record(index, records, limit)
    atomic_write_text(out_dir / DATASET_FILE, json.dumps(dataset))
    _remove_stale(out_dir, len(records))
    skipped = dataset["skipped"]
    return {
        "format": NAME,
        "out": str(out_dir.resolve()),
        "images": len(index),
        "written": dataset["num_samples"],
        "reencoded": dataset["num_reencoded"],
        "skipped": len(skipped),
        "skipped_examples": skipped[:5],
        "shards": len(records),
        "reused_shards": reused,
        "seconds": round(time.perf_counter() - t0, 3),
    }
