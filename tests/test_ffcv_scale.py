"""The ffcv path under issue 7's rules: a truncated .beton is a clear error; distill is deterministic."""

from pathlib import Path

import pytest
import torch

from rded_fast.cli import main
from rded_fast.converters import convert
from rded_fast.errors import UserError
from rded_fast.loaders import open_source
from rded_fast.models import build


def test_truncated_beton_is_a_clear_error(jpeg_tree, tmp_path):
    beton = tmp_path / "train.beton"
    convert("ffcv", str(jpeg_tree), str(beton), workers=1, show_progress=False)
    data = beton.read_bytes()
    beton.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="train.beton.*truncated"):
        open_source("ffcv", str(beton))


def test_ffcv_distill_is_deterministic(jpeg_tree, tmp_path):
    beton = tmp_path / "train.beton"
    convert("ffcv", str(jpeg_tree), str(beton), workers=1, show_progress=False, write_mode="raw")
    ckpt = tmp_path / "c.pth"
    torch.manual_seed(0)
    torch.save(build("conv3", 3, None, 32).model.state_dict(), ckpt)
    outs = []
    for run, workers in (("a", "1"), ("b", "2")):
        out = tmp_path / run
        assert (
            main(
                [
                    "distill",
                    "--data",
                    str(beton),
                    "--loader",
                    "ffcv",
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
                    workers,
                    "--device",
                    "cpu",
                    "--skip-observer-check",
                    "--quiet",
                ]
            )
            == 0
        )
        outs.append(
            {
                str(p.relative_to(out)): p.read_bytes()
                for p in sorted(Path(out).rglob("*"))
                if p.is_file() and p.name != "manifest.json"
            }
        )
    assert outs[0] == outs[1] and any(k.endswith(".png") for k in outs[0])
