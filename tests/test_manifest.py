"""The manifest's summary stays short at any scale and reads what build_manifest wrote."""

import json

import numpy as np
import pytest

from rded_fast.errors import UserError
from rded_fast.index import UNLISTED_CLASS, DatasetIndex
from rded_fast.manifest import SHOWN, _json_default, build_manifest, manifest_json, read_manifest, summary_lines, write_manifest


def _index(classes: int) -> DatasetIndex:
    labels = np.repeat(np.arange(classes), 2).astype(np.int64)
    index = DatasetIndex(
        root="/d",
        classes=[f"c{c:04d}" for c in range(classes)],
        paths=[f"c{c:04d}/{i}.jpg" for c in range(classes) for i in range(2)],
        labels=labels,
        sizes=np.full((len(labels), 2), 32, np.int64),
    )
    index.skipped = [{"path": f"x{i:04d}", "reason": UNLISTED_CLASS} for i in range(40)]
    return index


def test_summary_counts_everything_and_names_a_few(tmp_path):
    classes = 1000
    index = _index(classes)
    records = [
        {
            "class": f"c{c:04d}",
            "failures": [{"path": f"c{c:04d}/0.jpg", "reason": "truncated"}],
            "images": [{"file": f"c{c:04d}/a.png", "class": f"c{c:04d}", "label": c, "cells": []}],
            "fallback": 1 if c % 2 else 0,
            **({"skipped": "too few"} if c % 100 == 0 else {}),
        }
        for c in range(classes)
    ]
    params = {"input_size": 32, "factor": 2, "ipc": 1}
    manifest = build_manifest(params, {}, {}, index, records, {"c0001": 1, "c0002": 0}, ["c0003"], {"total": 1.0}, 1, 0, tmp_path)
    assert manifest["parameters"]["cells_per_class"] == 4 and manifest["parameters"]["scale"] == [0.08, 1.0]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    m = read_manifest(path)
    assert m.factor == 2 and len(m.classes) == classes and len(m.images) == classes and m.empty_classes == ["c0002"]
    lines = summary_lines(m)
    text = "\n".join(lines)
    assert "1000 image(s) could not be decoded" in text and "500 class(es) have cells filled" in text
    assert "40 class folder(s) are not in --class-map" in text and "10 class(es) got NO output" in text
    assert "1 finished class(es) were redone" in text and "40 file(s) skipped while indexing" in text
    assert all(line.count(",") <= SHOWN for line in lines)  # a few names per note, not the whole list
    assert max(len(line) for line in lines) < 300


def test_manifest_text_is_the_same_json_with_one_line_per_image(tmp_path):
    """manifest_json writes what json.dumps(indent=1) would (NaN and numpy numbers included), one image a line."""
    images = [
        {"file": f"c/{i}.png", "label": np.int64(i), "cells": [{"box": [1, 2, 3, 4], "score": np.float32(0.5)}]} for i in range(3)
    ]
    manifest = {"tool": "rded-fast", "parameters": {"ipc": 1, "scale": [0.08, 1.0]}, "empty": [], "images": images}
    manifest["run"] = {"seconds": {"total": float("nan")}, "nested": {"a": {"b": []}}}
    text = manifest_json(manifest)
    expected = json.dumps(manifest, indent=1, default=_json_default, allow_nan=True)
    assert json.dumps(json.loads(text), sort_keys=True) == json.dumps(json.loads(expected), sort_keys=True)
    assert list(json.loads(text)) == list(manifest)  # keys in the same order
    lines = text.splitlines()
    assert sum(line.lstrip().startswith('{"file": ') for line in lines) == 3
    assert json.loads(manifest_json({**manifest, "images": []}))["images"] == []
    path = tmp_path / "manifest.json"
    write_manifest(path, manifest)
    assert path.read_text() == text


def test_one_class_record_for_every_class_and_loader_options_as_parameters(tmp_path):
    from rded_fast.manifest import class_record, read_manifest as read, run_parameters

    done = class_record(3, "c", 5, 4, [], [{"file": "c/x.png"}], 1, sources="abc")
    assert list(done) == ["label", "class", "planned", "decoded", "failures", "sources", "images", "fallback"]
    empty = class_record(4, "d", 0, 0, [], [], 0, "no usable images")
    assert list(empty) == ["label", "class", "planned", "decoded", "failures", "images", "fallback", "skipped"]
    config = {"data": "d", "out": "o", "loader": "dali", "prefetch": 2, "loader_options": {"hw_decoder_load": 0.0}, "seed": 1}
    assert run_parameters(config) == {"data": "d", "loader": "dali", "hw_decoder_load": 0.0, "seed": 1}
    (tmp_path / "manifest.json").write_text('{"tool": "rded-fast"}')
    with pytest.raises(UserError, match="^--distilled .*: manifest.json is not a manifest of `rded-fast distill`"):
        read(tmp_path / "manifest.json", "--distilled")
