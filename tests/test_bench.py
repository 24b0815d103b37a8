"""`rded-fast bench` on a tiny tree: every stage runs on CPU and the JSON has every field."""

import json

import torch

from rded_fast.cli import main
from rded_fast.models import build


def test_bench_all_stages_with_reference_writes_json(jpeg_tree, tmp_path, capsys):
    ckpt = tmp_path / "conv3.pth"
    torch.save(build("conv3", 3, None, 32).model.state_dict(), ckpt)
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--data",
            str(jpeg_tree),
            "--observer",
            "conv3",
            "--weights",
            str(ckpt),
            "--input-size",
            "32",
            "--factor",
            "2",
            "--ipc",
            "1",
            "--mipc",
            "6",
            "--num-crop",
            "2",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--model-crops",
            "64",
            "--reference",
            "--host-classes",
            "3",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["planned_images"] == 18 and result["planned_crops"] == 36
    assert result["decode"]["images"] == 18 and result["decode"]["img_per_s"] > 0
    for stage in ("score", "model", "e2e"):
        assert result[stage]["crops_per_s"] > 0
    assert 0 < result["e2e"]["fraction_of_model_only"]
    assert result["reference"]["images"] == 3 and result["speedup"] > 0
    assert result["peak_memory"]["host_mib"] > 0 and result["device"].startswith("cpu")
    assert result["cpu"]["cores"] >= 1 and "avx512_bf16" in result["cpu"]["flags"]
    assert "compile" in result["e2e"]["stage_seconds"] and result["score"]["compile_seconds"] >= 0
    host = {row["format"]: row for row in result["host"]}
    assert set(host) == {"png", "jpg"} and host["png"]["input_size"] == 224 and host["png"]["ipc"] == 10
    assert 0 <= host["jpg"]["critical_path_ms"] < host["jpg"]["serial_ms"]
    assert "speedup" in capsys.readouterr().out


def test_fixed_costs_bench_runs_two_clis_in_turn(fashion_tree, tmp_path):
    """benchmarks/fixed_costs.py on a small tree: each --cli runs, in turn, and the JSON has what the README quotes."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "fixed.json"
    cli = str(root / "cli.py")
    (tmp_path / "w" / "out").mkdir(parents=True)  # a folder of the user's where the runs happen: left alone
    (tmp_path / "w" / "out" / "keep.txt").write_text("mine")
    subprocess.run(
        [sys.executable, "-m", "rded_fast.benchmarks.fixed_costs", "--data", str(fashion_tree), "--work", str(tmp_path / "w"),
         "--runs", "1", "--cli", cli, "--cli", cli, "--json", str(out)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    assert (tmp_path / "w" / "out" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["out"]  # each run's scratch is gone
    result = json.loads(out.read_text())
    (rows,) = result["runs"].values()  # the same cli twice: one key, two runs
    assert len(rows) == 2
    for row in rows:
        assert row["wall"] > row["total"] > 0 and row["outside"] == row["wall"] - row["total"]
        assert row["check"] > 0 and row["compile"] == 0 and row["manifest_mib"] > 0
    assert result["cpu"]["cores"] >= 1 and "--loader torch" in result["command"]
