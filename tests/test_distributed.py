"""Collectives as a CUDA job builds them: a group with a CPU and a GPU backend (gloo stands in for NCCL here)."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from rded_fast.distributed import World, all_ok, backend_for, barrier, killed_ranks
from tests.conftest import free_port


def _rank(rank: int, size: int, port: int, votes: list[bool], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        backend=backend_for("cuda", gpu_backend="gloo"), rank=rank, world_size=size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        world = World(rank=rank, size=size)
        results[rank] = (all_ok(world, True), all_ok(world, votes[rank]))
        barrier(world)
    finally:
        dist.destroy_process_group()


def test_backend_strings():
    assert backend_for("cuda") == "cpu:gloo,cuda:nccl"
    assert backend_for("cpu") == "gloo"


@pytest.mark.parametrize("votes", [[True, True], [True, False]])
def test_all_ok_on_a_two_backend_group(votes):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(2, free_port(), votes, results), nprocs=2, join=True)
    assert dict(results) == {r: (True, all(votes)) for r in range(2)}


def test_each_rank_runs_the_command_with_nproc_1_however_it_was_spelt(monkeypatch):
    """argparse takes `--nproc=8` and a shortened `--npro 8` too: every rank must parse `--nproc 1`, or it launches
    again."""
    import cli
    from rded_fast import distributed

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, argv: launched.append((nproc, argv)) or 0)
    for spelling in (["--nproc=8"], ["--nproc", "8"], ["--npro", "8"]):
        assert cli.main(["distill", "--data", "d", "--observer", "conv3", "--out", "o", *spelling]) == 0
        nproc, argv = launched.pop()
        assert nproc == 8 and cli.build_parser().parse_args(argv).nproc == 1


def test_a_failing_rank_ends_nproc_with_its_error_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rded_fast.cli",
            "distill",
            "--nproc=2",
            "--observer",
            "conv3",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not a directory" in proc.stderr and "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # the real error alone: the other rank says nothing


def test_killed_ranks_names_a_kill_but_not_the_launchers_stop():
    """A rank that failed by itself prints its error; the others the launcher then stops with SIGTERM stay quiet
    (they may not have read the failure yet). A kill nobody explained (SIGKILL: the OOM killer) is always named."""
    assert killed_ranks({0: 2, 1: -15}) == []
    assert killed_ranks({0: 1, 1: -9}) == ["rank 1 was killed by signal 9"]
    assert killed_ranks({0: -15, 1: -15}) == ["rank 0 was killed by signal 15", "rank 1 was killed by signal 15"]
