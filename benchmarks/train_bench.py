"""`rded-fast bench --stage train`: the student side's throughput against its ceiling, measured in one run.

`engine`: the epoch loop `evaluate` runs (rded_fast.train.engine: per-epoch parameters to the device, batched
ShufflePatches / crop / flip / CutMix, targets, the teacher's forward for all students at once, each student's
step and BN refresh, one read of the losses per epoch), in student samples per second over the loop alone.
`model_only`: the same students' steps on resident tensors of the same shapes, with the same compiled (or eager)
step functions: the teacher's forward, the student's forward, backward and AdamW step, the BN refresh, and the
same soft targets or hard labels; nothing else. `fraction_of_model_only` is their ratio; compile seconds are
apart. The distilled set is real (`--distilled`) or synthetic (random pixels: throughput only) at a given shape,
so the ImageNet-1K-shaped row needs no data. A tiny student that exposes the engine's own cost per sample is
`rded_fast.benchmarks.train_bench:linear_32px`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from rded_fast import heap
from rded_fast.compile_rule import resolve_compile
from rded_fast.device import TRAIN_AMP_CHOICES, amp_name, cpu_description, device_name, resolve_amp, resolve_device
from rded_fast.fileio import atomic_write_text
from rded_fast.train.augment import Augmenter
from rded_fast.train.distilled_set import DistilledSet, load_distilled
from rded_fast.train.engine import Steps, StudentRun, make_run, make_steps, train_epoch, train_step, warm
from rded_fast.train.labels import LabelSource
from rded_fast.train.recipe import Recipe, rded_batch_size
from rded_fast.train.teacher import build_teacher


def linear_32px(num_classes: int) -> nn.Module:
    """A linear student on 32 px images: almost no model, so its loop shows the engine's own cost per sample."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


@dataclass
class TrainBenchConfig:
    """What to train and how (the same knobs as `evaluate`); `distilled` None: a synthetic set of `classes` x `ipc`
    images of `size` px stitched at `factor`."""

    student: str = "conv3"
    teacher: str | None = "conv3"  # None: hard labels (no teacher)
    teacher_weights: str | None = None
    distilled: str | None = None
    classes: int = 10
    ipc: int = 10
    size: int = 32
    factor: int = 2
    batch_size: int | None = None
    epochs: int = 5
    seeds: int = 1
    device: str = "auto"
    amp: str = "auto"
    compile: str = "auto"
    bn_refresh: bool = True


def synthetic_set(classes: int, ipc: int, size: int, factor: int) -> DistilledSet:
    """`classes` x `ipc` random uint8 images (seeded): the shapes of a distilled set, for throughput only."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * ipc, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(classes * ipc) // ipc
    names = [f"class{c:05d}" for c in range(classes)]
    files = [f"{names[c]}/{i}.png" for i, c in enumerate(labels.tolist())]
    return DistilledSet(Path("synthetic"), images, labels, files, names, factor, ipc, None)


def _source(cfg: TrainBenchConfig, data: DistilledSet, device: torch.device) -> LabelSource:
    batch = cfg.batch_size or rded_batch_size(data.ipc, len(data.classes), cfg.student)
    recipe = Recipe(epochs=cfg.epochs, batch_size=min(batch, len(data.labels)), lr=1e-3)
    amp = resolve_amp(cfg.amp, device, TRAIN_AMP_CHOICES)
    size = int(data.images.shape[-1])
    base = dict(
        num_classes=len(data.classes), size=size, factor=data.factor, labels=data.labels.to(device), device=device, amp=amp
    )
    if cfg.teacher is None:
        return LabelSource("hard", recipe, **base)
    teacher, _ = build_teacher(cfg.teacher, cfg.teacher_weights, data.classes, size, data.manifest, device)
    return LabelSource("online", recipe, **base, teacher=teacher)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_loop(runs: list[StudentRun], source: LabelSource, steps: Steps, images: torch.Tensor, cfg: TrainBenchConfig) -> float:
    """Seconds of `cfg.epochs` epochs of `evaluate`'s loop (each epoch ends reading its losses, as there)."""
    augmenter = Augmenter(images, source.factor)
    train_epoch(runs, source, steps, augmenter, 0, cfg.bn_refresh)  # first-call costs (allocations, kernels) out
    _sync(source.device)
    t = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        train_epoch(runs, source, steps, augmenter, epoch, cfg.bn_refresh)
    return time.perf_counter() - t


