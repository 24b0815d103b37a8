"""The student recipe, ShufflePatches, stored soft labels, evaluate, and a short quality run."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from rded_fast.distill import DistillConfig, distill
from rded_fast.models import build
from rded_fast.train import softlabels
from rded_fast.train.augment import Augmenter, sample_epoch, shuffle_map
from rded_fast.train.recipe import Recipe, evaluates_at, kd_loss, lr_multiplier, make_optimizer, param_groups, rded_batch_size
from rded_fast.train.student import StudentConfig, evaluate, relabel


def test_lr_schedule_weight_decay_groups_and_batch_rule():
    assert lr_multiplier(0, 300) == 1.0
    assert lr_multiplier(150, 300) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(299, 300) == pytest.approx(0.5 * (1 + math.cos(math.pi * 299 / 600)))
    assert 0.50 < lr_multiplier(299, 300) < 0.51
    model = build("conv3", 10, None, 32).model
    decay, no_decay = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        [f"layers.conv.{i}.weight" for i in range(3)] + ["classifier.weight"]
    )
    assert {names[id(p)] for p in no_decay["params"]} >= {"layers.norm.0.weight", "layers.conv.0.bias", "classifier.bias"}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [rded_batch_size(i, 10) for i in (1, 10, 50)] == [10, 50, 100]
    assert [rded_batch_size(i, 1000) for i in (1, 10, 50)] == [20, 100, 200]
    assert rded_batch_size(10, 200) == 100 and rded_batch_size(10, 100, "conv3") == 25 and rded_batch_size(1, 5) == 5
    assert [e for e in range(300) if evaluates_at(e, 300)] == [249, 259, 269, 279, 289, 299]


def test_one_training_step_equals_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x, teacher = torch.randn(4, 3, 2, 2), torch.randn(4, 5)
    T = 20.0
    probs = torch.softmax(teacher / T, 1)
    w0, b0 = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    logits = model(x)
    loss = kd_loss(logits, probs, T)
    log_ps = torch.log_softmax(logits.detach() / T, 1)
    hand = float((probs * (probs.log() - log_ps)).sum() / 4)  # sum over classes, mean over batch, no T^2
    assert float(loss.detach()) == pytest.approx(hand, rel=1e-4)
    opt, sched = make_optimizer(model, Recipe(epochs=300, batch_size=4, lr=1e-3))
    opt.zero_grad()
    loss.backward()
    gw, gb = model[1].weight.grad.clone(), model[1].bias.grad.clone()
    opt.step()
    # AdamW's first step: p <- p * (1 - lr * wd) - lr * g / (|g| + eps) (bias-corrected moments)
    expect_w = w0 * (1 - 1e-3 * 0.01) - 1e-3 * gw / (gw.abs() + 1e-8)
    expect_b = b0 - 1e-3 * gb / (gb.abs() + 1e-8)
    assert torch.allclose(model[1].weight, expect_w, atol=1e-7)
    assert torch.allclose(model[1].bias, expect_b, atol=1e-7)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_multiplier(1, 300))


@pytest.mark.parametrize("factor,size", [(2, 8), (3, 9), (3, 10)])
def test_shuffle_patches_permutes_rows_and_columns_only(factor, size):
    from rded_fast.stitch import cell_boxes

    boxes = cell_boxes(size, factor)
    image = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    for k, (t, left, h, w) in enumerate(boxes):
        image[..., t : t + h, left : left + w] = k
    seen = set()
    for epoch in range(60):
        aug = sample_epoch(0, epoch, 8, 8, factor, size)
        rows = torch.from_numpy(shuffle_map(aug.row_perm, size))
        cols = torch.from_numpy(shuffle_map(aug.col_perm, size))
        out = image.expand(8, -1, -1, -1)[torch.arange(8)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        out = out.permute(0, 3, 1, 2)
        for i in range(8):
            rows, cols = aug.row_perm[i], aug.col_perm[i]
            # Each output strip is a whole source strip, so cells stay intact: walk the output grid.
            top = 0
            grid = []
            for r in range(factor):
                h = boxes[rows[r] * factor][2]
                left, line = 0, []
                for c in range(factor):
                    w = boxes[cols[c]][3]
                    cell = out[i, 0, top : top + h, left : left + w]
                    assert (cell == cell[0, 0]).all()
                    line.append(int(cell[0, 0]))
                    left += w
                grid.append(tuple(line))
                top += h
            assert grid == [tuple(rows[r] * factor + cols[c] for c in range(factor)) for r in range(factor)]
            seen.add((tuple(rows), tuple(cols)))
    perms = set(itertools.permutations(range(factor)))
    assert seen == {(r, c) for r in perms for c in perms}


def _per_sample_reference(images, aug, b, factor):
    """Recipe version 1, sample by sample: ShufflePatches by index lists, torchvision's resized_crop in float,
    flip, ImageNet normalisation, CutMix by slicing."""
    from torchvision.transforms.v2 import functional as TF

    from rded_fast.score import normalize
    from rded_fast.stitch import cell_boxes

    sl, size = aug.batch_slice(b), images.shape[-1]
    spans = [(t, h) for t, _, h, _ in cell_boxes(size, factor)[::factor]]
    strips = lambda perm: np.concatenate([np.arange(spans[q][0], spans[q][0] + spans[q][1]) for q in perm])
    out = []
    for i, n in enumerate(aug.order[sl]):
        image = images[n][:, strips(aug.row_perm[sl][i])][:, :, strips(aug.col_perm[sl][i])].float() / 255
        crop = TF.resized_crop(image, *aug.boxes[sl][i].tolist(), [size, size], antialias=True)
        out.append(crop.flip(-1) if aug.flip[sl][i] else crop)
    out = normalize(torch.stack(out))
    r1, c1, r2, c2 = aug.mix_box[b].tolist()
    out[:, :, r1:r2, c1:c2] = out[torch.from_numpy(aug.mix_perm[sl])][:, :, r1:r2, c1:c2]
    return out


@pytest.mark.parametrize("factor,size", [(1, 32), (2, 32), (3, 31), (2, 17)])
def test_batched_augmentation_equals_per_sample_torchvision(factor, size):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (23, 3, size, size), dtype=torch.uint8)
    augmenter = Augmenter(images, factor)
    for epoch in range(3):
        aug = sample_epoch(0, epoch, 23, 10, factor, size)
        on_device = augmenter.prepare(aug)
        for b in range(aug.num_batches):  # the last batch is short (3 samples)
            batched = augmenter.batch(on_device, b, slot=b % 2)
            assert batched.is_contiguous(memory_format=torch.channels_last)
            # normalised units: 1e-5 is 1/400 of a grey level (float rounding; version 1 and 2 make the same pixels)
            assert torch.allclose(batched, _per_sample_reference(images, aug, b, factor), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def val_tree(tmp_path_factory):
    from rded_fast.data import fashion_mnist

    return fashion_mnist.write_image_folder(tmp_path_factory.mktemp("val") / "test", "test", per_class=20, show_progress=False)


def test_replay_of_stored_labels_equals_online(factor2_distilled, val_tree, fashion_observer, tmp_path):
    base = dict(
        distilled=str(factor2_distilled),
        teacher="conv3",
        teacher_weights=str(fashion_observer),
        val=str(val_tree),
        student="conv3",
        epochs=3,
        seed=1,
        device="cpu",
        show_progress=False,
    )
    online = evaluate(StudentConfig(**base, json=str(tmp_path / "online.json")))
    stored = relabel(StudentConfig(**base, out=str(tmp_path / "labels")))
    replay = evaluate(StudentConfig(**base, soft_labels=str(tmp_path / "labels")))
    assert stored["epochs"] == 3 and stored["top_k"] == 10 and stored["bytes_per_epoch"] < 4096
    assert np.allclose(online["epoch_loss"], replay["epoch_loss"], rtol=2e-3, atol=1e-6)
    result = json.loads((tmp_path / "online.json").read_text())
    assert result["parameters"]["factor"] == 2 and result["parameters"]["recipe"]["batch_size"] == 10
    for key in ("final_top1", "final_top5", "best_top1"):
        assert 0.0 <= result[key] <= 1.0
    assert result["final_top5"] >= result["final_top1"]
    # top-k storage: exact probabilities on the top k, the rest spread evenly
    topk = relabel(StudentConfig(**base, out=str(tmp_path / "top3"), top_k=3))
    assert topk["top_k"] == 3
    aug, enc = softlabels.read_epoch(tmp_path / "top3", 0)
    enc_t = {key: torch.from_numpy(v) for key, v in enc.items()}
    probs = softlabels.decode_probs(enc_t["values"], enc_t["indices"], enc_t["lse"], 10, 20.0)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-3)
    _, full = softlabels.read_epoch(tmp_path / "labels", 0)
    exact = torch.softmax(torch.from_numpy(full["values"].astype(np.float32)) / 20.0, 1)
    top_exact = exact.gather(1, torch.from_numpy(enc["indices"].astype(np.int64)))
    assert torch.allclose(probs.gather(1, torch.from_numpy(enc["indices"].astype(np.int64))), top_exact, atol=1e-3)


def test_random_selection_differs_from_rded_and_is_seeded(fashion_tree, fashion_observer, tmp_path):
    cfg = dict(
        data=str(fashion_tree),
        observer="conv3",
        weights=str(fashion_observer),
        ipc=2,
        factor=1,
        mipc=30,
        num_crop=3,
        input_size=32,
        workers=0,
        device="cpu",
        show_progress=False,
    )
    sources = lambda r: [(c["source"], tuple(c["box"])) for m in json.loads(r.manifest.read_text())["images"] for c in m["cells"]]
    rded = sources(distill(DistillConfig(out=str(tmp_path / "rded"), **cfg)))
    rand_a = sources(distill(DistillConfig(out=str(tmp_path / "ra"), select="random", **cfg)))
    rand_b = sources(distill(DistillConfig(out=str(tmp_path / "rb"), select="random", **cfg)))
    assert rand_a == rand_b and rand_a != rded and len(rand_a) == 20


def test_short_quality_run(fashion_tree, fashion_observer, val_tree, tmp_path):
    from rded_fast.benchmarks.quality import LABELS, ROWS, format_table, run_quality

    result = run_quality(
        tmp_path,
        train_dir=fashion_tree,
        test_dir=val_tree,
        observer=fashion_observer,
        seeds=(0,),
        epochs=10,
        ipcs=(2,),
        mipc=30,
        num_crop=3,
        device="cpu",
        show_progress=False,
    )
    assert set(result["shapes"]) == {"f1_32px"}
    result = result["shapes"]["f1_32px"]
    for row in ROWS:
        for lab in LABELS:
            runs = result["final_top1"][row]["2"][lab]["runs"]
            assert len(runs) == 1 and 0.0 <= runs[0] <= 1.0
    assert result["final_top1"]["rded"]["2"]["soft"]["mean"] > 0.2  # well above chance (0.1) after 10 short epochs
    assert "random-images" in format_table(result) and set(result["rded_vs_random_images"]) == {"ipc2_soft", "ipc2_hard"}
