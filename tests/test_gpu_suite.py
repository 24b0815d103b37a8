"""The GPU suite's steps run on the CPU (DALI decodes on the CPU, the model is not compiled) with small sizes: every
step the GPU session runs is exercised here except the compile and the GPU tests; the chart is drawn from its JSON."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rded_fast.benchmarks import gpu_suite, plot_gpu_suite

STEPS = "tree,tree1k,convert,model,ceilings,decode,e2e1k"


def _errors(value, where: str = "") -> list[str]:
    if isinstance(value, dict):
        return (
            [f"{where}: {value['error']}"]
            if "error" in value
            else [e for k, v in value.items() for e in _errors(v, f"{where}/{k}")]
        )
    return []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run of the suite")
def test_gpu_suite_steps_run_on_the_cpu_and_chart(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    argv = [str(out), "--work", str(work), "--device", "cpu", "--classes", "2", "--per-class", "8", "--classes-1k", "3",
            "--per-class-1k", "4", "--observer", "conv3", "--input-size", "32", "--ipc", "1", "--mipc", "4", "--num-crop", "2",
            "--crop", "16", "--batch", "4", "--workers", "2", "--convert", "dali", "--e2e1k", "dali-folder", "--steps", STEPS]  # fmt: skip
    assert gpu_suite.main(argv) == 0
    result = json.loads((out / "gpu_suite.json").read_text())
    steps = result["steps"]
    assert not _errors(steps), _errors(steps)
    assert set(steps) == set(STEPS.split(",")) and result["device"] == "cpu"
    assert steps["tree"]["images"] == 16 and 20 < steps["tree"]["mean_kb"] < 400
    assert steps["tree1k"]["files"] == 12 and steps["tree1k"]["distinct"] == 12
    linked = sorted((work / "tree1k").glob("*/*"))
    assert len(linked) == 12 and all(os.stat(p).st_nlink >= 2 for p in linked)  # hard links to the tree's files
    assert steps["convert"]["dali"]["written"] == 16

    ceilings = steps["ceilings"]
    assert set(ceilings) >= {"dali_graph_folder", "dali_graph_shards", "dali_rrc", "tv_decode", "pil_processes"}
    plan_rows = 2 * 4
    for name in ("dali_graph_folder", "dali_graph_shards", "tv_decode", "pil_processes"):
        assert ceilings[name]["images"] == plan_rows and ceilings[name]["whole_img_per_s"] > 0, (name, ceilings[name])
    decode = steps["decode"]
    for name in ("dali-folder", "dali-shards", "torch-folder"):
        assert decode[name]["images"] == plan_rows and decode[name]["failed"] == 0, (name, decode[name])
        assert decode[name]["fraction_of_ceiling_whole_img_per_s"] > 0
    assert decode["dali-folder"]["timings_jpeg_check"] > 0

    run = steps["e2e1k"]["dali-folder"]
    assert run["images_written"] == 3 and run["crops"] == 3 * 4 * 2 and run["decode_failures"] == 0
    assert run["wall_s"] > run["run_seconds"]["total"] > run["run_seconds"]["classes"] > 0
    assert {"jpeg_check", "jpeg_check_wait", "compile", "check"} <= set(run["run_seconds"])

    second = tmp_path / "second.json"  # a later call of the same session: its steps are merged into the first's
    second.write_text(json.dumps({**result, "steps": {"e2e": {"torch-folder": {"crops_per_s": 5.0}}}}))
    merged = plot_gpu_suite.merge([out / "gpu_suite.json", second])
    assert merged["steps"]["e2e"]["torch-folder"]["crops_per_s"] == 5.0 and "decode" in merged["steps"]
    panels = plot_gpu_suite.bars(merged)
    assert [r[0] for r in panels["decode"]] == ["dali-folder", "dali-shards", "torch-folder"]
    assert panels["decode"][0][2] in (
        ceilings["dali_graph_folder"]["img_per_s"],
        ceilings["dali_graph_folder"]["whole_img_per_s"],
    )
    text = plot_gpu_suite.summary(merged)
    assert "decode dali-folder:" in text and "e2e1k dali-folder (3 classes): wall" in text, text
    pytest.importorskip("matplotlib")
    png = plot_gpu_suite.draw(merged, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
