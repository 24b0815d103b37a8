"""Train an observer (or any registry model) on a small ImageFolder, held in memory.

Standard recipe: random crop with padding size/8 and horizontal flip, ImageNet normalisation (the
same the scorer uses), SGD with Nesterov momentum (or AdamW), cosine schedule to zero, cross-entropy.
Saves {"model": state_dict, ...} atomically, the format `--weights` reads; the per-epoch training state
beside it (`OUT.state`) lets `--resume` continue an interrupted run; it is removed when training completes.
An existing `OUT` is replaced only when it is a checkpoint of ours and `overwrite` is given (a trained
checkpoint can cost hours; rded_fast.outputs), never another file.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rded_fast.device import TRAIN_AMP_CHOICES, autocast, resolve_amp, resolve_device
from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_bytes
from rded_fast.formats.folder import build_index
from rded_fast.models import build, check_input_size
from rded_fast.outputs import CHECKPOINT, check_separate, claim_output
from rded_fast.progress import progress
from rded_fast.score import normalize_uint8
from rded_fast.train import checkpoint
from rded_fast.train.memory_dataset import load_tensor_dataset
from rded_fast.train.metrics import topk_accuracy
from rded_fast.train.validate import validate_observer_config


@dataclass
class ObserverConfig:
    data: str
    out: str
    arch: str = "conv3"
    input_size: int = 32
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float | None = None
    seed: int = 0
    device: str = "auto"
    val: str | None = None
    per_class: int | None = None
    amp: str = "auto"  # autocast: auto (bf16 on CUDA and native-bf16 CPUs), none (fp32), bf16
    resume: bool = False
    overwrite: bool = False  # replace an earlier checkpoint of ours at `out`
    show_progress: bool = True


def state_path(out: str) -> str:
    """`OUT.state`: the per-epoch state kept beside the checkpoint `out` while training runs (for `--resume`)."""
    return f"{out}.state"


def augment(images: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop with zero padding `pad` and horizontal flip, per sample; uint8 [B, 3, S, S] in and out."""
    b, _, s, _ = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(b):
        crop = padded[i, :, dy[i] : dy[i] + s, dx[i] : dx[i] + s]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def train_observer(cfg: ObserverConfig) -> dict:
    """Train `cfg.arch` on `cfg.data`; returns a summary (accuracies, seconds, checkpoint path, what it replaced)."""
    cfg = validate_observer_config(cfg)  # types and ranges, as the command line checks them
    check_input_size(cfg.arch, cfg.input_size)
    inputs = {"--data": cfg.data, "--val": cfg.val}
    check_separate(state_path(cfg.out), "--out (its OUT.state)", inputs, "file")
    if cfg.resume and not Path(state_path(cfg.out)).is_file():
        raise UserError(
            f"--resume: no {cfg.out}.state beside --out {cfg.out} (the per-epoch state of an interrupted run); "
            "run without --resume to train from the start"
        )
    replaced = []
    with claim_output(
        cfg.out,
        "--out",
        inputs,
        CHECKPOINT,
        overwrite=cfg.overwrite,
        replace_hint="pass --overwrite to replace it (training it again may take as long)",
        any_flag=None,
        on_replace=replaced.append,
    ):
        summary = _train_observer(cfg)
    return {**summary, "replaced": str(replaced[0]) if replaced else None}


def _load_data(cfg: ObserverConfig):
    """The training images (all, or `per_class` of each class by the plan's seeded sampler), its index, and
    the validation images when `cfg.val` is given; uint8 tensors in memory."""
    index = build_index(cfg.data, show_progress=cfg.show_progress)
    if cfg.per_class is not None:
        from rded_fast.plan import make_plan

        keep = make_plan(index, cfg.seed, cfg.per_class, 1).image_ids
        index.paths = [index.paths[i] for i in keep]
        index.labels, index.sizes, index.stamps = index.labels[keep], index.sizes[keep], index.stamps[keep]
    train = load_tensor_dataset(index, cfg.input_size, show_progress=cfg.show_progress, desc="load train")
    val = None
    if cfg.val:
        vindex = build_index(
            cfg.val, class_map=index.classes, show_progress=cfg.show_progress, flag="--val", classes_from="--data"
        )
        val = load_tensor_dataset(vindex, cfg.input_size, show_progress=cfg.show_progress, desc="load val")
    return index, train, val


