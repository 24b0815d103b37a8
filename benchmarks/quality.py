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
import re
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from rded_fast.data import fashion_mnist
from rded_fast.device import cpu_description, device_name, resolve_device
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


def run_record(seed: int, result: dict) -> dict:
    return {"seed": seed, "final_top1": result["final_top1"], "best_top1": result["best_top1"], "seconds": result["seconds"]}


def shape_key(factor: int, input_size: int) -> str:
    return f"f{factor}_{input_size}px"


def cell_json(work: Path, row: str, ipc: int, seed: int, labels: str, factor: int, input_size: int) -> Path:
    shape = "" if (factor, input_size) == (1, 32) else f"_f{factor}_{input_size}px"
    return work / f"{row}_ipc{ipc}_seed{seed}{shape}_{labels}.evaluate.json"


CELL_NAME = re.compile(r"^(?P<row>[a-z-]+)_ipc(?P<ipc>\d+)_seed(?P<seed>\d+)(?:_f(?P<f>\d+)_(?P<size>\d+)px)?_(?P<lab>soft|hard)")


def _cell(work: Path, row: str, ipc: int, seed: int, labels: str, factor: int, input_size: int, run: dict) -> None:
    """One distilled set (made once per row, IPC, seed and shape) and one student on it; a finished cell with
    the same epochs is kept (an interrupted table goes on where it stopped)."""
    path = cell_json(work, row, ipc, seed, labels, factor, input_size)
    if path.is_file() and json.loads(path.read_text())["parameters"]["epochs"] == run["epochs"]:
        return
    out = distilled_set(
        work, row, ipc, seed, run["observer"], run["train_dir"], run["device"], run["show"], run["mipc"], run["num_crop"],
        factor, input_size,
    )  # fmt: skip
    evaluate(
        StudentConfig(
            distilled=str(out),
            val=str(run["test_dir"]),
            teacher="conv3",
            teacher_weights=str(run["observer"]),
            student="conv3",
            epochs=run["epochs"],
            seed=seed,
            device=run["device"],
            labels=labels,
            final_only=True,
            json=str(path),
            show_progress=run["show"],
        )
    )


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
    factors: tuple[int, ...] = (1,),
) -> dict:
    """Run every (factor, IPC, seed, row, labels) cell in `work` (the observers, distilled sets and finished cells
    there are reused), then tabulate the folder. Factor f runs at 32 * f px, so its cells are 32 px as at factor 1;
    its observer/teacher trains on as many pixels as the 32-px one (observer_epochs * 1024 / size^2 epochs, at
    least 1). Default data: the packaged Fashion-MNIST (train_dir/test_dir: another ImageFolder pair)."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if train_dir is None or test_dir is None:
        train_dir, test_dir = fashion_mnist.prepare(show_progress=show_progress)
    for factor in factors:
        size = 32 * factor
        given = observer if size == 32 else None
        obs_epochs = max(1, observer_epochs * 32 * 32 // (size * size))
        obs, _ = observer_for(work, train_dir, test_dir, obs_epochs, device, show_progress, given, size)
        run = {
            "observer": obs, "train_dir": train_dir, "test_dir": test_dir, "device": device, "show": show_progress,
            "mipc": mipc, "num_crop": num_crop, "epochs": epochs,
        }  # fmt: skip
        for ipc in ipcs:
            for seed in seeds:
                for row in ROWS:
                    for lab in LABELS:
                        _cell(work, row, ipc, seed, lab, factor, size, run)
    return {**from_work(work), "device": device_name(resolve_device(device)), "seconds": time.perf_counter() - t0}


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
    return {"settings": settings, "final_top1": summary, "rded_vs_random_images": margins, "runs": table}


def from_work(work: Path) -> dict:
    """The table of every cell finished in `work` (its evaluate JSONs), one block per shape (factor, size)."""
    tables: dict = {}
    for path in sorted(work.glob("*_ipc*_seed*_*.evaluate.json")):
        m = CELL_NAME.match(path.name)
        if not m:
            continue
        factor, size = int(m["f"] or 1), int(m["size"] or 32)
        result = json.loads(path.read_text())
        p = result["parameters"]
        block = tables.setdefault(
            shape_key(factor, size),
            {"table": {}, "settings": {"factor": factor, "input_size": size, "observer": "conv3", "student": "conv3"}},
        )
        block["settings"].update(
            {k: p.get(k) for k in ("epochs", "bn_refresh", "final_only")}, amp=p.get("resolved_amp", "float32 (before --amp)")
        )
        block["settings"].setdefault("observer_test_top1", _observer_accuracy(p["teacher_weights"]))
        block["table"].setdefault(m["row"], {}).setdefault(m["ipc"], {name: [] for name in LABELS})[m["lab"]].append(
            run_record(int(m["seed"]), result)
        )
    shapes = {}
    for key, block in tables.items():
        table = block["table"]
        ipcs = sorted({int(i) for by_ipc in table.values() for i in by_ipc})
        seeds = sorted(
            {r["seed"] for by_ipc in table.values() for by_lab in by_ipc.values() for rs in by_lab.values() for r in rs}
        )
        for row in ROWS:
            for ipc in ipcs:
                table.setdefault(row, {}).setdefault(str(ipc), {name: [] for name in LABELS})
        shapes[key] = summarise(table, {**block["settings"], "ipcs": ipcs, "seeds": seeds})
    cells = [
        r
        for s in shapes.values()
        for by_ipc in s["runs"].values()
        for by_lab in by_ipc.values()
        for rs in by_lab.values()
        for r in rs
    ]
    return {
        "benchmark": "quality_fashion_mnist_table",
        "shapes": shapes,
        "cell_seconds": sum(r["seconds"] for r in cells),
        "cpu": cpu_description(),
    }


def _observer_accuracy(path: str | None) -> float | None:
    if not path or not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("val_accuracy")


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


def plot(result: dict, width: int = 640, height: int = 420, title: str = "") -> bytes:
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
    d.text((left, 4), f"Fashion-MNIST {title}, conv3 students: final top-1 (mean +- std)".replace("  ", " "), fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-quality", help="working folder for observers, distilled sets, evaluations")
    p.add_argument("--ipcs", default="1,10", help="comma-separated IPCs (the issue's table: 1,10,50)")
    p.add_argument("--factors", default="1", help="comma-separated factors; factor f runs at 32*f px (the table: 1,2)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--observer-epochs", type=int, default=5, help="at 32 px; larger sizes train on as many pixels")
    p.add_argument("--observer", help="reuse this 32-px Conv3 checkpoint (trained on the train split) instead of training one")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="output JSON (default benchmarks/results/quality_table_fashion_mnist_<device>.json)")
    p.add_argument("--summarise", action="store_true", help="only tabulate the cells already finished in --work")
    args = p.parse_args(argv)
    if args.summarise:
        result = {**from_work(Path(args.work)), "device": device_name(resolve_device(args.device)), "seconds": 0.0}
        return _write(result, args.json)
    result = run_quality(
        Path(args.work),
        ipcs=tuple(int(v) for v in args.ipcs.split(",")),
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        observer_epochs=args.observer_epochs,
        device=args.device,
        observer=Path(args.observer) if args.observer else None,
        factors=tuple(int(v) for v in args.factors.split(",")),
    )
    return _write(result, args.json)


def _write(result: dict, json_path: str | None) -> int:
    """Print each shape's table; write the JSON and one PNG with a plot per shape, stacked."""
    plots = []
    for key, shape in result["shapes"].items():
        print(f"== factor {shape['settings']['factor']}, {shape['settings']['input_size']} px ==")
        print(format_table(shape))
        plots.append(Image.open(io.BytesIO(plot(shape, title=f"factor {shape['settings']['factor']}, {key.split('_')[1]}"))))
    out = Path(json_path) if json_path else RESULTS / f"quality_table_fashion_mnist_{result['device'].replace(' ', '_')}.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    if plots:
        sheet = Image.new("RGB", (plots[0].width, sum(im.height for im in plots)), "white")
        for k, im in enumerate(plots):
            sheet.paste(im, (0, k * plots[0].height))
        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        atomic_write_bytes(out.with_suffix(".png"), buf.getvalue())
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
