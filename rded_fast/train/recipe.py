"""RDED's student recipe as data: every constant of RDED.md section 3 named in one place.

AdamW (betas 0.9/0.999), weight decay on >= 2-D weights only, a per-epoch half-cosine LR multiplier,
KL at temperature T without the T^2 factor, CutMix Beta(1, 1), RDED's batch-size rule, and the
evaluation schedule (every 10 epochs in the last 20 %, plus the final epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# How the augmentation is applied (rded_fast.train.augment). Stored soft labels record it and are replayed only by
# the same version. 1: per-sample torchvision crops (0.2.x); 2: one batched pass, equal to version 1 to float
# rounding (0.3.0).
RECIPE_VERSION = 2
ADAMW_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 0.01
CUTMIX_BETA = 1.0
TEMPERATURE = 20.0


@dataclass(frozen=True)
class Recipe:
    """The resolved hyper-parameters of one student run."""

    epochs: int
    batch_size: int
    lr: float
    temperature: float = TEMPERATURE
    weight_decay: float = WEIGHT_DECAY
    cutmix_beta: float = CUTMIX_BETA


def rded_batch_size(ipc: int, num_classes: int, student: str = "") -> int:
    """RDED's rule: 10/50/100 for IPC 1/10/50 (others: 5*ipc within [10, 100]), doubled for 100+ classes,
    100 for Tiny-ImageNet (200 classes), 25 for CIFAR-100 with conv3; capped at ipc * num_classes."""
    base = {1: 10, 10: 50, 50: 100}.get(ipc, min(100, max(10, 5 * ipc)))
    if num_classes == 100 and student == "conv3":
        base = 25
    elif num_classes == 200:
        base = 100
    elif num_classes >= 100:
        base *= 2
    return max(1, min(base, ipc * num_classes))


def rded_lr(num_classes: int, student: str = "") -> float:
    """1e-3, or 2e-3 for CIFAR-100 (100 classes) with conv3."""
    return 2e-3 if (num_classes == 100 and student == "conv3") else 1e-3


def lr_multiplier(epoch: int, epochs: int) -> float:
    """0.5 * (1 + cos(pi * epoch / (2 * epochs))): a half cosine that ends near 0.5, not 0."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs / 2)) if epoch <= epochs else 0.0


def evaluates_at(epoch: int, epochs: int) -> bool:
    """The reference evaluates every 10th epoch after 80 % of training, and at the end."""
    return (epoch % 10 == 9 or epoch == epochs - 1) and epoch > epochs * 0.8


def param_groups(model: nn.Module, weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    """Weight decay on parameters named *weight* with >= 2 dims; none on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if "weight" in name and p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, recipe: Recipe) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=ADAMW_BETAS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: lr_multiplier(epoch, recipe.epochs))
    return opt, sched


def kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T: sum over classes, mean over the batch, no T^2 factor."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, teacher_probs, reduction="batchmean")