def _optimizer(cfg: ObserverConfig, model: torch.nn.Module, total_steps: int):
    """SGD with Nesterov momentum (or AdamW) and a per-step cosine schedule to zero."""
    lr = cfg.lr if cfg.lr is not None else (0.05 if cfg.optimizer == "sgd" else 1e-3)
    wd = cfg.weight_decay if cfg.weight_decay is not None else (5e-4 if cfg.optimizer == "sgd" else 0.01)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    return opt, sched


def train_one_epoch(
    model: torch.nn.Module,
    opt,
    sched,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    on_step=lambda: None,
    amp: torch.dtype | None = None,
) -> float:
    """One pass over the data in a seeded order, augmented; returns the mean training loss."""
    model.train()
    pad = max(1, images.shape[-1] // 8)
    order = torch.randperm(len(images), generator=generator)
    steps = math.ceil(len(images) / batch_size)
    running = 0.0
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        x = normalize_uint8(augment(images[idx], generator, pad).to(device)).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        on_step()
    return running / steps


def _save(cfg: ObserverConfig, model: torch.nn.Module, classes: list[str], val_acc: float | None) -> None:
    """The checkpoint `--weights` reads, written atomically; then the resume state is no longer needed."""
    buf = io.BytesIO()
    torch.save(
        {
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "arch": cfg.arch,
            "input_size": cfg.input_size,
            "classes": classes,
            "val_accuracy": val_acc,
        },
        buf,
    )
    atomic_write_bytes(cfg.out, buf.getvalue())
    Path(state_path(cfg.out)).unlink(missing_ok=True)  # training is complete: nothing left to resume


def _train_observer(cfg: ObserverConfig) -> dict:
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device, TRAIN_AMP_CHOICES)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    index, (images, labels), val = _load_data(cfg)
    model = build(cfg.arch, index.num_classes, None, cfg.input_size).model.to(device, memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(images) / cfg.batch_size)
    opt, sched = _optimizer(cfg, model, cfg.epochs * steps_per_epoch)
    losses: list[float] = []
    state_file = state_path(cfg.out)
    first = 0
    if cfg.resume and (state := checkpoint.load_state(state_file)) is not None:
        first = checkpoint.restore(state, model, opt, sched, generator)
        losses = state["losses"]
    bar = iter(
        progress(
            range(cfg.epochs * steps_per_epoch),
            total=cfg.epochs * steps_per_epoch,
            initial=first * steps_per_epoch,
            desc=f"train {cfg.arch}",
            disable=not cfg.show_progress,
        )
    )
    for epoch in range(first, cfg.epochs):
        losses.append(
            train_one_epoch(model, opt, sched, images, labels, cfg.batch_size, generator, device, lambda: next(bar, None), amp)
        )
        checkpoint.save_state(state_file, checkpoint.capture(model, opt, sched, generator, epoch, losses=losses))
    train_acc = topk_accuracy(model, images, labels, device, amp=amp)[0]
    val_acc = topk_accuracy(model, *val, device, amp=amp)[0] if val is not None else None
    _save(cfg, model, index.classes, val_acc)
    return {
        "config": asdict(cfg),
        "classes": index.classes,
        "train_images": len(images),
        "epoch_loss": losses,
        "train_accuracy": train_acc,
        "val_accuracy": val_acc,
        "seconds": time.perf_counter() - t0,
        "checkpoint": cfg.out,
    }
