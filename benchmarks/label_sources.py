"""Which labels a student of RDED's stitched images should learn from, at factor 2: measured on real data.

One RDED set per seed (Fashion-MNIST, factor 2, a Conv3 observer trained at the input size), and Conv3 students
trained on it with each label source:
- `soft`: the teacher labels each augmented view online (the reference code's way; `relabel` stores the same);
- `region-cells`: one stored teacher label per cell (`relabel --region cells`, the RDED paper's region-level
  labels): a view gets the cells its crop covers, by area;
- `region-image`: one stored teacher label per whole stitched image (`relabel --region image`);
- `hard`: the images' own one-hot labels (no teacher).
Mean +- std of the final top-1 over seeds, as JSON.

Run: python -m rded_fast.benchmarks.label_sources --work W --input-size 32 --ipc 10 --seeds 3 --epochs 80
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rded_fast.benchmarks.quality import RESULTS, distilled_set, observer_for, run_record, stats
from rded_fast.data import fashion_mnist
from rded_fast.device import device_name, resolve_device
from rded_fast.fileio import atomic_write_text
from rded_fast.train.student import StudentConfig, evaluate, relabel

SOURCES = ("soft", "region-cells", "region-image", "hard")


def student_run(
    work: Path, distilled: Path, source: str, seed: int, observer: Path, test_dir: Path, epochs: int, device: str, show: bool
) -> dict:
    """One student on `distilled` with labels from `source` (region labels stored once per set)."""
    base = dict(distilled=str(distilled), teacher="conv3", teacher_weights=str(observer), device=device, show_progress=show)
    labels, soft_labels = ("hard", None) if source == "hard" else ("soft", None)
    if source.startswith("region-"):
        region = source.split("-", 1)[1]
        soft_labels = str(work / f"{distilled.name}_labels_{region}")
        if not (Path(soft_labels) / "regions.npz").is_file():
            relabel(StudentConfig(**base, region=region, out=soft_labels))
    result = evaluate(
        StudentConfig(
            **base,
            val=str(test_dir),
            student="conv3",
            epochs=epochs,
            seed=seed,
            labels=labels,
            soft_labels=soft_labels,
            json=str(work / f"{distilled.name}_{source}.evaluate.json"),
        )
    )
    return run_record(seed, result)


def run_label_sources(
    work: Path,
    ipc: int = 10,
    factor: int = 2,
    input_size: int = 64,
    seeds: tuple[int, ...] = (0, 1, 2),
    epochs: int = 80,
    observer_epochs: int = 1,
    device: str = "auto",
    show_progress: bool = True,
    sources: tuple[str, ...] = SOURCES,
    train_dir: Path | None = None,
    test_dir: Path | None = None,
    observer: Path | None = None,
) -> dict:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if train_dir is None or test_dir is None:
        train_dir, test_dir = fashion_mnist.prepare(show_progress=show_progress)
    observer, observer_acc = observer_for(work, train_dir, test_dir, observer_epochs, device, show_progress, observer, input_size)
    runs: dict[str, list[dict]] = {s: [] for s in sources}
    for seed in seeds:
        distilled = distilled_set(
            work, "rded", ipc, seed, observer, train_dir, device, show_progress, factor=factor, input_size=input_size
        )
        for source in sources:
            runs[source].append(student_run(work, distilled, source, seed, observer, test_dir, epochs, device, show_progress))
    summary = {s: stats([r["final_top1"] for r in rs]) for s, rs in runs.items()}
    return {
        "benchmark": "label_sources_fashion_mnist",
        "settings": {
            "ipc": ipc,
            "factor": factor,
            "input_size": input_size,
            "epochs": epochs,
            "seeds": list(seeds),
            "observer": "conv3",
            "observer_epochs": observer_epochs,
            "student": "conv3",
            "selection": "rded",
        },
        "final_top1": summary,
        "observer_test_top1": observer_acc,
        "device": device_name(resolve_device(device)),
        "seconds": time.perf_counter() - t0,
    }


def format_result(result: dict) -> str:
    s = result["settings"]
    lines = [f"IPC {s['ipc']}, factor {s['factor']}, {s['input_size']} px, {s['epochs']} epochs: final top-1 %"]
    lines += [
        f"  {source:<14}{100 * v['mean']:6.2f} +- {100 * v['std']:.2f} (n={len(v['runs'])})"
        for source, v in result["final_top1"].items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-labels", help="working folder (observer, distilled sets, labels, results)")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--observer-epochs", type=int, default=1)
    p.add_argument("--observer", help="reuse this Conv3 checkpoint (trained on the train split at --input-size)")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="output JSON (default benchmarks/results/label_sources_fashion_mnist_<device>.json)")
    args = p.parse_args(argv)
    result = run_label_sources(
        Path(args.work),
        ipc=args.ipc,
        factor=args.factor,
        input_size=args.input_size,
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        observer_epochs=args.observer_epochs,
        device=args.device,
        sources=tuple(args.sources.split(",")),
        observer=Path(args.observer) if args.observer else None,
    )
    print(format_result(result))
    out = Path(args.json) if args.json else RESULTS / f"label_sources_fashion_mnist_{result['device'].replace(' ', '_')}.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
