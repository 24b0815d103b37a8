"""Why a selection trains better or worse students: what the chosen images are, seen through the observer.

For each factor-1 distilled set of a quality work folder (RDED, rded-cover, random-images, random-crops; every IPC
and seed there), with the observer that chose them (any architecture with a Linear head), on the real test split:
- `confidence`: the observer's mean probability of each image's own class (RDED keeps the crops it finds most
  typical, so this is high by design);
- `nearest_top1`: each test image takes the class of its nearest distilled image in the observer's feature
  space (cosine): how well the set covers the class as it is met at test time, without training anything;
- `test_to_set`: the mean cosine distance from a test image to the nearest distilled image of its own class;
- `spread`: the mean cosine distance between two distilled images of one class (how varied a class's images are).

Run: python -m rded_fast.benchmarks.selection_diagnostic --work W --json benchmarks/results/NAME.json
     [--dataset mnist5k] [--observer-arch resnet18_modified]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from rded_fast.benchmarks.quality import DATASETS
from rded_fast.device import cpu_description
from rded_fast.fileio import atomic_write_text
from rded_fast.formats.folder import build_index
from rded_fast.models import build
from rded_fast.models.heads import split_head
from rded_fast.score import normalize_uint8
from rded_fast.train.distilled_set import load_distilled
from rded_fast.train.memory_dataset import load_tensor_dataset

MEASURES = ("confidence", "nearest_top1", "test_to_set", "spread")
SET_NAME = re.compile(r"^(?P<row>[a-z-]+)_ipc(?P<ipc>\d+)_seed(?P<seed>\d+)$")


def features(model: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised inputs of the Linear head, softmax outputs) of an observer for uint8 images."""
    body, head = split_head(model.eval())
    feats, probs = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            f = body(normalize_uint8(images[i : i + batch]))
            feats.append(f.flatten(1))
            probs.append(torch.softmax(head(f), 1))
    return F.normalize(torch.cat(feats), dim=1), torch.cat(probs)


def diagnose(set_x: torch.Tensor, set_y: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], model) -> dict:
    """The three measures above for one distilled set (images uint8 [N, 3, S, S], labels [N])."""
    test_feat, test_y = test
    feat, probs = features(model, set_x)
    sim = test_feat @ feat.T  # [T, N] cosine similarity
    nearest = set_y[sim.argmax(1)]
    own = torch.where(set_y[None, :] == test_y[:, None], sim, torch.full_like(sim, -2.0)).amax(1)
    return {
        "confidence": float(probs.gather(1, set_y[:, None]).mean()),
        "nearest_top1": float((nearest == test_y).float().mean()),
        "test_to_set": float((1 - own).mean()),
        "spread": _spread(feat, set_y),
    }


def _spread(feat: torch.Tensor, labels: torch.Tensor) -> float | None:
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
    return float((1 - feat @ feat.T)[same].mean()) if same.any() else None


def run(work: Path, observer: Path, test_dir: Path, arch: str = "conv3") -> dict:
    model = build(arch, 10, str(observer), 32).model.eval()
    vindex = build_index(str(test_dir), show_progress=False)
    test_x, test_y = load_tensor_dataset(vindex, 32, resize_to=36, show_progress=False)
    test = (features(model, test_x)[0], test_y)
    rows: dict = {}
    for folder in sorted(p for p in work.iterdir() if p.is_dir() and SET_NAME.match(p.name)):
        m = SET_NAME.match(folder.name)
        if not (folder / "manifest.json").is_file():  # a set still being distilled (the benchmark runs beside)
            print(f"left out {folder.name}: not finished (no manifest.json)")
            continue
        data = load_distilled(folder)
        rows.setdefault(m["row"], {}).setdefault(m["ipc"], []).append(
            {"seed": int(m["seed"]), **diagnose(data.images, data.labels, test, model)}
        )
    summary = {
        row: {
            ipc: {k: statistics.fmean(r[k] for r in runs) for k in MEASURES if all(r[k] is not None for r in runs)}
            for ipc, runs in by_ipc.items()
        }
        for row, by_ipc in rows.items()
    }
    return {
        "benchmark": "selection_diagnostic",
        "mean": summary,
        "runs": rows,
        "observer": str(observer),
        "observer_arch": arch,
        "cpu": cpu_description(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a quality benchmark's working folder (its factor-1 sets are read)")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    p.add_argument("--observer-arch", default="conv3")
    p.add_argument("--observer", help="default: WORK/observer_<arch>_full.pth")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    work = Path(args.work)
    _, test_dir = DATASETS[args.dataset](show_progress=False)
    observer = Path(args.observer) if args.observer else work / f"observer_{args.observer_arch}_full.pth"
    result = run(work, observer, test_dir, args.observer_arch)
    for row, by_ipc in result["mean"].items():
        for ipc, m in sorted(by_ipc.items(), key=lambda kv: int(kv[0])):
            print(f"{row:<14} IPC {ipc:>3}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
