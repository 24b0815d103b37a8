"""What `--select rded-cover` costs per class over `rded`: the distill stages that differ, timed in turn.

Per class, rded scores its crops and ranks them; rded-cover scores them in the same pass while keeping the
penultimate features, takes the cosine similarity of each image's best crop on the device, and runs k-means on
the host. This times exactly those calls (`score_class` then `select_cells`, the functions distill runs) on one
class of real-sized input (mipc x num_crop crops of p x p px), A B A B, and reports the medians and their ratio.
Loading, stitching and writing are the same for both and are left out, so the ratio is an upper bound on what
a whole run pays.

Run: python -m rded_fast.benchmarks.cover_cost --observer conv3 --input-size 32 --ipc 50 --compile on
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rded_fast.class_stage import score_class, select_cells, to_host
from rded_fast.device import cpu_description, device_name, resolve_device
from rded_fast.distill import DistillConfig
from rded_fast.fileio import atomic_write_text
from rded_fast.models import build
from rded_fast.observer_setup import make_scorer
from rded_fast.score import Scorer


def _scorer(cfg: DistillConfig, device: torch.device) -> Scorer:
    scorer = make_scorer(cfg, build(cfg.observer, 10, None, cfg.input_size), device, crops=0)
    scorer.warm(cfg.input_size // cfg.factor)
    return scorer


def one_class(cfg: DistillConfig, scorer: Scorer, crops: torch.Tensor, ok: torch.Tensor, device: torch.device) -> float:
    """Seconds of one class's scoring and selection, the device synchronised at the end."""
    t = time.perf_counter()
    scored = to_host(score_class(cfg, 0, crops, scorer))()
    select_cells(cfg, 0, scored, ok, cfg.num_crop, "class")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def measure(
    observer: str, input_size: int, ipc: int, factor: int, mipc: int, num_crop: int, compile: str, device: str, reps: int
) -> dict:
    dev = resolve_device(device)
    cfgs = {
        sel: DistillConfig(
            data="-",
            out="-",
            observer=observer,
            ipc=ipc,
            factor=factor,
            mipc=mipc,
            num_crop=num_crop,
            input_size=input_size,
            select=sel,
            compile=compile,
            device=device,
        )  # fmt: skip
        for sel in ("rded", "rded-cover")
    }
    scorers = {sel: _scorer(cfg, dev) for sel, cfg in cfgs.items()}
    p = input_size // factor
    g = torch.Generator().manual_seed(0)
    crops = torch.randint(0, 256, (mipc, num_crop, 3, p, p), dtype=torch.uint8, generator=g).to(dev)
    ok = torch.ones(mipc, dtype=torch.bool)
    seconds: dict[str, list[float]] = {sel: [] for sel in cfgs}
    for sel in cfgs:  # one untimed class each
        one_class(cfgs[sel], scorers[sel], crops, ok, dev)
    for _ in range(reps):
        for sel in cfgs:
            seconds[sel].append(one_class(cfgs[sel], scorers[sel], crops, ok, dev))
    ratios = [c / r for r, c in zip(seconds["rded"], seconds["rded-cover"])]
    return {
        "benchmark": "cover_cost",
        "settings": {
            "observer": observer,
            "input_size": input_size,
            "ipc": ipc,
            "factor": factor,
            "mipc": mipc,
            "num_crop": num_crop,
            "compile": compile,
            "reps": reps,
        },  # fmt: skip
        "device": device_name(dev),
        "cpu": cpu_description(),
        "median_seconds": {sel: statistics.median(v) for sel, v in seconds.items()},
        "median_ratio_cover_over_rded": statistics.median(ratios),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--observer", default="conv3")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--ipc", type=int, default=50)
    p.add_argument("--factor", type=int, default=1)
    p.add_argument("--mipc", type=int, default=300)
    p.add_argument("--num-crop", type=int, default=5)
    p.add_argument("--compile", default="on", choices=["on", "off"])
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    result = measure(a.observer, a.input_size, a.ipc, a.factor, a.mipc, a.num_crop, a.compile, a.device, a.reps)
    med = result["median_seconds"]
    print(
        f"per class: rded {med['rded']:.3f} s, rded-cover {med['rded-cover']:.3f} s, "
        f"ratio {result['median_ratio_cover_over_rded']:.3f} (median of {a.reps} pairs)"
    )
    if a.json:
        atomic_write_text(a.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
