"""Faithful vs native scoring: speed of the scoring stage and how much the selection changes.

`--score-mode native` scores the p x p crop without RDED's padding to the input size (4x fewer pixels
at factor 2). This runs `distill` both ways on the same data, seed and observer and reports the
seconds of the per-class stage and the fraction of (source, box) cells both select.

Run: python -m rded_fast.benchmarks.score_modes --data DIR --observer resnet18 --weights W --input-size 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rded_fast.device import device_name, resolve_device
from rded_fast.distill import DistillConfig, distill
from rded_fast.fileio import atomic_write_text
from rded_fast.manifest import read_manifest


def compare(
    data: str,
    observer: str,
    weights: str | None,
    input_size: int,
    factor: int = 2,
    mipc: int = 300,
    ipc: int = 10,
    workers: int = 2,
    batch_size: int = 100,
    device: str = "auto",
) -> dict:
    cells, seconds = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for mode in ("faithful", "native"):
            r = distill(
                DistillConfig(
                    data=data,
                    out=str(Path(work) / mode),
                    observer=observer,
                    weights=weights,
                    input_size=input_size,
                    factor=factor,
                    mipc=mipc,
                    ipc=ipc,
                    workers=workers,
                    batch_size=batch_size,
                    device=device,
                    score_mode=mode,
                    show_progress=False,
                )
            )
            images = read_manifest(r.manifest).images
            cells[mode] = {(c["source"], tuple(c["box"])) for m in images for c in m["cells"]}
            seconds[mode] = r.seconds["classes"]
    return {
        "device": device_name(resolve_device(device)),
        "data": data,
        "observer": observer,
        "input_size": input_size,
        "factor": factor,
        "mipc": mipc,
        "ipc": ipc,
        "seconds_per_class_stage": seconds,
        "speedup": seconds["faithful"] / seconds["native"],
        "cell_agreement": len(cells["faithful"] & cells["native"]) / len(cells["faithful"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--observer", required=True)
    p.add_argument("--weights")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--mipc", type=int, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    result = compare(args.data, args.observer, args.weights, args.input_size, args.factor, args.mipc, device=args.device)
    atomic_write_text(args.json, json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
