"""The index (class order, header sizes, class maps) and the CLI (help, argument errors)."""

import shutil

import pytest
from PIL import Image

from rded_fast.cli import build_parser, main
from rded_fast.errors import UserError
from rded_fast.formats.folder import build_index, load_or_build_index
from rded_fast.index import load_index, read_class_map, save_index
from tests.conftest import age_folders


def test_index_sizes_from_headers_and_class_map(jpeg_tree, tmp_path):
    index = build_index(jpeg_tree, show_progress=False)
    assert index.classes == ["class_00", "class_01", "class_02"]
    assert index.class_counts().tolist() == [8, 8, 8]
    for rel, (w, h) in zip(index.paths, index.sizes):
        with Image.open(jpeg_tree / rel) as im:
            assert im.size == (w, h)
    cmap = tmp_path / "map.txt"
    cmap.write_text("# observer order\nclass_02\nclass_00\n\nclass_01\n")
    remapped = build_index(jpeg_tree, class_map=read_class_map(cmap), show_progress=False)
    assert remapped.classes == ["class_02", "class_00", "class_01"]
    assert all(p.startswith(remapped.classes[label]) for p, label in zip(remapped.paths, remapped.labels))
    cmap.write_text("class_00\nn99999999\n")
    with pytest.raises(UserError, match="missing.*n99999999"):
        build_index(jpeg_tree, class_map=read_class_map(cmap), show_progress=False)


def test_index_cache_is_reused(jpeg_tree, tmp_path):
    """A cache of a tree whose folders have not changed since is reused as it is (no listing). The tree's folders are
    dated an hour back: a folder changed within RACY_NS of its listing is listed again on the next reuse."""
    tree = shutil.copytree(jpeg_tree, tmp_path / "tree")
    age_folders(tree)
    cache = tmp_path / "index.npz"
    first = load_or_build_index(tree, cache, show_progress=False)
    marked = load_index(cache)
    marked.paths[0] = "marker"
    save_index(marked, cache)
    assert load_or_build_index(tree, cache, show_progress=False).paths[0] == "marker"
    assert len(first) == 24


def test_every_command_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "distill", "train-observer", "convert", "models"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: rded-fast " + name in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ipc", "0"], "--ipc 0: must be >= 1"),
        (["--factor", "0"], "--factor 0: must be >= 1"),
        (["--mipc", "0"], "--mipc 0: must be >= 1"),
        (["--factor", "300"], "larger than --input-size"),
        (["--ipc", "100", "--mipc", "2", "--num-crop", "1"], "needs 400 cells"),
        (["--observer", "nonsense"], "unknown model"),
    ],
)
def test_distill_argument_errors(jpeg_tree, tmp_path, capsys, args, message):
    base = [
        "distill",
        "--data",
        str(jpeg_tree),
        "--observer",
        "conv3",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
        "--input-size",
        "32",
        "--device",
        "cpu",
        "--workers",
        "0",
    ]
    if "--observer" in args:
        base[base.index("--observer") : base.index("--observer") + 2] = []
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_distill_refuses_non_empty_out_and_missing_data(jpeg_tree, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    assert main(["distill", "--data", str(jpeg_tree), "--observer", "conv3", "--out", str(tmp_path / "o")]) == 2
    assert "rded-fast did not write exists there and is not empty" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    assert main(["distill", "--data", str(tmp_path / "nope"), "--observer", "conv3", "--out", str(tmp_path / "p")]) == 2
    assert "not a directory" in capsys.readouterr().err
