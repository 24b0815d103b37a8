"""Many processes through torchrun: each rank distills its own classes; rank 0 merges.

Classes are split by a deterministic greedy balance of their planned image counts. The plan is per
class and scoring is chunked per class, so any split gives the same bytes as one process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device_type: str) -> World:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if device_type == "cuda":  # each rank decodes and scores on its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def all_ok(world: World, ok: bool) -> bool:
    """True only if every rank says ok (so one rank's failure stops all of them cleanly)."""
    if world.size <= 1:
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag) == 0


def assign_classes(counts: np.ndarray, world_size: int) -> list[list[int]]:
    """Split class indices over ranks, balancing planned images (largest first to the lightest rank)."""
    loads = [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for label in sorted(range(len(counts)), key=lambda c: (-int(counts[c]), c)):
        r = min(range(world_size), key=lambda i: (loads[i], i))
        parts[r].append(label)
        loads[r] += int(counts[label])
    return [sorted(p) for p in parts]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `rded-fast <argv>` under torchrun with `nproc` processes on this node; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "cli", *argv]
    return subprocess.call(cmd)
