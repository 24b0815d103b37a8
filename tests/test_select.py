"""The selection table: every `--select` value comes from it, and distill dispatches through it alone."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from rded_fast import config, select
from rded_fast.distill import DistillConfig, distill
from rded_fast.select import ALIASES, SELECTIONS, SELECTORS, ClassInputs, Selector, select_class, selector
from tests.conftest import write_synthetic_jpegs
from tests.test_distill import random_observer


def test_selections_are_the_table_and_its_aliases():
    assert SELECTIONS == ("rded", "rded-cover", "random-crops", "random-images", "random")
    assert selector("random") is SELECTORS["random-crops"] and set(ALIASES.values()) <= set(SELECTORS)
    assert [s.name for s in SELECTORS.values() if s.scores] == ["rded", "rded-cover"]
    assert [s.name for s in SELECTORS.values() if s.features] == ["rded-cover"]
    assert [s.name for s in SELECTORS.values() if s.whole_images] == ["random-images"]
    with pytest.raises(KeyError):
        selector("best")


def test_every_rule_has_the_one_signature():
    rng = np.random.default_rng(0)
    scores = rng.random((12, 3))
    feats = rng.normal(size=(12, 4))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    inputs = ClassInputs(1, "c", np.ones(12, bool), 3, 4, 0, scores=scores, similarity=feats @ feats.T, fix="fix")
    for rule in SELECTORS.values():
        sel = rule.select(inputs)
        assert len(sel.rows) == 4 and len(set(sel.rows.tolist())) == 4, rule.name
    expect = select_class(scores, np.arange(12), 1, 4, "c", "fix")
    assert np.array_equal(SELECTORS["rded"].select(inputs).rows, expect.rows)


def test_a_rule_added_to_the_table_runs_in_distill(tmp_path, monkeypatch):
    """A new selection is one entry in the table: here the worst-scored crops instead of the best."""

    def worst(c: ClassInputs):
        sel = select_class(-np.where(np.isfinite(c.scores), c.scores, -np.inf), np.arange(len(c.scores)), c.label, c.n, c.name)
        return replace(sel, scores=-sel.scores)

    rule = Selector("rded-worst", worst, scores=True)
    monkeypatch.setitem(SELECTORS, rule.name, rule)
    monkeypatch.setattr(config, "SELECTIONS", (*select.SELECTIONS, rule.name))
    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=6)
    base = DistillConfig(
        data=str(data), out="", observer="conv3", weights=str(random_observer(tmp_path, 2)), ipc=1, factor=1, mipc=6,
        num_crop=2, input_size=32, workers=0, device="cpu", show_progress=False, skip_observer_check=True,
    )  # fmt: skip
    runs = {name: distill(replace(base, out=str(tmp_path / name), select=name)) for name in ("rded", "rded-worst")}
    cells = {name: [m["cells"][0]["score"] for m in json.loads(r.manifest.read_text())["images"]] for name, r in runs.items()}
    assert all(w > b for w, b in zip(cells["rded-worst"], cells["rded"])), cells
    assert json.loads(runs["rded-worst"].manifest.read_text())["parameters"]["select"] == "rded-worst"
