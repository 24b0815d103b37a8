"""DALI shards and loader under issue 7's rules: truncation, kill -9 during convert, determinism."""

import signal
import sys
from pathlib import Path

import pytest
import torch

from rded_fast.cli import main
from rded_fast.converters import convert
from rded_fast.errors import UserError
from rded_fast.loaders import open_source
from rded_fast.models import build
from tests.conftest import kill_when, write_synthetic_jpegs

ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _complete_shards(folder: Path) -> int:
    """Shards whose record says they are complete (a shard's record is written first, planned, then complete)."""
    import json

    return sum(json.loads(p.read_text()).get("tar_bytes") is not None for p in folder.glob("*.meta.json"))


def test_truncated_shard_is_a_clear_error(jpeg_tree, tmp_path):
    out = tmp_path / "shards"
    convert("dali", str(jpeg_tree), str(out), shard_size="20KB", show_progress=False)
    tar = sorted(out.glob("*.tar"))[1]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"{tar.name}.*truncated or changed.*rerun the convert"):
        open_source("dali", str(out))


def test_kill_9_during_convert_then_rerun_gives_identical_shards(tmp_path):
    data = write_synthetic_jpegs(tmp_path / "data", classes=4, per_class=40, seed=5)
    reference = tmp_path / "reference"
    convert("dali", str(data), str(reference), shard_size="30KB", show_progress=False)
    want = _files(reference)
    assert len([k for k in want if k.endswith(".tar")]) >= 6
    for after in (1, 3):
        out = tmp_path / f"killed{after}"
        cmd = [
            sys.executable,
            "-m",
            "rded_fast.cli",
            "convert",
            "--format",
            "dali",
            "--data",
            str(data),
            "--out",
            str(out),
            "--shard-size",
            "30KB",
            "--quiet",
            "--workers",
            "1",
        ]
        code = kill_when(cmd, lambda out=out, after=after: out.is_dir() and _complete_shards(out) >= after, ROOT)
        assert code == -signal.SIGKILL, "convert finished before it could be killed"
        assert not (out / "dataset.json").exists()
        summary = convert("dali", str(data), str(out), shard_size="30KB", show_progress=False)
        assert summary["reused_shards"] >= after
        got = {k: v for k, v in _files(out).items() if not k.startswith(".")}
        assert set(got) == set(want) and all(got[k] == want[k] for k in want)


def test_dali_distill_is_deterministic(jpeg_tree, tmp_path):
    ckpt = tmp_path / "c.pth"
    torch.manual_seed(0)
    torch.save(build("conv3", 3, None, 32).model.state_dict(), ckpt)
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert (
            main(
                [
                    "distill",
                    "--data",
                    str(jpeg_tree),
                    "--loader",
                    "dali",
                    "--observer",
                    "conv3",
                    "--weights",
                    str(ckpt),
                    "--out",
                    str(out),
                    "--input-size",
                    "32",
                    "--factor",
                    "2",
                    "--ipc",
                    "1",
                    "--mipc",
                    "8",
                    "--num-crop",
                    "3",
                    "--workers",
                    "1",
                    "--device",
                    "cpu",
                    "--skip-observer-check",
                    "--quiet",
                ]
            )
            == 0
        )
        outs.append({k: v for k, v in _files(out).items() if k != "manifest.json"})
    assert outs[0] == outs[1] and any(k.endswith(".png") for k in outs[0])
