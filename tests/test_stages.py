"""Score, select and stitch against straightforward hand computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import Normalize

from rded_fast.models import build
from rded_fast.score import Scorer, center_pad
from rded_fast.select import select_class, select_random
from rded_fast.stitch import cell_boxes, stitch


@pytest.mark.parametrize("crop,size", [(32, 32), (16, 32), (15, 32)])
def test_scores_equal_one_crop_at_a_time(crop, size):
    torch.manual_seed(0)
    model = build("conv3", 10, None, size).model.eval()
    crops = torch.randint(0, 256, (37, 3, crop, crop), dtype=torch.uint8)
    labels = torch.randint(0, 10, (37,))
    scores, _ = Scorer(model, size, "cpu", batch_size=16)(crops, labels)
    norm = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for i in range(len(crops)):
        x = norm(crops[i].float() / 255)
        pad = size - crop
        x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        with torch.no_grad():
            logits = model(x[None])[0]
        expect = -torch.log_softmax(logits, 0)[labels[i]]
        assert abs(float(scores[i]) - float(expect)) < 1e-4


def test_center_pad_puts_floor_half_top_left():
    x = torch.ones(1, 1, 3, 3)
    y = center_pad(x, 8)
    rows = torch.nonzero(y[0, 0].sum(1)).flatten()
    assert rows.tolist() == [2, 3, 4]  # pad 5: 2 on top, 3 below


def test_selection_is_rdeds_rank_rule():
    # 6 images x 3 crops; the best crop per image, then images sorted by it.
    scores = np.array(
        [
            [0.9, 0.5, 0.7],  # best 0.5 (crop 1)
            [0.2, 0.8, 0.3],  # best 0.2 (crop 0)
            [np.inf] * 3,  # undecodable
            [0.6, 0.4, 0.1],  # best 0.1 (crop 2)
            [0.3, 0.35, 0.9],  # best 0.3 (crop 0)
            [1.0, 1.1, 1.2],  # best 1.0
        ]
    )
    sel = select_class(scores, np.arange(10, 16), label=0, n=4)
    assert sel.rows.tolist() == [13, 11, 14, 10]
    assert sel.crops.tolist() == [2, 0, 0, 1]
    assert np.allclose(sel.scores, [0.1, 0.2, 0.3, 0.5])
    assert sel.fallback == 0


def test_selection_fills_short_classes_with_next_best_crops_and_errors_when_impossible():
    scores = np.array([[0.5, 0.1, 0.7], [0.2, 0.3, np.inf]])
    sel = select_class(scores, np.array([0, 1]), label=0, n=4)
    assert list(zip(sel.rows.tolist(), sel.crops.tolist())) == [(0, 1), (1, 0), (1, 1), (0, 0)]
    assert sel.fallback == 2
    assert "usable crops" in select_class(scores, np.array([0, 1]), label=0, n=6)


def test_random_selection_is_seeded_and_skips_undecodable():
    ok = np.array([True, False, True, True, True])
    a = select_random(ok, 3, num_crop=4, n=3, seed=5)
    b = select_random(ok, 3, num_crop=4, n=3, seed=5)
    assert (a.rows == b.rows).all() and (a.crops == b.crops).all()
    assert 1 not in a.rows.tolist() and len(set(a.rows.tolist())) == 3 and (a.crops < 4).all()
    assert "only 4 usable images" in select_random(ok, 3, num_crop=4, n=5, seed=5)


def test_stitch_cell_order():
    ipc, factor, size = 3, 2, 8
    n = ipc * factor * factor
    cells = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    images = stitch(cells, ipc, factor, size)
    for j in range(ipc):
        for k, (top, left, h, w) in enumerate(cell_boxes(size, factor)):
            assert (images[j, :, top : top + h, left : left + w] == k * ipc + j).all()


def test_stitch_uneven_cells_are_nearest_resized():
    assert cell_boxes(9, 2) == [(0, 0, 5, 5), (0, 5, 5, 4), (5, 0, 4, 5), (5, 5, 4, 4)]
    cells = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    image = stitch(cells, 1, 2, 9)[0]
    assert torch.equal(image[:, 5:, 5:], cells[3])
    assert torch.equal(image[:, :5, :5], F.interpolate(cells[:1].float(), size=(5, 5), mode="nearest")[0].to(torch.uint8))
