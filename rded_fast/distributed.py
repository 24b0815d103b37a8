"""Many processes through torchrun: each rank distills its own classes; rank 0 merges.

Classes are split by a deterministic greedy balance of their planned image counts. The plan is per
class and scoring is chunked per class, so any split gives the same bytes as one process.
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rded_fast.errors import PeerFailed


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Rank 0 indexes, builds and checks the observer before the first collective; on ImageNet-1K that can
# take minutes, longer than torch's default collective timeout (10 minutes for NCCL).
DEFAULT_TIMEOUT_S = 3 * 3600


def backend_for(device_type: str, gpu_backend: str = "nccl") -> str:
    """The process-group backend string: on CUDA a group with both a CPU and a GPU backend, so that the
    small CPU flags of `all_ok` go through gloo while any GPU tensors go through `gpu_backend`."""
    return f"cpu:gloo,cuda:{gpu_backend}" if device_type == "cuda" else "gloo"


def init_world(device_type: str) -> World:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, ...); a single process otherwise.

    The collective timeout is RDED_FAST_DIST_TIMEOUT seconds (default 3 hours)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":  # each rank decodes and scores on its own GPU
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("RDED_FAST_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend=backend_for(device_type), timeout=timeout)
        atexit.register(_leave_world)  # a group left alive at exit can abort the process (gloo's threads)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)


def _leave_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (through the CPU backend, like `all_ok`)."""
    all_ok(world, True)


def all_ok(world: World, ok: bool) -> bool:
    """True only if every rank says ok (so one rank's failure stops all of them cleanly). The flag is a CPU
    tensor: on CUDA the group's gloo backend carries it (see `backend_for`)."""
    if world.size <= 1:
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(flag) == 0


def collective(world: World, fn, message: str):
    """Run fn() (None on failure); if any rank failed, every rank stops: the failing one with its error, the others
    with PeerFailed(`message`), which the command does not print (the failing rank prints the real error)."""
    error, value = None, None
    try:
        value = fn()
    except BaseException as exc:
        error = exc
    if not all_ok(world, error is None):
        if error is not None:
            raise error
        raise PeerFailed(message)
    return value


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
    """Run `rded-fast <argv>` in `nproc` processes on this node (torchrun's standalone launcher); returns its exit code.

    Each failing rank prints its own error (ranks stopped by another's failure print nothing); a failed rank ends the
    run with its exit code, not with the launcher's traceback.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "rded_fast.cli", *argv)
    except ChildFailedError as failed:
        codes = {rank: f.exitcode for rank, f in failed.failures.items()}
        for line in killed_ranks(codes):
            print(f"rded-fast: {line}", file=sys.stderr)
        return max([code for code in codes.values() if code > 0], default=1)
    return 0


def killed_ranks(exit_codes: dict[int, int]) -> list[str]:
    """A line for each rank a signal ended (a negative exit code), which printed nothing itself; not for the ranks
    the launcher stops with SIGTERM as soon as another fails, often before they read that failure themselves:
    there the failing rank's own error (a positive code) says it all."""
    own_error = any(code > 0 for code in exit_codes.values())
    return [
        f"rank {rank} was killed by signal {-code}"
        for rank, code in sorted(exit_codes.items())
        if code < 0 and not (own_error and -code == signal.SIGTERM)
    ]
