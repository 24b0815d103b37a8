"""What grows with the number of files, measured on an ImageNet-1K-shaped tree (benchmarks/make_imagenet1k_tree.py).

Steps, each a separate process so its peak memory is its own:
- `index_cold`: index + plan (mipc 300, 5 crops) with the page cache dropped first (when this user may drop it):
  the file listing, then the headers of the planned images only (the lazy index), then the cache written;
- `index_cached`: the same seed from the index cache the first run wrote (every planned header in it), and
  `index_cached_other_seed`: another seed, which reads the headers of its images the cache lacks;
- `distill`: a whole `distill` (IPC 10, factor 2, mipc 300, 5 crops, 32 px, random selection: the model is
  not what is measured here), its seconds by stage, the manifest's size and the process's peak memory;
- `index_all`: `rded-fast index` (every header read once, page cache dropped first), then plans of two new seeds
  from that cache (they read nothing);
- `nproc`: the same distill as `distill` in 2 processes (`--nproc 2`), its time and peak memory;
- `convert`: `convert --format shards` and `--format beton` of the whole tree: time, disk, peak memory;
- `resume`: with mipc 40 (the fewest random selection accepts at IPC 10, factor 2), a run killed (-9) once ~half the classes are journaled, then `--resume`d, against
  an uninterrupted run: every image file must be the same bytes.
The observer is an untrained conv3 (random selection never runs it). Results as JSON with the CPU named.

Run: python -m rded_fast.benchmarks.scale_bench --data /work/scale-data/imagenet1k --work /work/scale-data/work \\
         --json benchmarks/results/scale_imagenet1k-shaped_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rded_fast.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def drop_page_cache() -> bool:
    """Drop the OS page cache (needs root); False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _python(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line; add its peak RSS."""
    proc, _ = _timed([sys.executable, "-c", code])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "peak_rss_mib": _peak_rss_mib(proc)}


INDEX_AND_PLAN = """
import json, time
from rded_fast.index import save_index
from rded_fast.formats.folder import load_or_build_index
from rded_fast.plan import make_plan
t = time.perf_counter()
index = load_or_build_index({data!r}, {cache!r}, show_progress=False)
t_index, unread = time.perf_counter() - t, index.unread()
plan = make_plan(index, {seed}, 300, 5)
t_plan = time.perf_counter() - t - t_index
if index.unread() != unread:  # as distill does: keep the headers read
    save_index(index, {cache!r})
print(json.dumps({{"files": len(index), "classes": index.num_classes, "planned": len(plan), "headers_read": unread -
                  index.unread(), "index_s": t_index, "plan_s": t_plan, "seconds": time.perf_counter() - t}}))
"""


def index_steps(data: str, work: Path) -> dict:
    cache = str(work / "index.npz")
    Path(cache).unlink(missing_ok=True)
    dropped = drop_page_cache()
    cold = _python(INDEX_AND_PLAN.format(data=data, cache=cache, seed=0))
    cached = _python(INDEX_AND_PLAN.format(data=data, cache=cache, seed=0))
    other = _python(INDEX_AND_PLAN.format(data=data, cache=cache, seed=1))
    return {
        "index_cold": {**cold, "page_cache_dropped": dropped},
        "index_cached": cached,
        "index_cached_other_seed": other,
        "index_cache_mib": os.path.getsize(cache) / 2**20,
    }


def _distill_cmd(data: str, out: Path, mipc: int, index: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rded_fast.cli",
        "distill",
        "--data",
        data,
        "--out",
        str(out),
        "--observer",
        "conv3",
        "--select",
        "random",
        "--input-size",
        "32",
        "--factor",
        "2",
        "--ipc",
        "10",
        "--mipc",
        str(mipc),
        "--num-crop",
        "5",
        "--index",
        str(index),
        "--quiet",
        *extra,
    ]


def _timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` (under /usr/bin/time -f %M) from the repository root; (its result, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=ROOT, capture_output=True, text=True, check=True)
    return proc, time.perf_counter() - start


def _peak_rss_mib(proc: subprocess.CompletedProcess) -> float:
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def index_all_step(data: str, work: Path) -> dict:
    cache = work / "index_all.npz"
    cache.unlink(missing_ok=True)
    dropped = drop_page_cache()
    cmd = [sys.executable, "-m", "rded_fast.cli", "index", "--data", data, "--out", str(cache), "--quiet"]
    proc, wall = _timed(cmd)
    plans = [_python(INDEX_AND_PLAN.format(data=data, cache=str(cache), seed=seed)) for seed in (7, 8)]
    return {
        "wall_s": wall,
        "page_cache_dropped": dropped,
        "peak_rss_mib": _peak_rss_mib(proc),
        "cache_mib": cache.stat().st_size / 2**20,
        "plans_of_new_seeds": plans,
    }


def distill_step(data: str, work: Path, nproc: int = 1) -> dict:
    out = work / ("full" if nproc == 1 else f"full-nproc{nproc}")
    extra = ["--overwrite"] + ([f"--nproc={nproc}"] if nproc > 1 else [])
    cmd = _distill_cmd(data, out, 300, work / "index.npz", extra)
    proc, wall = _timed(cmd)
    manifest = read_manifest(out / "manifest.json")
    seconds = manifest.seconds
    overhead = seconds.get("prologue", 0.0) + seconds.get("compile", 0.0)
    return {
        "nproc": nproc,
        "wall_s": wall,
        "stage_seconds": seconds,
        "images_written": len(manifest.images),
        "manifest_mib": (out / "manifest.json").stat().st_size / 2**20,
        "peak_rss_mib": _peak_rss_mib(proc),
        "prologue_and_manifest_fraction": (overhead + max(0.0, wall - seconds["total"])) / wall,
    }


def convert_step(data: str, work: Path, fmt: str) -> dict:
    out = work / f"converted.{'beton' if fmt == 'ffcv' else 'shards'}"
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "rded_fast.cli", "convert", "--format", fmt, "--data", data, "--out", str(out), "--quiet"]
    proc, wall = _timed(cmd)
    files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
    return {
        "format": fmt,
        "wall_s": wall,
        "disk_mib": sum(p.stat().st_size for p in files) / 2**20,
        "peak_rss_mib": _peak_rss_mib(proc),
        "summary": proc.stdout.strip()[-400:],
    }


def _image_hashes(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*.png"))
        if p.name != "contact_sheet.png"
    }


def resume_step(data: str, work: Path, mipc: int = 40, kill_at: int = 500) -> dict:
    index = work / "index.npz"
    whole, broken = work / "resume-whole", work / "resume-killed"
    subprocess.run(_distill_cmd(data, whole, mipc, index, ["--overwrite"]), cwd=ROOT, check=True, capture_output=True)
    shutil.rmtree(broken, ignore_errors=True)
    proc = subprocess.Popen(
        _distill_cmd(data, broken, mipc, index, []), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal = broken / ".rded-journal"
    done = 0
    while proc.poll() is None:
        done = len(list(journal.glob("class*"))) if journal.is_dir() else 0
        if done >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    t = time.perf_counter()
    subprocess.run(_distill_cmd(data, broken, mipc, index, ["--resume"]), cwd=ROOT, check=True, capture_output=True)
    resumed_s = time.perf_counter() - t
    a, b = _image_hashes(whole), _image_hashes(broken)
    return {
        "mipc": mipc,
        "journaled_when_killed": done,
        "resume_s": resumed_s,
        "images": len(a),
        "identical_bytes": a == b and len(a) > 0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--work", required=True, help="scratch folder (outputs, index cache); not inside --data")
    p.add_argument("--json", required=True)
    p.add_argument("--steps", default="index,distill,resume")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from rded_fast.device import cpu_description

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}  # steps run apart add up
    result: dict = {
        **earlier,
        "data": args.data,
        "cpu": cpu_description(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    steps = args.steps.split(",")
    if "index" in steps:
        result.update(index_steps(args.data, work))
        print(json.dumps({k: result[k] for k in ("index_cold", "index_cached")}), flush=True)
    if "distill" in steps:
        result["distill"] = distill_step(args.data, work)
        print(json.dumps(result["distill"]), flush=True)
    if "index_all" in steps:
        result["index_all"] = index_all_step(args.data, work)
        print(json.dumps(result["index_all"]), flush=True)
    if "nproc" in steps:
        result["distill_nproc2"] = distill_step(args.data, work, nproc=2)
        print(json.dumps(result["distill_nproc2"]), flush=True)
    for fmt in [f for f in ("dali", "ffcv") if "convert" in steps]:
        result[f"convert_{fmt}"] = convert_step(args.data, work, fmt)
        print(json.dumps(result[f"convert_{fmt}"]), flush=True)
    if "resume" in steps:
        result["resume"] = resume_step(args.data, work)
        print(json.dumps(result["resume"]), flush=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
