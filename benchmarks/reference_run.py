"""The RDED reference's way of distilling (benchmarks/reference.py) as a whole process, for whole-process
comparisons with `rded-fast distill` on the same tree, checkpoint and plan (e.g. under /usr/bin/time).

    python -m rded_fast.benchmarks.reference_run --data TREE --observer conv3 --weights W --input-size 32 --factor 1 \
        --ipc 10 --mipc 300 --num-crop 5 --out OUT
"""

from __future__ import annotations

import argparse
import json
import shutil

import torch

from rded_fast.device import worker_count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, kind, default in (
        ("--data", str, None),
        ("--observer", str, "conv3"),
        ("--weights", str, None),
        ("--input-size", int, 32),
        ("--factor", int, 1),
        ("--ipc", int, 10),
        ("--mipc", int, 300),
        ("--num-crop", int, 5),
        ("--seed", int, 0),
        ("--workers", worker_count, 4),
        ("--out", str, "reference-out"),
    ):
        p.add_argument(name, type=kind, default=default)
    args = p.parse_args(argv)
    from rded_fast.benchmarks.reference import reference_distill
    from rded_fast.formats.folder import build_index
    from rded_fast.models import build
    from rded_fast.plan import make_plan

    index = build_index(args.data, show_progress=False)
    plan = make_plan(index, args.seed, args.mipc, args.num_crop)
    model = build(args.observer, index.num_classes, args.weights, args.input_size).model
    shutil.rmtree(args.out, ignore_errors=True)
    result = reference_distill(
        index, plan, model, args.input_size, args.factor, args.ipc, args.out, torch.device("cpu"), workers=args.workers
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
