"""The plan: torchvision's RandomResizedCrop rule, vectorised, seeded, per class."""

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop

from rded_fast.index import DatasetIndex
from rded_fast.plan import make_center_plan, make_plan, sample_resized_crop_boxes


def _torchvision_boxes(width, height, n, scale, ratio, seed=0):
    torch.manual_seed(seed)
    img = torch.zeros(1, height, width)
    return np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.union1d(a, b)
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return np.abs(ca - cb).max()


def test_boxes_follow_torchvision_distribution():
    n = 8000
    for (w, h), ratio in [((100, 80), (1.0, 1.0)), ((64, 48), (3 / 4, 4 / 3))]:
        ours = sample_resized_crop_boxes(np.array([[w, h]] * n), 1, np.random.default_rng(1), (0.08, 1.0), ratio)[:, 0]
        ref = _torchvision_boxes(w, h, n, (0.08, 1.0), ratio)
        for col, name in enumerate(["top", "left", "height", "width"]):
            stat = _ks(ours[:, col], ref[:, col])
            # KS critical value at alpha=0.001 for two samples of 8000 is about 0.031
            assert stat < 0.031, f"{name} distribution differs from torchvision (KS {stat:.3f}) for {w}x{h} {ratio}"
        assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
        assert (ours[:, :2] >= 0).all() and (ours[:, 2:] > 0).all()
        if ratio == (1.0, 1.0):
            assert (ours[:, 2] == ours[:, 3]).all()


def test_fallback_is_torchvisions_centre_crop():
    # A 200x20 strip: a square of >= 8% of its area rarely fits, so the fallback fires often.
    n = 6000
    ours = sample_resized_crop_boxes(np.array([[200, 20]] * n), 1, np.random.default_rng(2))[:, 0]
    ref = _torchvision_boxes(200, 20, n, (0.08, 1.0), (1.0, 1.0))
    centre = np.array([0, 90, 20, 20])
    ours_fb, ref_fb = (ours == centre).all(1).mean(), (ref == centre).all(1).mean()
    assert ours_fb > 0.5 and abs(ours_fb - ref_fb) < 0.03, (ours_fb, ref_fb)
    # Impossible scales always fall back; check the exact boxes against torchvision's for several shapes.
    for (w, h), ratio in [((50, 30), (1.0, 1.0)), ((30, 50), (1.0, 1.0)), ((90, 30), (0.75, 1.333)), ((40, 40), (1.0, 1.0))]:
        box = sample_resized_crop_boxes(np.array([[w, h]]), 3, np.random.default_rng(0), (2.0, 3.0), ratio)
        expect = _torchvision_boxes(w, h, 1, (2.0, 3.0), ratio)[0]
        assert (box == expect).all(), (w, h, box, expect)


def _index(counts, size=(64, 48)):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    return DatasetIndex(
        "/nowhere",
        [f"c{c}" for c in range(len(counts))],
        [f"c{label}/{i}.jpg" for i, label in enumerate(labels)],
        labels,
        np.tile(np.array(size), (len(labels), 1)),
    )


def test_plan_is_seeded_per_class_and_samples_without_replacement():
    index = _index([50, 7, 30])
    a, b = make_plan(index, 0, 20, 5), make_plan(index, 0, 20, 5)
    assert (a.image_ids == b.image_ids).all() and (a.boxes == b.boxes).all()
    c = make_plan(index, 1, 20, 5)
    assert not (a.boxes == c.boxes).all()
    counts = np.bincount(a.labels)
    assert counts.tolist() == [20, 7, 20]  # the short class uses all it has
    for label in range(3):
        ids = a.image_ids[a.labels == label]
        assert len(set(ids.tolist())) == len(ids)
        assert (index.labels[ids] == label).all()
    # A class's plan does not depend on which other classes are planned.
    only2 = make_plan(index, 0, 20, 5, classes=[2])
    assert (only2.boxes == a.boxes[a.labels == 2]).all()
    part, both = a.only([0, 2]), make_plan(index, 0, 20, 5, classes=[0, 2])
    assert (part.image_ids == both.image_ids).all() and (part.boxes == both.boxes).all() and (part.labels == both.labels).all()
    assert a.boxes.shape == (47, 5, 4)


def test_center_plan_is_the_central_square():
    index = _index([3, 3], size=(64, 48))
    plan = make_center_plan(index, 0, 2)
    assert plan.boxes.shape == (4, 1, 4)
    assert (plan.boxes[:, 0] == np.array([0, 8, 48, 48])).all()
