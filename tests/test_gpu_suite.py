"""The GPU suite's CPU-side parts (tree generation and conversion) run here and record their results."""

from __future__ import annotations

import json

import pytest
import torch

from rded_fast.benchmarks import gpu_suite


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path of the suite")
def test_gpu_suite_cpu_side(tmp_path):
    out = tmp_path / "results"
    assert gpu_suite.main([str(out), "--classes", "2", "--per-class", "4", "--work", str(tmp_path / "work")]) == 0
    result = json.loads((out / "gpu_suite.json").read_text())
    steps = result["steps"]
    assert set(steps) == {"tree", "convert"}, "no GPU step may run without CUDA"
    assert steps["tree"]["images"] == 8 and 20 < steps["tree"]["mean_kb"] < 400
    for fmt in ("dali", "ffcv"):
        assert steps["convert"][fmt]["written"] == 8 and steps["convert"][fmt]["bytes"] > 8 * 10_000, steps["convert"]
    assert result["cpu"]["cores"] >= 1 and "model" in result["cpu"]
