"""How many teacher logits `relabel` must keep per augmented view: students on stored top-k labels against online ones.

Per seed one RDED set (Fashion-MNIST, the quality benchmark's sets and observer when run in its working folder),
the teacher labelling every view online (the reference's way), then `relabel --top-k K` for each K and a student
replaying those labels (same seed, same recipe). The stored labels keep the top K probabilities exactly and spread
the rest evenly (rded_fast/train/softlabels.py). `relabel`'s default K is the smallest whose mean final top-1 is
within 0.5 point of the online labels' (the JSON's `chosen_k`).

Run: python -m rded_fast.benchmarks.label_topk --work W --observer-epochs 6 --seeds 3 --epochs 80 --ks 1,2,3,5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rded_fast.benchmarks.quality import DATASETS, RESULTS, distilled_set, observer_for, stats
from rded_fast.device import cpu_description, device_name, resolve_device
from rded_fast.fileio import atomic_write_text
from rded_fast.train.student import StudentConfig, evaluate, relabel

WITHIN_POINTS = 0.5


def _student(work: Path, name: str, base: dict, test_dir: Path, epochs: int, seed: int, soft_labels: str | None) -> float:
    """One student's final top-1 (its evaluate JSON kept in `work`, and reused when there)."""
    path = work / f"{name}.evaluate.json"
    if path.is_file() and json.loads(path.read_text())["parameters"]["epochs"] == epochs:
        return json.loads(path.read_text())["final_top1"]
    cfg = StudentConfig(
        **base, val=str(test_dir), student="conv3", epochs=epochs, seed=seed, soft_labels=soft_labels, final_only=True,
        json=str(path),
    )  # fmt: skip
    return evaluate(cfg)["final_top1"]


def run_label_topk(
    work: Path, ks: tuple[int, ...], seeds: tuple[int, ...], epochs: int, observer_epochs: int, ipc: int, device: str, show: bool
) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    train_dir, test_dir = DATASETS["fashion-mnist"](show_progress=show)
    observer, observer_acc = observer_for(work, train_dir, test_dir, observer_epochs, device, show)
    top1: dict[str, list[float]] = {"online": [], **{str(k): [] for k in ks}}
    label_bytes: dict[str, float] = {}
    for seed in seeds:
        distilled = distilled_set(work, "rded", ipc, seed, observer, train_dir, device, show)
        base = dict(distilled=str(distilled), teacher="conv3", teacher_weights=str(observer), device=device, show_progress=show)
        top1["online"].append(_student(work, f"{distilled.name}_online_e{epochs}", base, test_dir, epochs, seed, None))
        for k in ks:
            labels = work / f"{distilled.name}_top{k}_e{epochs}"
            if not (labels / "header.json").is_file():
                stored = relabel(StudentConfig(**base, epochs=epochs, seed=seed, top_k=k, out=str(labels)))
                label_bytes[str(k)] = stored["bytes_per_epoch"]
            top1[str(k)].append(_student(work, f"{labels.name}", base, test_dir, epochs, seed, str(labels)))
    summary = {name: stats(values) for name, values in top1.items()}
    online = summary["online"]["mean"]
    close = [k for k in ks if online - summary[str(k)]["mean"] <= WITHIN_POINTS / 100]
    return {
        "settings": {"ipc": ipc, "epochs": epochs, "seeds": list(seeds), "observer_test_top1": observer_acc, "ks": list(ks)},
        "final_top1": summary,
        "bytes_per_epoch": label_bytes,
        "chosen_k": min(close) if close else None,
        "device": device_name(resolve_device(device)),
        "cpu": cpu_description(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-topk")
    p.add_argument("--ks", default="1,2,3,5")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--observer-epochs", type=int, default=6)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=str(RESULTS / "label_topk_fashion_mnist.json"))
    args = p.parse_args(argv)
    result = run_label_topk(
        Path(args.work), tuple(int(k) for k in args.ks.split(",")), tuple(range(args.seeds)), args.epochs,
        args.observer_epochs, args.ipc, args.device, show=True,
    )  # fmt: skip
    for name, s in result["final_top1"].items():
        print(f"{name:>7}: {100 * s['mean']:.2f} +- {100 * s['std']:.2f}")
    print(f"chosen k: {result['chosen_k']}")
    atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
