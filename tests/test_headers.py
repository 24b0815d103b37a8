"""The fast header reader agrees with PIL on every kind of file; the compact index cache round-trips."""

import json

import numpy as np
import pytest
from PIL import Image

from rded_fast import index as index_mod
from rded_fast.formats.folder import build_index
from rded_fast.headers import _pil_size, image_size
from rded_fast.index import load_index, save_index


def _odd_files(folder):
    """Every header shape the index meets: baseline, progressive, CMYK, gray, EXIF with a large APP1 before
    the frame header, PNG named .JPEG, truncated, empty, garbage, a 1x1 and a restart-marker JPEG."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    folder.mkdir(parents=True)
    files = {}

    def save(name, image, **kw):
        image.save(folder / name, **kw)
        files[name] = folder / name

    save("base.jpg", rgb, format="JPEG")
    save("prog.jpg", rgb, format="JPEG", progressive=True)
    save("cmyk.jpg", rgb.convert("CMYK"), format="JPEG")
    save("gray.jpg", rgb.convert("L"), format="JPEG")
    save("tiny.jpg", rgb.resize((1, 1)), format="JPEG")
    save("restart.jpg", rgb, format="JPEG", restart_marker_blocks=1)
    exif = Image.Exif()
    exif[0x010E] = "x" * 20000  # ImageDescription: a 20 KB APP1 before the SOF
    save("exif.jpg", rgb, format="JPEG", exif=exif)
    save("png_named.JPEG", rgb, format="PNG")
    save("real.png", rgb.convert("L"), format="PNG")
    whole = (folder / "base.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "header_only.jpg").write_bytes(whole[:40])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\x00" + bytes(100))
    for name in ("truncated.jpg", "header_only.jpg", "empty.jpg", "garbage.jpg"):
        files[name] = folder / name
    return files


def test_fast_header_matches_pil(tmp_path):
    for name, path in _odd_files(tmp_path / "c").items():
        fast = image_size(str(path))
        if name == "empty.jpg":
            assert fast == "empty file (0 bytes)"
            continue
        pil = _pil_size(str(path))
        if isinstance(pil, str):
            assert isinstance(fast, str) and fast == pil, name
        else:
            assert fast == tuple(pil), name
    assert image_size(str(tmp_path / "c" / "exif.jpg")) == (53, 37)


def test_compact_cache_round_trips_and_reads_the_old_json(tmp_path):
    root = tmp_path / "data"
    _odd_files(root / "a")
    weird = root / "b" / "caf\udce9-\u00e9.jpg"  # a name that is not UTF-8 on disk, and one that is
    weird.parent.mkdir()
    weird.write_bytes((root / "a" / "base.jpg").read_bytes())
    index = build_index(root, show_progress=False)
    assert "b/caf\udce9-\u00e9.jpg" in index.paths and any(s["path"] == "a/empty.jpg" for s in index.skipped)
    save_index(index, tmp_path / "idx.npz")
    back = load_index(tmp_path / "idx.npz")
    assert back.paths == index.paths and back.classes == index.classes and back.root == index.root
    assert np.array_equal(back.labels, index.labels) and np.array_equal(back.sizes, index.sizes)
    assert back.skipped == index.skipped
    (tmp_path / "old.json").write_text(json.dumps(index.to_json()))  # an index cache of an earlier version
    assert load_index(tmp_path / "old.json").paths == index.paths
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04broken")  # not recognisably ours: never "delete it"
    with pytest.raises(index_mod.UserError, match="not an index cache of rded-fast .*give another path$"):
        load_index(tmp_path / "bad.npz")
    np.savez(tmp_path / "v9.npz", version=np.int64(9), paths=np.zeros(0, np.uint8), sizes=np.zeros(0, np.int32))
    with pytest.raises(
        index_mod.UserError, match=r"another rded-fast version \(9\).*delete it \(rded-fast wrote it\) to rebuild"
    ):
        load_index(tmp_path / "v9.npz")


def test_process_pool_gives_the_thread_pools_answer(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _odd_files(root / "a")
    threads = build_index(root, show_progress=False, workers=2)
    monkeypatch.setattr(index_mod, "PROCESS_MIN_FILES", 1)
    processes = build_index(root, show_progress=False, workers=2)
    assert processes.paths == threads.paths and np.array_equal(processes.sizes, threads.sizes)
    assert processes.skipped == threads.skipped
