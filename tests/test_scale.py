"""Scale out and survive: torchrun ranks, kill -9 and resume, write errors, determinism."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rded_fast.distributed import assign_classes
from rded_fast.models import build
from tests.conftest import distill_args, kill_when, output_files, write_synthetic_jpegs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory):
    base = tmp_path_factory.mktemp("many")
    data = write_synthetic_jpegs(base / "data", classes=12, per_class=10, seed=3)
    ckpt = base / "conv3.pth"
    torch.manual_seed(0)
    torch.save({"model": build("conv3", 12, None, 32).model.state_dict()}, ckpt)
    return data, ckpt


@pytest.fixture(scope="module")
def reference_run(many_classes, tmp_path_factory):
    from rded_fast.cli import main

    data, ckpt = many_classes
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(distill_args(data, ckpt, out)) == 0
    return output_files(out)


def test_assign_classes_balances_and_covers():
    parts = assign_classes([300, 300, 10, 300, 5, 300], 2)
    assert sorted(sum(parts, [])) == list(range(6))
    loads = [sum([300, 300, 10, 300, 5, 300][c] for c in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 300


def test_two_gloo_ranks_equal_one_process(many_classes, reference_run, tmp_path):
    data, ckpt = many_classes
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "rded_fast.cli", *distill_args(data, ckpt, out), "--nproc=2"]
    # fp32 CPU scores depend (in their last bits) on the thread count: give the ranks this process's count,
    # not torchrun's default of 1
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = output_files(out)
    assert json.loads((out / "manifest.json").read_text())["run"]["world_size"] == 2
    assert set(got) == set(reference_run)
    assert all(got[k] == reference_run[k] for k in got), [k for k in got if got[k] != reference_run[k]]


@pytest.mark.parametrize("after_classes", [1, 4, 8])
def test_kill_9_then_resume_gives_identical_output(many_classes, reference_run, tmp_path, after_classes):
    data, ckpt = many_classes
    out = tmp_path / "killed"
    journal = out / ".rded-journal"
    code = kill_when(
        [sys.executable, "-m", "rded_fast.cli", *distill_args(data, ckpt, out)],
        lambda: journal.is_dir() and len(list(journal.glob("class_*.json"))) >= after_classes,
        ROOT,
    )
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "manifest.json").exists()
    from rded_fast.cli import main

    assert main(distill_args(data, ckpt, out, "--resume")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["resumed_classes"] >= after_classes
    got = output_files(out)
    assert set(got) == set(reference_run)
    assert all(got[k] == reference_run[k] for k in got)


def test_write_error_fails_cleanly_and_resumes(many_classes, reference_run, tmp_path, monkeypatch, capsys):
    import errno

    import rded_fast.write as write
    from rded_fast.cli import main

    data, ckpt = many_classes
    out = tmp_path / "full"
    real = write.atomic_write_many
    calls = {"n": 0}

    def failing(items):
        calls["n"] += len(items)
        if calls["n"] > 9:  # the disk "fills up" in the middle of the fifth class
            raise OSError(errno.ENOSPC, "No space left on device", str(items[-1][0]))
        real(items)

    monkeypatch.setattr(write, "atomic_write_many", failing)
    assert main(distill_args(data, ckpt, out)) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    done = list((out / ".rded-journal").glob("class_*.json"))
    assert 1 <= len(done) <= 4  # classes committed together with the failing one are not journaled either
    for record in done:  # every journaled class is complete on disk
        assert all((out / m["file"]).is_file() for m in json.loads(record.read_text())["images"])
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(write, "atomic_write_many", real)
    assert main(distill_args(data, ckpt, out, "--resume")) == 0
    got = output_files(out)
    assert all(got[k] == reference_run[k] for k in reference_run) and set(got) == set(reference_run)


def test_resume_refuses_changed_parameters(many_classes, tmp_path, capsys):
    from rded_fast.cli import main

    data, ckpt = many_classes
    out = tmp_path / "o"
    assert main(distill_args(data, ckpt, out)) == 0
    assert main(distill_args(data, ckpt, out, "--resume", "--seed", "1")) == 2
    assert "seed was 0 in the interrupted run, now 1" in capsys.readouterr().err
