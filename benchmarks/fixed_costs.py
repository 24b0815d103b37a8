"""The fixed costs of a `distill` at ImageNet-1K's number of classes: start-up, observer check, manifest, exit.

Issue targets (GPU rows): the observer check <= 3 s at 1000 classes with any loader, start-up + manifest <= 5 s.
On a CPU the same costs show on a small 1000-class tree (benchmarks/make_imagenet1k_tree.py --link-from a few
hundred ImageNet-like JPEGs), with little else in the run: IPC 10, factor 2, mipc 10 x 4 crops at 32 px, conv3,
observer check run but not enforced (the conv3 is untrained). Each run is its own `cli.py distill` process with
an empty inductor cache (a cold compile, as on a fresh machine). `outside` = the process's wall time minus
run.seconds.total: interpreter start-up and imports, the manifest, the summary and the exit.

Several `--cli` (e.g. this checkout's cli.py and an older worktree's) are run in turn, A B A B, so that their
ratio is measured under the same load.

Run: python -m rded_fast.benchmarks.fixed_costs --data /tmp/in1k --loader torch --work /tmp/fc --runs 3 \\
         --cli cli.py --cli /tmp/before/cli.py --json benchmarks/results/fixed_costs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rded_fast.device import cpu_description
from rded_fast.manifest import read_manifest

STAGES = ("index", "plan", "check", "compile", "prologue", "classes", "total")


def distill_command(cli: str, data: str, out: Path, loader: str, compile_mode: str) -> list[str]:
    """The measured command: a 1000-class distill whose class stage is small."""
    return [
        sys.executable,
        cli,
        "distill",
        "--data",
        data,
        "--observer",
        "conv3",
        "--out",
        str(out),
        "--ipc",
        "10",
        "--factor",
        "2",
        "--mipc",
        "10",
        "--num-crop",
        "4",
        "--input-size",
        "32",
        "--skip-observer-check",
        "--loader",
        loader,
        "--compile",
        compile_mode,
        "--quiet",
    ]


def one_run(cli: str, data: str, work: Path, loader: str, compile_mode: str) -> dict:
    """One process: wall seconds, its stages (run.seconds), `outside` and the manifest's size. Its output and
    inductor cache live in a new temporary folder under `work`, removed afterwards; nothing else there is touched."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        out, env = Path(scratch) / "out", {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(scratch) / "inductor")}
        start = time.perf_counter()
        subprocess.run(distill_command(cli, data, out, loader, compile_mode), env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        seconds = read_manifest(out / "manifest.json").seconds
        row = {"wall": wall, **{k: seconds[k] for k in STAGES if k in seconds}, "outside": wall - seconds["total"]}
        row["manifest_mib"] = (out / "manifest.json").stat().st_size / 2**20
    return row


def medians(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a 1000-class ImageFolder, .beton or shard folder")
    p.add_argument("--loader", default="torch")
    p.add_argument("--compile", default="off", choices=["on", "off"])
    p.add_argument("--work", required=True, help="scratch folder (outputs, inductor caches)")
    p.add_argument("--runs", type=int, default=3, help="runs of each --cli, in turn")
    p.add_argument("--cli", action="append", help="a checkout's cli.py (repeat to compare; default this one)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    clis = args.cli or [str(Path(__file__).resolve().parents[1] / "cli.py")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {cli: [] for cli in clis}
    for i in range(args.runs):
        for cli in clis:
            row = one_run(cli, args.data, work, args.loader, args.compile)
            runs[cli].append(row)
            print(json.dumps({"cli": cli, "run": i, **{k: round(v, 2) for k, v in row.items()}}), flush=True)
    result = {
        "cpu": cpu_description(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": args.data,
        "loader": args.loader,
        "compile": args.compile,
        "command": " ".join(distill_command("CLI", args.data, Path("OUT"), args.loader, args.compile)),
        "runs": runs,
        "median": {cli: medians(rows) for cli, rows in runs.items()},
    }
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
