"""When `--compile auto` compiles: always on CUDA; on a CPU only when the run is long enough to repay a cold compile.

torch.compile's first compile of a model in a fresh inductor cache costs tens of seconds on a small CPU, and the
cache is cold on every new machine, container and version of torch. So the rule counts a cold compile: a CPU run
compiles only when its work (crops to score, student samples to train) saves more than a cold compile costs,
measured per kind of work (benchmarks/README.md, "Compile on a CPU"). Below that, eager is faster end to end.
"""

from __future__ import annotations

import torch

from rded_fast.errors import UserError

CHOICES = ("auto", "on", "off")
# Work from which a cold compile repays on a CPU; None: it never did. Measured on a 2-core AMD EPYC with AVX512-BF16
# (bf16) and capped to AVX2 (fp32), 2026-12-07, conv3 at 32 px (benchmarks/README.md, "Compile on a CPU"):
# - distill (crops scored): a cold compile cost 12-18 s more per run and saved 0.20 ms a crop in bf16, 0.42 in
#   fp32: even from 67k and 32k crops; 70k for both. (It was 12k, counted with a warm cache: a 15k-crop
#   Fashion-MNIST distill then took 1.8x the eager wall time on a new machine.)
# - relabel (views the teacher labels): the same forward pass as scoring, so the same count.
# - train (student samples): compiled steps ran at 0.98-1.17x (bf16) and 0.98-1.02x (fp32) of eager, after a
#   20-24 s compile: no run repays it.
MIN_WORK_CPU: dict[str, int | None] = {"distill": 70_000, "relabel": 70_000, "train": None}


def resolve_compile(name: str, device: torch.device | str, work: str, amount: int) -> bool:
    """`--compile NAME` for `amount` units of `work` (a key of MIN_WORK_CPU) on `device`."""
    if name not in CHOICES:
        raise UserError(f"--compile {name}: choose {', '.join(CHOICES)}")
    if name != "auto":
        return name == "on"
    least = MIN_WORK_CPU[work]
    return torch.device(device).type == "cuda" or (least is not None and amount >= least)


def compile_step(fn, device: torch.device | str):
    """`fn` through torch.compile as every compiled step of rded-fast is: shapes fixed (every call pads to its batch),
    CUDA graphs on CUDA."""
    return torch.compile(fn, dynamic=False, mode="reduce-overhead" if torch.device(device).type == "cuda" else None)
