"""Quality benchmark: what RDED's selection is worth, against the literature's baselines, with and without
the teacher's soft labels, on real data.

Fashion-MNIST (Debian's dataset-fashion-mnist, 60k train / 10k test) at 32 px RGB; a Conv3 observer/teacher
trained on the full train split; factor 1, mipc 300, 5 crops. Rows: RDED, `random-images` (random whole
real images: the "random" row of dataset-distillation papers) and `random-crops` (random crops stitched like
RDED's cells: the ablation of the observer's ranking). Columns: IPC, and the student's labels (`soft`: the
teacher's, RDED's recipe; `hard`: the images' own one-hot labels, which measures what the images alone
carry). Conv3 students, mean +- std over seeds. Writes JSON and a PNG plot (accuracy vs IPC, error bars).

Run: python -m rded_fast.benchmarks.quality --ipcs 1,10 --seeds 3 --epochs 100   (or `rded-fast bench --stage quality`)
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from rded_fast.data import fashion_mnist
from rded_fast.device import device_name, resolve_device
from rded_fast.distill import DistillConfig, distill
from rded_fast.fileio import atomic_write_bytes, atomic_write_text
from rded_fast.train.observer import ObserverConfig, train_observer
from rded_fast.train.student import StudentConfig, evaluate

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("rded", "random-images", "random-crops")
LABELS = ("soft", "hard")


def stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


def observer_for(
    work: Path,
    train_dir: Path,
    test_dir: Path,
    epochs: int,
    device: str,
    show: bool,
    given: Path | None = None,
    input_size: int = 32,
) -> tuple[Path, float | None]:
    """A Conv3 observer/teacher trained on the train split at `input_size` (reused from `work` or `given`)."""
    path = given or work / ("observer_conv3_full.pth" if input_size == 32 else f"observer_conv3_full_{input_size}px.pth")
    if path.is_file():
        return path, None
    summary = train_observer(
        ObserverConfig(
            data=str(train_dir),
            val=str(test_dir),
            out=str(path),
            arch="conv3",
            input_size=input_size,
            epochs=epochs,
            device=device,
            show_progress=show,
        )
    )
    return path, summary["val_accuracy"]


def distilled_set(
    work: Path,
    row: str,
    ipc: int,
    seed: int,
    observer: Path,
    train_dir: Path,
    device: str,
    show: bool,
    mipc: int = 300,
    num_crop: int = 5,
    factor: int = 1,
    input_size: int = 32,
) -> Path:
    """One distilled set, made once per (selection, IPC, seed[, factor, size]) and reused."""
    shape = "" if (factor, input_size) == (1, 32) else f"_f{factor}_{input_size}px"
    out = work / f"{row}_ipc{ipc}_seed{seed}{shape}"
    if not (out / "manifest.json").is_file():
        distill(
            DistillConfig(
                data=str(train_dir),
                out=str(out),
                observer="conv3",
                weights=str(observer),
                ipc=ipc,
                factor=factor,
                mipc=mipc,
                num_crop=num_crop,
                input_size=input_size,
                seed=seed,
                batch_size=128,
                device=device,
                select=row,
                index=str(work / "train_index.npz"),
                overwrite=True,
                show_progress=show,
            )
        )
    return out


def _cell(
    work: Path,
    row: str,
    ipc: int,
    seed: int,
    labels: str,
    observer: Path,
    train_dir: Path,
    test_dir: Path,
    epochs: int,
    device: str,
    show: bool,
    mipc: int = 300,
    num_crop: int = 5,
) -> dict:
    """One distilled set (made once per row, IPC and seed) and one student on it."""
    out = distilled_set(work, row, ipc, seed, observer, train_dir, device, show, mipc, num_crop)
    result = evaluate(
        StudentConfig(
            distilled=str(out),
            val=str(test_dir),
            teacher="conv3",
            teacher_weights=str(observer),
            student="conv3",
            epochs=epochs,
            seed=seed,
            device=device,
            labels=labels,
            json=str(work / f"{row}_ipc{ipc}_seed{seed}_{labels}.evaluate.json"),
            show_progress=show,
        )
    )
    return run_record(seed, result)


def run_record(seed: int, result: dict) -> dict:
    return {"seed": seed, "final_top1": result["final_top1"], "best_top1": result["best_top1"], "seconds": result["seconds"]}


def run_quality(
    work: Path,
    ipcs: tuple[int, ...] = (1, 10),
    seeds: tuple[int, ...] = (0, 1, 2),
    epochs: int = 300,
    observer_epochs: int = 5,
    device: str = "auto",
    show_progress: bool = True,
    observer: Path | None = None,
    train_dir: Path | None = None,
    test_dir: Path | None = None,
    mipc: int = 300,
    num_crop: int = 5,
) -> dict:
    """Run every (row, IPC, labels, seed) cell in `work` (distilled sets and the observer are reused if there).
    Default data: the packaged Fashion-MNIST at 32 px (train_dir/test_dir: another ImageFolder pair)."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if train_dir is None or test_dir is None:
        train_dir, test_dir = fashion_mnist.prepare(show_progress=show_progress)
    observer, observer_acc = observer_for(work, train_dir, test_dir, observer_epochs, device, show_progress, observer)
    table: dict = {row: {str(ipc): {lab: [] for lab in LABELS} for ipc in ipcs} for row in ROWS}
    for ipc in ipcs:
        for seed in seeds:
            for row in ROWS:
                for lab in LABELS:
                    table[row][str(ipc)][lab].append(
                        _cell(
                            work,
                            row,
                            ipc,
                            seed,
                            lab,
                            observer,
                            train_dir,
                            test_dir,
                            epochs,
                            device,
                            show_progress,
                            mipc,
                            num_crop,
                        )
                    )
    settings = {
        "ipcs": list(ipcs),
        "factor": 1,
        "mipc": mipc,
        "num_crop": num_crop,
        "input_size": 32,
        "epochs": epochs,
        "seeds": list(seeds),
        "observer": "conv3",
        "observer_epochs": observer_epochs,
        "student": "conv3",
        "bn_refresh": True,
    }
    return {
        **summarise(table, settings),
        "device": device_name(resolve_device(device)),
        "observer_test_top1": observer_acc,
        "seconds": time.perf_counter() - t0,
    }