def model_only_loop(runs: list[StudentRun], source: LabelSource, steps: Steps, n: int, cfg: TrainBenchConfig) -> float:
    """Seconds of the same number of steps on resident tensors: teacher forward, student steps, BN refresh."""
    device, b = source.device, source.recipe.batch_size
    generator = torch.Generator().manual_seed(1)
    batches = [(min(b, n - i)) for i in range(0, n, b)]
    x = torch.randn((b, 3, source.size, source.size), generator=generator).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    hard = torch.nn.functional.one_hot(torch.arange(b) % source.num_classes, source.num_classes).float().to(device)

    def epoch() -> None:
        totals = torch.zeros(len(runs), device=device)
        for m in batches:
            xm = x[:m]
            logits = steps.teacher(torch.cat([xm] * len(runs)) if len(runs) > 1 else xm) if steps.teacher else None
            for i, run in enumerate(runs):
                if logits is None:
                    target = hard[:m]
                else:
                    target = torch.softmax(logits[i * m : (i + 1) * m] / source.recipe.temperature, dim=1)
                totals[i] += train_step(run, steps, xm, target, cfg.bn_refresh)
        totals.tolist()

    epoch()
    _sync(device)
    t = time.perf_counter()
    for _ in range(cfg.epochs):
        epoch()
    return time.perf_counter() - t


def run_train_bench(cfg: TrainBenchConfig) -> dict:
    """Engine and model-only loops of the same students, one after the other in this process."""
    device = resolve_device(cfg.device)
    data = load_distilled(cfg.distilled) if cfg.distilled else synthetic_set(cfg.classes, cfg.ipc, cfg.size, cfg.factor)
    source = _source(cfg, data, device)
    n, size = len(data.labels), int(data.images.shape[-1])
    samples = cfg.epochs * n * cfg.seeds
    compiled = resolve_compile(cfg.compile, device, "train", samples)
    steps = make_steps(source, compiled)
    images = data.images.to(device)
    new_runs = lambda: [make_run(cfg.student, len(data.classes), size, s, source.recipe, device) for s in range(cfg.seeds)]
    runs = new_runs()
    compile_seconds = warm(steps, runs, source, images, cfg.bn_refresh)
    with heap.frozen():  # as evaluate trains
        engine_s = engine_loop(runs, source, steps, images, cfg)
        model_s = model_only_loop(new_runs(), source, steps, n, cfg)
    return {
        "stage": "train",
        "device": device_name(device),
        "cpu": cpu_description(),
        "date": time.strftime("%Y-%m-%d"),
        "config": asdict(cfg),
        "images": n,
        "batch_size": source.recipe.batch_size,
        "labels": source.kind,
        "resolved_amp": amp_name(source.amp),
        "compiled": compiled,
        "compile_seconds": compile_seconds,
        "engine": {"samples": samples, "seconds": engine_s, "img_per_s": samples / engine_s},
        "model_only": {"samples": samples, "seconds": model_s, "img_per_s": samples / model_s},
        "fraction_of_model_only": model_s / engine_s,
    }


def _on_off(text: str) -> bool:
    return text.lower() in ("1", "on", "true", "yes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(TrainBenchConfig):
        kind = {"bool": _on_off, "int": int, "int | None": int}.get(str(f.type), str)
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, type=kind)
    p.add_argument("--json", help="write the result here")
    args = vars(p.parse_args(argv))
    out = args.pop("json")
    if args["teacher"] in ("", "none"):
        args["teacher"] = None
    result = run_train_bench(TrainBenchConfig(**args))
    print(
        f"train: engine {result['engine']['img_per_s']:,.0f} img/s, model-only {result['model_only']['img_per_s']:,.0f} "
        f"img/s: {result['fraction_of_model_only']:.3f} of model-only ({result['labels']} labels, {result['resolved_amp']}, "
        f"compiled {result['compiled']}, {result['device']})"
    )
    if out:
        atomic_write_text(out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
