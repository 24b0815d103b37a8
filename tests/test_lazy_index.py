"""The lazy index: distill reads the headers of the images it plans, caches them, and plans as the full index does."""

import json

import numpy as np

from rded_fast.cli import main
from rded_fast.formats.folder import build_index
from rded_fast.index import UNREAD, load_index, save_index
from rded_fast.plan import make_center_plan, make_plan, short_classes
from tests.conftest import age_folders, write_synthetic_jpegs


def _distill_argv(tree, cache, mipc: int, num_crop: int) -> list[str]:
    """A small random-crops distill (no observer check: it would read a sample of every class) with an index cache."""
    fixed = "--observer conv3 --input-size 32 --factor 1 --ipc 1 --device cpu --workers 0 --quiet --select random-crops"
    return [
        "distill",
        "--data",
        str(tree),
        "--index",
        str(cache),
        "--mipc",
        str(mipc),
        "--num-crop",
        str(num_crop),
        *fixed.split(),
    ]


def test_lazy_plan_reads_only_planned_headers_and_equals_the_full_index(tmp_path):
    tree = write_synthetic_jpegs(tmp_path / "tree", classes=3, per_class=20)
    full = build_index(tree, show_progress=False)
    lazy = build_index(tree, show_progress=False, headers=False)
    assert lazy.paths == full.paths and lazy.unread() == 60 and (lazy.sizes == UNREAD).all()
    plan = make_plan(lazy, seed=3, mipc=5, num_crop=2)
    assert lazy.unread() == 60 - 15
    read = lazy.sizes[:, 0] != UNREAD
    assert set(np.flatnonzero(read)) == set(plan.image_ids.tolist())
    assert (lazy.sizes[read] == full.sizes[read]).all()
    expected = make_plan(full, seed=3, mipc=5, num_crop=2)
    assert (plan.image_ids == expected.image_ids).all() and (plan.boxes == expected.boxes).all()
    center = make_center_plan(lazy, seed=3, per_class=2)
    assert (center.boxes == make_center_plan(full, seed=3, per_class=2).boxes).all()


def test_cached_headers_serve_another_seed(tmp_path):
    tree = write_synthetic_jpegs(tmp_path / "tree", classes=2, per_class=30)
    lazy = build_index(tree, show_progress=False, headers=False)
    make_plan(lazy, seed=0, mipc=10, num_crop=1)
    save_index(lazy, tmp_path / "index.npz")
    cached = load_index(tmp_path / "index.npz")
    assert cached.unread() == 40 and (cached.sizes == lazy.sizes).all()
    plan = make_plan(cached, seed=1, mipc=10, num_crop=1)
    assert 0 < 40 - cached.unread() <= 20  # only the new seed's images not read before
    full = build_index(tree, show_progress=False)
    assert (plan.boxes == make_plan(full, seed=1, mipc=10, num_crop=1).boxes).all()


def test_unusable_files_are_replaced_by_the_next_candidates_and_listed(tmp_path):
    tree = write_synthetic_jpegs(tmp_path / "tree", classes=2, per_class=6)
    (tree / "class_00" / "img_000.jpg").write_bytes(b"not a jpeg")
    whole = (tree / "class_00" / "img_001.jpg").read_bytes()
    (tree / "class_00" / "img_001.jpg").write_bytes(whole[:40])
    lazy = build_index(tree, show_progress=False, headers=False)
    plan = make_plan(lazy, seed=0, mipc=5, num_crop=1)
    rows = plan.class_rows(0)
    assert len(rows) == 4  # six files, two unusable: every header of the class was read to fill it
    assert not {lazy.paths[i] for i in plan.image_ids[rows]} & {"class_00/img_000.jpg", "class_00/img_001.jpg"}
    assert {s["path"] for s in lazy.skipped} == {"class_00/img_000.jpg", "class_00/img_001.jpg"}
    assert lazy.class_counts().tolist() == [4, 6] and short_classes(lazy, 5) == {"class_00": 4}
    assert len(plan.class_rows(1)) == 5


def test_distill_keeps_the_headers_it_read_in_its_index_cache(tmp_path):
    tree = write_synthetic_jpegs(tmp_path / "tree", classes=3, per_class=25)
    cache = tmp_path / "index.npz"
    argv = _distill_argv(tree, cache, mipc=4, num_crop=2)
    assert main([*argv, "--out", str(tmp_path / "a"), "--seed", "0"]) == 0
    first = load_index(cache).unread()
    assert 0 < first < 75
    assert main([*argv, "--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    assert load_index(cache).unread() < first
    seconds = json.loads((tmp_path / "b" / "manifest.json").read_text())["run"]["seconds"]
    assert {"index", "plan", "check", "decode_wait", "score", "select_stitch_encode", "write", "classes"} <= set(seconds)


def test_index_command_reads_every_header_once_for_any_later_seed(tmp_path, capsys):
    tree = write_synthetic_jpegs(tmp_path / "tree", classes=2, per_class=15)
    (tree / "class_01" / "broken.jpg").write_bytes(b"not a jpeg")
    age_folders(tree)  # a tree at rest: its folders were not changed just before they were listed
    cache = tmp_path / "all.npz"
    assert main(["index", "--data", str(tree), "--out", str(cache), "--quiet"]) == 0
    assert "indexed 30 images in 2 classes (1 files left out)" in capsys.readouterr().out
    index = load_index(cache)
    assert index.unread() == 0 and len(index) == 30
    stamp = cache.stat().st_mtime_ns
    argv = _distill_argv(tree, cache, mipc=3, num_crop=1)
    for seed in ("0", "5"):
        assert main([*argv, "--out", str(tmp_path / f"o{seed}"), "--seed", seed]) == 0
    assert cache.stat().st_mtime_ns == stamp  # nothing left to read: the cache was not rewritten
    (tmp_path / "foreign.npz").write_text("mine")
    assert main(["index", "--data", str(tree), "--out", str(tmp_path / "foreign.npz"), "--quiet"]) == 2
    assert "not an index cache" in capsys.readouterr().err and (tmp_path / "foreign.npz").read_text() == "mine"
    assert main(["index", "--data", str(tree), "--out", str(tree / "class_00" / "x.npz"), "--quiet"]) == 2


def test_distill_refuses_an_index_cache_inside_the_data(tmp_path, capsys):
    tree = write_synthetic_jpegs(tmp_path / "tree", classes=2, per_class=4)
    before = sorted(p.relative_to(tree) for p in tree.rglob("*"))
    argv = _distill_argv(tree, tree / "class_00" / "cache.npz", mipc=2, num_crop=1)
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "--index" in capsys.readouterr().err
    assert sorted(p.relative_to(tree) for p in tree.rglob("*")) == before