def summarise(table: dict, settings: dict) -> dict:
    """Mean +- std per (row, IPC, labels) and RDED's margin over random-images, from the runs in `table`."""
    summary = {
        row: {
            ipc: {lab: stats([r["final_top1"] for r in runs]) for lab, runs in by_lab.items() if runs}
            for ipc, by_lab in by_ipc.items()
        }
        for row, by_ipc in table.items()
    }
    margins = {
        f"ipc{ipc}_{lab}": _margin(summary["rded"][str(ipc)][lab], summary["random-images"][str(ipc)][lab])
        for ipc in settings["ipcs"]
        for lab in LABELS
        if lab in summary["rded"][str(ipc)] and lab in summary["random-images"][str(ipc)]
    }
    return {
        "benchmark": "quality_fashion_mnist_table",
        "settings": settings,
        "final_top1": summary,
        "rded_vs_random_images": margins,
        "runs": table,
    }


def from_work(work: Path) -> dict:
    """The table of the cells finished in `work` (an interrupted or partial run): every evaluate JSON there."""
    table: dict = {}
    settings: dict = {}
    for path in sorted(work.glob("*_ipc*_seed*_*.evaluate.json")):
        row, rest = path.name.split("_ipc", 1)
        ipc, rest = rest.split("_seed", 1)
        seed, lab = rest.split(".")[0].split("_")
        result = json.loads(path.read_text())
        settings = {"epochs": result["parameters"]["epochs"], "bn_refresh": result["parameters"]["bn_refresh"]}
        table.setdefault(row, {}).setdefault(ipc, {name: [] for name in LABELS})[lab].append(
            {
                "seed": int(seed),
                "final_top1": result["final_top1"],
                "best_top1": result["best_top1"],
                "seconds": result["seconds"],
            }
        )
    ipcs = sorted({int(i) for by_ipc in table.values() for i in by_ipc})
    seeds = sorted(
        {r["seed"] for by_ipc in table.values() for by_lab in by_ipc.values() for runs in by_lab.values() for r in runs}
    )
    for row in ROWS:
        for ipc in ipcs:
            table.setdefault(row, {}).setdefault(str(ipc), {name: [] for name in LABELS})
    return summarise(
        table,
        {
            **settings,
            "ipcs": ipcs,
            "seeds": seeds,
            "factor": 1,
            "input_size": 32,
            "observer": "conv3",
            "student": "conv3",
            "partial": True,
        },
    )


def _margin(rded: dict, random: dict) -> dict:
    diff = rded["mean"] - random["mean"]
    return {"points": 100 * diff, "in_random_std": diff / random["std"] if random["std"] > 0 else None}


