"""Region-level soft labels: one teacher label per cell, lined up with the manifest's cells, and the area rule."""

import json

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from rded_fast.models import build
from rded_fast.score import normalize
from rded_fast.train import softlabels
from rded_fast.train.augment import EpochAug, aug_constants, prepare_epoch, sample_epoch
from rded_fast.train.regions import region_targets, region_weights
from rded_fast.train.student import StudentConfig, evaluate, relabel


def _aug(row_perm, col_perm, boxes) -> EpochAug:
    n = len(boxes)
    return EpochAug(
        order=np.arange(n),
        row_perm=np.array(row_perm),
        col_perm=np.array(col_perm),
        boxes=np.array(boxes),
        flip=np.zeros(n, bool),
        mix_perm=np.arange(n),
        mix_box=np.zeros((1, 4), np.int64),
        mix_lam=np.ones(1),
        batch_size=n,
    )


def test_a_crop_inside_one_cell_gets_that_cells_label_after_the_shuffle():
    # 8 px, factor 2: rows swapped for sample 0 (output top strip = original bottom row), columns swapped for 1
    aug = _aug([[1, 0], [0, 1], [0, 1]], [[0, 1], [1, 0], [0, 1]], [[0, 0, 4, 4], [1, 5, 2, 3], [0, 0, 8, 8]])
    w = region_weights(aug, size=8, factor=2, grid=2)
    assert w[0].tolist() == [0, 0, 1, 0]  # top-left of the output is original cell (row 1, col 0)
    assert w[1].tolist() == [1, 0, 0, 0]  # top-right of the output is original cell (row 0, col 0)
    assert w[2].tolist() == [0.25] * 4
    assert region_weights(aug, size=8, factor=2, grid=1).tolist() == [[1.0]] * 3
    straddle = _aug([[0, 1]], [[0, 1]], [[2, 0, 4, 8]])  # rows 2..5 of 8: half in each row strip, full width
    assert region_weights(straddle, size=8, factor=2, grid=2)[0].tolist() == [0.25] * 4


def test_region_targets_mix_covered_cells_and_cutmix_partner():
    host = sample_epoch(0, 0, n=6, batch_size=3, factor=2, size=12)
    aug = prepare_epoch(host, aug_constants(12, 2, torch.device("cpu")))
    weights = torch.from_numpy(region_weights(host, 12, 2, 2)).float()
    probs = torch.softmax(torch.randn(6, 4, 5), dim=2)
    for b in range(aug.num_batches):
        t = region_targets(probs, weights, aug)[aug.batch_slice(b)]
        assert t.shape == (3, 5) and torch.allclose(t.sum(1), torch.ones(3), atol=1e-6)
    same = probs[:, :1].expand(6, 4, 5)  # every cell alike: the target is that label whatever the crop
    sl = aug.batch_slice(0)
    r1, c1, r2, c2 = host.mix_box[0].tolist()
    pasted = (r2 - r1) * (c2 - c1) / 144
    own = same[aug.order[sl], 0]
    expect = (1 - pasted) * own + pasted * own[aug.mix_perm[sl]]
    assert torch.allclose(region_targets(same.contiguous(), weights, aug)[sl], expect, atol=1e-6)


def test_region_labels_line_up_with_the_manifests_cells(factor2_distilled, fashion_observer, tmp_path):
    result = relabel(
        StudentConfig(
            distilled=str(factor2_distilled),
            teacher="conv3",
            teacher_weights=str(fashion_observer),
            device="cpu",
            region="cells",
            out=str(tmp_path / "cells"),
            show_progress=False,
        )
    )
    assert result["cells"] == 4 * result["samples"]
    header = softlabels.read_header(tmp_path / "cells")
    assert header["region_grid"] == 2 and "epochs" not in header
    probs = softlabels.read_region_probs(tmp_path / "cells", header, 10)
    assert probs.shape == (result["samples"], 4, 10) and torch.allclose(probs.sum(2), torch.ones(probs.shape[:2]), atol=1e-3)
    with np.load(tmp_path / "cells" / softlabels.REGIONS_FILE) as z:  # all 10 classes kept: the logits themselves
        logits = torch.from_numpy(z["values"].astype(np.float32)).view(-1, 4, 10)
    teacher = build("conv3", 10, str(fashion_observer), 32).model.eval()
    manifest = json.loads((factor2_distilled / "manifest.json").read_text())
    for meta in manifest["images"][:6]:
        pixels = torch.from_numpy(np.array(Image.open(factor2_distilled / meta["file"]).convert("RGB"))).permute(2, 0, 1)
        i = header["files"].index(meta["file"])
        for cell in meta["cells"]:
            top, left, h, w = cell["cell_box"]
            view = TF.resize(pixels[None, :, top : top + h, left : left + w].float() / 255, [32, 32], antialias=True)
            with torch.no_grad():
                expect = teacher(normalize(view))[0]
            assert torch.allclose(logits[i, cell["cell"]], expect, atol=0.05, rtol=0.01), (meta["file"], cell["cell"])
            others = [c for c in range(4) if c != cell["cell"]]
            assert all((logits[i, c] - expect).abs().max() > 0.05 for c in others)  # the cells are told apart


def test_evaluate_trains_on_region_labels_without_a_teacher(factor2_distilled, fashion_observer, tmp_path):
    from rded_fast.data import fashion_mnist

    val = fashion_mnist.write_image_folder(tmp_path / "val", "test", per_class=5, show_progress=False)
    for region in ("cells", "image"):
        relabel(
            StudentConfig(
                distilled=str(factor2_distilled),
                teacher="conv3",
                teacher_weights=str(fashion_observer),
                device="cpu",
                region=region,
                top_k=3,
                out=str(tmp_path / region),
                show_progress=False,
            )
        )
        r = evaluate(
            StudentConfig(
                distilled=str(factor2_distilled),
                teacher="no-such-model",
                val=str(val),
                student="conv3",
                epochs=2,
                device="cpu",
                soft_labels=str(tmp_path / region),
                show_progress=False,
            )
        )
        assert r["parameters"]["soft_label_source"] == "region" and all(np.isfinite(r["epoch_loss"]))


def test_label_sources_benchmark_runs_every_source(fashion_tree, fashion_observer, tmp_path):
    from rded_fast.benchmarks.label_sources import SOURCES, format_result, run_label_sources
    from rded_fast.data import fashion_mnist

    val = fashion_mnist.write_image_folder(tmp_path / "val", "test", per_class=5, show_progress=False)
    result = run_label_sources(
        tmp_path / "w",
        ipc=1,
        factor=2,
        input_size=32,
        seeds=(0,),
        epochs=1,
        device="cpu",
        show_progress=False,
        train_dir=fashion_tree,
        test_dir=val,
        observer=fashion_observer,
    )
    assert set(result["final_top1"]) == set(SOURCES)
    assert all(0.0 <= v["mean"] <= 1.0 and len(v["runs"]) == 1 for v in result["final_top1"].values())
    assert "region-cells" in format_result(result) and (tmp_path / "w" / "rded_ipc1_seed0_f2_32px_labels_cells").is_dir()
