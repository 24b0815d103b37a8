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
# Work from which a cold compile repays on a CPU (a 2-core AMD EPYC, AVX2 and AVX512-BF16 alike; see above).
MIN_WORK_CPU = {
    "distill": 12_000,  # crops scored
    "train": 2_000_000,  # student samples trained, over all seeds
    "relabel": 2_000_000,  # augmented views labelled
}


def resolve_compile(name: str, device: torch.device | str, work: str, amount: int) -> bool:
    """`--compile NAME` for `amount` units of `work` (a key of MIN_WORK_CPU) on `device`."""
    if name not in CHOICES:
        raise UserError(f"--compile {name}: choose {', '.join(CHOICES)}")
    if name != "auto":
        return name == "on"
    return torch.device(device).type == "cuda" or amount >= MIN_WORK_CPU[work]