def format_table(result: dict) -> str:
    ipcs = result["settings"]["ipcs"]
    head = f"{'selection':<16}" + "".join(f"{f'IPC {i} {lab}':>20}" for i in ipcs for lab in LABELS)
    lines = [head, "-" * len(head)]
    for row in ROWS:
        cells = (result["final_top1"][row][str(i)].get(lab) for i in ipcs for lab in LABELS)
        lines.append(
            f"{row:<16}"
            + "".join(
                f"{100 * c['mean']:>8.2f} +- {100 * c['std']:<4.2f} (n={len(c['runs'])})" if c else f"{'-':>20}" for c in cells
            )
        )
    for key, m in result["rded_vs_random_images"].items():
        std = f" = {m['in_random_std']:.1f} random std" if m["in_random_std"] is not None else ""
        lines.append(f"RDED - random-images, {key}: {m['points']:+.2f} points{std}")
    return "\n".join(lines)


def plot(result: dict, width: int = 640, height: int = 420) -> bytes:
    """Accuracy vs IPC (log-spaced positions), one colour per row, solid soft / dashed-marker hard, +-1 std bars."""
    ipcs = result["settings"]["ipcs"]
    colours = {"rded": (200, 40, 40), "random-images": (40, 90, 200), "random-crops": (60, 150, 60)}
    cells = {(r, i, lab): result["final_top1"][r][str(i)].get(lab) for r in ROWS for i in ipcs for lab in LABELS}
    lo = min(100 * (c["mean"] - c["std"]) for c in cells.values() if c) - 3
    hi = max(100 * (c["mean"] + c["std"]) for c in cells.values() if c) + 3
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, width - 160, 20, height - 40
    d.rectangle([left, top, right, bottom], outline="black")
    xs = {ipc: left + 30 + k * (right - left - 60) / max(1, len(ipcs) - 1) for k, ipc in enumerate(ipcs)}

    def y(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    for v in range(int(lo), int(hi) + 1, max(1, int((hi - lo) / 6))):
        d.text((8, y(v) - 6), f"{v}%", fill="black")
    for ipc, x in xs.items():
        d.text((x - 14, bottom + 8), f"IPC {ipc}", fill="black")
    for k, row in enumerate(ROWS):
        for j, lab in enumerate(LABELS):
            pts = []
            for ipc in ipcs:
                s = cells[(row, ipc, lab)]
                if s is None:
                    continue
                x, m, e = xs[ipc] + (k - 1) * 6 + (j * 3), 100 * s["mean"], 100 * s["std"]
                d.line([x, y(m - e), x, y(m + e)], fill=colours[row])
                d.ellipse(
                    [x - 3, y(m) - 3, x + 3, y(m) + 3], fill=colours[row] if lab == "soft" else "white", outline=colours[row]
                )
                pts.append((x, y(m)))
            if len(pts) > 1:
                d.line(pts, fill=colours[row], width=2 if lab == "soft" else 1)
        d.text((right + 10, top + 10 + 30 * k), f"{row}", fill=colours[row])
    d.text((right + 10, top + 110), "filled: soft labels", fill="black")
    d.text((right + 10, top + 125), "open: hard labels", fill="black")
    d.text((left, 4), "Fashion-MNIST, conv3 students: final top-1 (mean +- std)", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-quality", help="working folder for observer, distilled sets, evaluations")
    p.add_argument("--ipcs", default="1,10", help="comma-separated IPCs (the issue's table: 1,10,50)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--observer-epochs", type=int, default=5)
    p.add_argument("--observer", help="reuse this Conv3 checkpoint (trained on the train split) instead of training one")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="output JSON (default benchmarks/results/quality_table_fashion_mnist_<device>.json)")
    p.add_argument("--summarise", action="store_true", help="only tabulate the cells already finished in --work")
    args = p.parse_args(argv)
    if args.summarise:
        observer = Path(args.observer) if args.observer else Path(args.work) / "observer_conv3_full.pth"
        saved = torch.load(observer, map_location="cpu", weights_only=True) if observer.is_file() else {}
        result = {
            **from_work(Path(args.work)),
            "device": device_name(resolve_device(args.device)),
            "seconds": 0.0,
            "observer_test_top1": saved.get("val_accuracy"),
        }
        return _write(result, args.json)
    result = run_quality(
        Path(args.work),
        ipcs=tuple(int(v) for v in args.ipcs.split(",")),
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        observer_epochs=args.observer_epochs,
        device=args.device,
        observer=Path(args.observer) if args.observer else None,
    )
    return _write(result, args.json)


def _write(result: dict, json_path: str | None) -> int:
    print(format_table(result))
    out = Path(json_path) if json_path else RESULTS / f"quality_table_fashion_mnist_{result['device'].replace(' ', '_')}.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    atomic_write_bytes(out.with_suffix(".png"), plot(result))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
