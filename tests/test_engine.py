"""The scoring engine: AMP and compiled paths against the eager fp32 reference."""

import json

import numpy as np
import pytest
import torch

from rded_fast.distill import DistillConfig, distill
from rded_fast.errors import UserError
from rded_fast.models import build
from rded_fast.score import Scorer


@pytest.fixture(scope="module")
def real_crops(fashion_tree):
    """Real Fashion-MNIST crops (planned boxes, torch loader) and their labels."""
    from rded_fast.formats import FOLDER, Source
    from rded_fast.formats.folder import build_index
    from rded_fast.loaders import make_loader
    from rded_fast.plan import make_plan

    index = build_index(fashion_tree, show_progress=False)
    plan = make_plan(index, 0, 20, 3)
    crops = torch.cat(
        [b.crops.reshape(-1, 3, 16, 16) for b in make_loader("torch", Source(FOLDER, index), plan, 16, batch_size=64, workers=0)]
    )
    return crops, torch.from_numpy(plan.labels).repeat_interleave(3)


def test_bf16_engine_matches_fp32_reference(fashion_observer, real_crops):
    crops, labels = real_crops
    model = build("conv3", 10, str(fashion_observer), 32).model
    ref, ref_pred = Scorer(model, 32, "cpu", amp_dtype=None, channels_last=False)(crops, labels)
    fast, fast_pred = Scorer(model, 32, "cpu", amp_dtype=torch.bfloat16)(crops, labels)
    diff = (fast - ref).abs()
    # bf16 logits carry ~3 significant digits: absolute error grows with the loss itself.
    assert (diff <= 0.05 + 0.05 * ref.abs()).all(), float(diff.max())
    assert (fast_pred == ref_pred).float().mean() > 0.97
    assert np.corrcoef(fast.numpy(), ref.numpy())[0, 1] > 0.99


def test_fixed_shape_padding_gives_unpadded_scores(fashion_observer, real_crops):
    crops, labels = real_crops
    model = build("conv3", 10, str(fashion_observer), 32).model
    plain, _ = Scorer(model, 32, "cpu", batch_size=256, fixed_shape=False)(crops[:70], labels[:70])
    padded, _ = Scorer(model, 32, "cpu", batch_size=256, fixed_shape=True)(crops[:70], labels[:70])
    assert torch.allclose(plain, padded, atol=1e-5, rtol=1e-5)


def test_compiled_engine_matches_eager(fashion_observer, real_crops):
    crops, labels = real_crops
    model = build("conv3", 10, str(fashion_observer), 32).model
    eager, _ = Scorer(model, 32, "cpu", batch_size=64)(crops[:100], labels[:100])
    compiled, _ = Scorer(model, 32, "cpu", batch_size=64, compile=True)(crops[:100], labels[:100])
    assert torch.allclose(eager, compiled, atol=1e-3, rtol=1e-3)


def test_eager_call_of_a_compiled_scorer_compiles_nothing(fashion_observer, real_crops):
    """The observer check's way of scoring: a compiled scorer called with eager=True runs the uncompiled step (the
    same numbers as an eager scorer) and adds no graph to dynamo's."""
    from torch._dynamo.utils import counters

    crops, labels = real_crops
    model = build("conv3", 10, str(fashion_observer), 32).model
    scorer = Scorer(model, 32, "cpu", batch_size=64, compile=True)
    compiled_step = scorer._step

    def refuse(*args):
        raise AssertionError("the compiled step was called")

    scorer._step = refuse
    graphs = counters["stats"]["unique_graphs"]
    got, got_pred = scorer(crops[:100], labels[:100], eager=True)
    assert counters["stats"]["unique_graphs"] == graphs
    ref, ref_pred = Scorer(model, 32, "cpu", batch_size=64)(crops[:100], labels[:100])
    assert torch.equal(got, ref) and torch.equal(got_pred, ref_pred)
    scorer._step = compiled_step  # and without eager, the compiled step scores
    assert torch.allclose(scorer(crops[:100], labels[:100])[0], ref, atol=1e-3, rtol=1e-3)


def test_bf16_selection_agrees_with_fp32(fashion_tree, fashion_observer, tmp_path):
    cells = {}
    for amp in ("none", "bf16"):
        r = distill(
            DistillConfig(
                data=str(fashion_tree),
                out=str(tmp_path / amp),
                observer="conv3",
                weights=str(fashion_observer),
                ipc=10,
                factor=1,
                mipc=60,
                input_size=32,
                workers=0,
                device="cpu",
                amp=amp,
                show_progress=False,
            )
        )
        manifest = json.loads(r.manifest.read_text())
        cells[amp] = {(c["source"], tuple(c["box"])) for m in manifest["images"] for c in m["cells"]}
    agreement = len(cells["none"] & cells["bf16"]) / len(cells["none"])
    assert agreement >= 0.95, agreement


def test_native_score_mode(jpeg_tree, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "r18m.pth"
    torch.save(build("resnet18_modified", 3, None, 32).model.state_dict(), ckpt)
    common = dict(
        data=str(jpeg_tree),
        ipc=1,
        factor=2,
        mipc=4,
        num_crop=2,
        input_size=32,
        workers=0,
        device="cpu",
        score_mode="native",
        skip_observer_check=True,
        show_progress=False,
    )
    r = distill(DistillConfig(out=str(tmp_path / "n"), observer="resnet18_modified", weights=str(ckpt), **common))
    assert json.loads(r.manifest.read_text())["parameters"]["score_mode"] == "native"
    conv = tmp_path / "conv3.pth"
    torch.save(build("conv3", 3, None, 32).model.state_dict(), conv)
    with pytest.raises(UserError, match="cannot take 16x16"):
        distill(DistillConfig(out=str(tmp_path / "c"), observer="conv3", weights=str(conv), **common))


def test_no_per_batch_scalar_syncs(jpeg_tree, tmp_path):
    """Host syncs (tensor -> Python scalar) happen per class, never per loader batch: the profiler's count of
    aten::_local_scalar_dense is the same with 2 or 12 images per batch."""
    from torch.profiler import ProfilerActivity, profile

    ckpt = tmp_path / "c.pth"
    torch.save(build("conv3", 3, None, 32).model.state_dict(), ckpt)
    counts = []
    for batch in (2, 12):
        cfg = DistillConfig(
            data=str(jpeg_tree),
            out=str(tmp_path / f"b{batch}"),
            observer="conv3",
            weights=str(ckpt),
            ipc=1,
            factor=2,
            mipc=8,
            num_crop=2,
            input_size=32,
            batch_size=batch,
            workers=0,
            device="cpu",
            skip_observer_check=True,
            show_progress=False,
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            distill(cfg)
        counts.append(sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense"))
    assert counts[0] == counts[1], counts
