"""A throughput bar chart of a GPU suite run (benchmarks/gpu_suite.py): each loader against its own ceiling.

Left: each loader's decode + crop rate (img/s, steady state) beside its ceiling (the same graph or library call
alone, same plan, same process: benchmarks/ceilings.py), with the fraction written on the bar. Right: each loader's
`distill` class stage (crops/s) beside the observer alone (model-only, compiled). One chart per device; the suite's
JSON files of one session (one per device call) are merged step by step. Needs matplotlib (`pip install -e
'.[bench]'`).

Run: python -m rded_fast.benchmarks.plot_gpu_suite A/gpu_suite.json B/gpu_suite.json --out throughput.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rded_fast.benchmarks.gpu_suite import LOADER_CEILING

LOADERS = ("dali-folder", "dali-shards", "tvjpeg-folder", "tvjpeg-shards", "ffcv-beton", "torch-folder")


def merge(paths: list[str | Path]) -> dict:
    """One result from the JSON files of one session: the header of the first, every step's parts merged in order."""
    merged: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not merged:
            merged = {k: v for k, v in data.items() if k != "steps"} | {"steps": {}}
        elif data.get("device") != merged.get("device"):
            raise SystemExit(f"{path}: device {data.get('device')!r}, not {merged.get('device')!r}; one chart per device")
        for step, value in data.get("steps", {}).items():
            merged["steps"].setdefault(step, {}).update(value)
    return merged


def bars(result: dict) -> dict[str, list[tuple[str, float, float | None]]]:
    """(label, rate, ceiling) rows of the two panels: decode img/s vs ceiling; class-stage crops/s vs model-only."""
    steps = result["steps"]
    decode = []
    for name in LOADERS:
        value = steps.get("decode", {}).get(name, {})
        ceiling = steps.get("ceilings", {}).get(LOADER_CEILING[name], {})
        key = "img_per_s" if value.get("img_per_s") and ceiling.get("img_per_s") else "whole_img_per_s"  # steady if both
        if value.get(key):
            decode.append((name, value[key], ceiling.get(key)))
    model = steps.get("model", {}).get("compiled", {}).get("crops_per_s")
    distill = []
    for step in ("e2e", "e2e1k"):
        for name in LOADERS:
            value = steps.get(step, {}).get(name, {})
            if value.get("crops_per_s"):
                classes = f" ({value['classes']} classes)" if value.get("classes") else ""
                distill.append((f"{name}{classes}", value["crops_per_s"], model))
    return {"decode": decode, "distill": distill}


def summary(result: dict) -> str:
    """The session's figures against issue 21's targets, one line each (what a GPU call prints at its end)."""
    steps, lines = result.get("steps", {}), [f"{result.get('device')} ({result.get('created', '')[:10]})"]

    def fraction(a, b):
        return f"{a / b:.2f}" if a and b else "n/a"

    for name in LOADERS:
        value = steps.get("decode", {}).get(name)
        if value and "error" not in value:
            ceiling = steps.get("ceilings", {}).get(LOADER_CEILING[name], {})
            lines.append(
                f"decode {name}: {value.get('img_per_s') or 0:,.0f} img/s steady, {value['whole_img_per_s']:,.0f} whole pass; "
                f"ceiling {ceiling.get('img_per_s') or 0:,.0f} -> {fraction(value.get('img_per_s'), ceiling.get('img_per_s'))}"
                + (" (target >= 0.85)" if name.startswith("dali") else "")
            )
    for step in ("e2e", "e2e1k"):
        for name, value in steps.get(step, {}).items():
            if "error" in value:
                lines.append(f"{step} {name}: ERROR {' '.join(value['error'].split())[:200]}")
                continue
            if "run_seconds" not in value:
                continue
            sec = value["run_seconds"]
            lines.append(
                f"{step} {name} ({value.get('classes')} classes): wall {value['wall_s']:.1f} s (target <= 60 at 1000), class stage "
                f"{value['crops_per_s']:,.0f} crops/s = {fraction(value['crops_per_s'], value.get('model_only_crops_per_s'))} "
                f"of model-only (target >= 0.85); compile {sec.get('compile', 0):.1f} s (<= 10), check {sec.get('check', 0):.1f} s "
                f"(<= 3), outside run {value['outside_run_s']:.1f} s (<= 5), decode_wait {sec.get('decode_wait', 0):.1f} s, "
                f"jpeg_check {sec.get('jpeg_check', 0):.1f} s (waited {sec.get('jpeg_check_wait', 0):.2f})"
            )
    if "tests" in steps:
        lines.append(f"tests: {steps['tests'].get('summary') or steps['tests'].get('error', '')[:300]}")
    return "\n".join(lines)


def draw(result: dict, out: str | Path) -> Path:
    """Write the chart of `result` (a merged suite result) to `out` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"the chart needs matplotlib ({exc}); install it with: pip install -e '.[bench]'") from None
    panels = bars(result)
    titles = {"decode": "decode + crops: loader vs its ceiling (img/s)", "distill": "distill class stage vs model-only (crops/s)"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, (key, rows) in zip(axes, panels.items()):
        if not rows:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(titles[key], fontsize=10)
            continue
        labels = [r[0] for r in rows]
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], [r[2] or 0 for r in rows], height=0.4, color="#cccccc", label="ceiling")
        ax.barh([i - 0.2 for i in y], [r[1] for r in rows], height=0.4, color="#2a6fb0", label="measured")
        for i, (_, rate, ceiling) in enumerate(rows):
            text = f"{rate:,.0f}" + (f"  ({rate / ceiling:.0%} of ceiling)" if ceiling else "")
            ax.text(rate, i - 0.2, " " + text, va="center", fontsize=8)
        ax.set_yticks(list(y), labels)
        ax.invert_yaxis()
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlim(0, 1.45 * max([r[1] for r in rows] + [r[2] or 0 for r in rows] + [1]))
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{result.get('device')}, {result.get('cpu', {}).get('cores')} CPU cores, {result.get('created', '')[:10]}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="gpu_suite.json files of one session (one device)")
    p.add_argument("--out", help="PNG to write (needs matplotlib)")
    p.add_argument("--summary", action="store_true", help="print the figures against the targets")
    args = p.parse_args(argv)
    result = merge(args.json)
    if args.summary or not args.out:
        print(summary(result))
    if args.out:
        print(draw(result, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
