"""Quality benchmark: does RDED's selection beat a random subset under the same recipe, on real data?

Fashion-MNIST (Debian's dataset-fashion-mnist, 60k train / 10k test) at 32 px RGB; a Conv3
observer/teacher trained on the full train split; IPC 10, factor 1, mipc 300, 5 crops; RDED vs
`--select random` for several seeds; Conv3 students with the faithful recipe. Prints a table of final
top-1 (mean +- std) and writes JSON under benchmarks/results/.

Run: python -m benchmarks.quality   (or `rded-fast bench --stage quality`)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


from rded_fast.data import fashion_mnist
from rded_fast.device import device_name, resolve_device
from rded_fast.distill import DistillConfig, distill
from rded_fast.fileio import atomic_write_text
from rded_fast.train.observer import ObserverConfig, train_observer
from rded_fast.train.student import StudentConfig, evaluate

RESULTS = Path(__file__).resolve().parent / "results"


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


def run_quality(
    work: Path,
    train_dir: Path | None = None,
    test_dir: Path | None = None,
    observer: Path | None = None,
    observer_epochs: int = 5,
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
    epochs: int = 300,
    ipc: int = 10,
    mipc: int = 300,
    num_crop: int = 5,
    device: str = "auto",
    show_progress: bool = True,
) -> dict:
    """Run the benchmark in `work`; returns the result dict (also what is written as JSON)."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if train_dir is None or test_dir is None:
        train_dir, test_dir = fashion_mnist.prepare(show_progress=show_progress)
    observer_summary = None
    if observer is None:
        observer = work / "observer_conv3_full.pth"
        observer_summary = train_observer(ObserverConfig(
            data=str(train_dir), val=str(test_dir), out=str(observer), arch="conv3", input_size=32,
            epochs=observer_epochs, device=device, show_progress=show_progress))
    runs: dict[str, list[dict]] = {"rded": [], "random": []}
    for seed in seeds:
        for select in ("rded", "random"):
            out = work / f"{select}_seed{seed}"
            distill(DistillConfig(
                data=str(train_dir), out=str(out), observer="conv3", weights=str(observer), ipc=ipc, factor=1,
                mipc=mipc, num_crop=num_crop, input_size=32, seed=seed, batch_size=128, workers=2, device=device,
                select=select, index=str(work / "train_index.npz"), overwrite=True, show_progress=show_progress))
            result = evaluate(StudentConfig(
                distilled=str(out), val=str(test_dir), teacher="conv3", teacher_weights=str(observer), student="conv3",
                epochs=epochs, seed=seed, device=device, json=str(work / f"{select}_seed{seed}.evaluate.json"),
                show_progress=show_progress))
            runs[select].append({"seed": seed, "final_top1": result["final_top1"], "final_top5": result["final_top5"],
                                 "best_top1": result["best_top1"], "seconds": result["seconds"]})
    rded = _stats([r["final_top1"] for r in runs["rded"]])
    rand = _stats([r["final_top1"] for r in runs["random"]])
    observer_acc = observer_summary["val_accuracy"] if observer_summary else None
    return {
        "benchmark": "quality_fashion_mnist",
        "device": device_name(resolve_device(device)),
        "settings": {"ipc": ipc, "factor": 1, "mipc": mipc, "num_crop": num_crop, "input_size": 32, "epochs": epochs,
                     "seeds": list(seeds), "observer": "conv3", "observer_epochs": observer_epochs, "student": "conv3",
                     "train_dir": str(train_dir), "test_dir": str(test_dir)},
        "observer_test_top1": observer_acc,
        "rded_final_top1": rded,
        "random_final_top1": rand,
        "margin": rded["mean"] - rand["mean"],
        "margin_in_random_std": (rded["mean"] - rand["mean"]) / rand["std"] if rand["std"] > 0 else None,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }


def format_table(result: dict) -> str:
    rows = [("RDED (conv3 -> conv3)", result["rded_final_top1"]), ("random subset", result["random_final_top1"])]
    lines = [f"{'selection':<24}{'final top-1':>22}", "-" * 46]
    for name, s in rows:
        lines.append(f"{name:<24}{100 * s['mean']:>12.2f} +- {100 * s['std']:.2f} %")
    if result["observer_test_top1"] is not None:
        lines.append(f"{'full-data observer':<24}{100 * result['observer_test_top1']:>12.2f} %")
    lines.append(f"margin: {100 * result['margin']:.2f} points"
                 + (f" = {result['margin_in_random_std']:.1f} random std" if result["margin_in_random_std"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-quality", help="working folder for observer, distilled sets, evaluations")
    p.add_argument("--observer", help="reuse a trained Conv3 checkpoint instead of training one")
    p.add_argument("--observer-epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="output JSON (default benchmarks/results/quality_fashion_mnist_<device>.json)")
    args = p.parse_args(argv)
    result = run_quality(Path(args.work), observer=Path(args.observer) if args.observer else None,
                         observer_epochs=args.observer_epochs, seeds=tuple(range(args.seeds)), epochs=args.epochs,
                         device=args.device)
    print(format_table(result))
    out = Path(args.json) if args.json else RESULTS / f"quality_fashion_mnist_{result['device'].replace(' ', '_')}.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
