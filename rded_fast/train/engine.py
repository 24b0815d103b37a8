"""The student training loop: one or many students (one per seed) on one resident distilled set, at the speed of
their models.

Each student is exactly what a single run with its seed would train: its own initialisation (the seed set before
it is built), its own augmentation (drawn from the seed per epoch) and its own stream of torch's global random
numbers (dropout), kept apart by swapping the generator's state around its step. What they share: the decoded
set on the device, the label source, the compiled step functions (one compile serves every student: the model is
an argument, not a constant) and, with online labels, the teacher's forward: all the students' batches of a step go
through the teacher as one call. Inside an epoch nothing waits for the host: augmentation parameters and stored
labels arrive once per epoch, losses are summed on the device and read once at its end.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rded_fast.compile_rule import compile_step
from rded_fast.device import autocast
from rded_fast.models import build
from rded_fast.train.augment import Augmenter
from rded_fast.train.labels import LabelSource
from rded_fast.train.recipe import Recipe, kd_loss, make_optimizer
from rded_fast.train.teacher import teacher_logits


@dataclass
class StudentRun:
    """One student and everything its training carries from step to step."""

    seed: int
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    rng: dict[str, torch.Tensor]  # torch's global generator states of this student (dropout draws from them)
    epoch_loss: list[float] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def own_rng(run: StudentRun, device: torch.device) -> Iterator[None]:
    """Run a step of `run` on its own random stream, as if it were the only student of the process."""
    _set_rng_state(run.rng, device)
    try:
        yield
    finally:
        run.rng = _rng_state(device)


def make_run(student: str, num_classes: int, size: int, seed: int, recipe: Recipe, device: torch.device) -> StudentRun:
    """A fresh student for `seed`: built right after seeding torch, as a single run with that seed builds it."""
    torch.manual_seed(seed)
    model = build(student, num_classes, None, size, what="student").model
    model = model.to(device, memory_format=torch.channels_last).train()
    opt, sched = make_optimizer(model, recipe)
    return StudentRun(seed, model, opt, sched, _rng_state(device))


@dataclass
class Steps:
    """The step's functions, eager or compiled: `loss(model, x, target)` (forward in train mode, the recipe's loss),
    `refresh(model, x)` (the reference's extra no-grad train-mode forward), `teacher(x)` -> float32 logits."""

    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    refresh: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    teacher: Callable[[torch.Tensor], torch.Tensor] | None
    compiled: bool


def make_steps(source: LabelSource, compiled: bool) -> Steps:
    """The step functions for `source` (hard labels: cross-entropy; soft: KL at the recipe's temperature), through
    torch.compile when `compiled` (CUDA: with CUDA graphs, shapes fixed)."""
    device, amp, hard, temperature = source.device, source.amp, source.kind == "hard", source.recipe.temperature
    teacher_model = source.teacher

    def loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            logits = model(x)
        return F.cross_entropy(logits.float(), target) if hard else kd_loss(logits, target, temperature)

    def refresh(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, amp):
            return model(x)

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return teacher_logits(teacher_model, x, device, amp)

    if compiled:
        loss, refresh, teacher = (compile_step(f, device) for f in (loss, refresh, teacher))
    return Steps(loss, refresh, teacher if teacher_model is not None else None, compiled)


def batch_shapes(n: int, batch_size: int) -> list[int]:
    """The batch sizes an epoch of `n` samples runs: full batches, then the short last one if any."""
    return sorted({min(batch_size, n), n % batch_size or min(batch_size, n)}, reverse=True)


def warm(steps: Steps, runs: list[StudentRun], source: LabelSource, images: torch.Tensor, bn_refresh: bool) -> float:
    """Compile every step function for every batch shape of an epoch, on a copy of a student (no student, optimizer
    or random stream of the run is touched; the teacher sees all the students' batches at once); returns the
    seconds it took. A no-op for eager steps."""
    if not steps.compiled:
        return 0.0
    t0 = time.perf_counter()
    model = copy.deepcopy(runs[0].model)
    devices = [source.device] if source.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for b in batch_shapes(len(images), source.recipe.batch_size):
            x = torch.zeros((b, 3, source.size, source.size), device=source.device).contiguous(memory_format=torch.channels_last)
            target = torch.full((b, source.num_classes), 1.0 / source.num_classes, device=source.device)
            steps.loss(model, x, target).backward()
            if bn_refresh:
                steps.refresh(model, x)
            if steps.teacher is not None:
                steps.teacher(x.repeat(len(runs), 1, 1, 1))
    if source.device.type == "cuda":
        torch.cuda.synchronize(source.device)
    return time.perf_counter() - t0


def train_step(run: StudentRun, steps: Steps, x: torch.Tensor, target: torch.Tensor, bn_refresh: bool) -> torch.Tensor:
    """One optimisation step of `run` on batch `x`; returns the loss (a device tensor, not read)."""
    loss = steps.loss(run.model, x, target)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    if bn_refresh:  # the reference's logging forward: train mode, so BatchNorm's running statistics move again
        steps.refresh(run.model, x)
    return loss.detach()


def train_epoch(
    runs: list[StudentRun], source: LabelSource, steps: Steps, augmenter: Augmenter, epoch: int, bn_refresh: bool = True
) -> list[float]:
    """One epoch of every student on `augmenter`'s set; returns each one's mean loss (the epoch's one read from the
    device)."""
    device = source.device
    shared = source.shared_views
    plans = [source.epoch(r.seed, epoch, augmenter) for r in (runs[:1] if shared else runs)]
    plans = plans * len(runs) if shared else plans
    totals = [torch.zeros((), device=device) for _ in runs]
    num_batches = plans[0].aug.num_batches
    for b in range(num_batches):
        if shared:
            xs = [augmenter.batch(plans[0].aug, b)] * len(runs)
        else:
            xs = [augmenter.batch(p.aug, b, slot=i) for i, p in enumerate(plans)]
        logits = [None] * len(runs)
        if source.kind == "online":
            logits = steps.teacher(torch.cat(xs) if len(xs) > 1 else xs[0]).split(len(xs[0]))
        for i, run in enumerate(runs):
            target = source.targets(plans[i], b, logits[i])
            with own_rng(run, device):
                totals[i].add_(train_step(run, steps, xs[i], target, bn_refresh))
    return (torch.stack(totals) / num_batches).tolist()
