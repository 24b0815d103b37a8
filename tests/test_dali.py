"""DALI path on the CPU: shards (`convert --format shards`), the DALI loader, and parity with the torch loader.

Measured tolerances (synthetic JPEG tree, 40-72 px images, 24 px crops, DALI 2.4 CPU vs torchvision 0.29):
the decoded pixels are identical (both use libjpeg-turbo with the same settings) and the boxes are
identical (same plan); the crops differ only by the antialiasing filters of the resize: max 4 grey
levels, mean 0.18, 99th percentile 1. Asserted below with headroom: max <= 8, mean <= 0.5, p99 <= 2.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rded_fast.cli import main
from rded_fast.converters.shards import convert as convert_shards, parse_size
from rded_fast.errors import UserError
from rded_fast.formats import SHARDS, open as open_format
from rded_fast.formats.folder import build_index
from rded_fast.loaders import make_loader, open_source
from rded_fast.loaders.dali_loader import DaliCropLoader
from rded_fast.plan import make_plan
from tests.conftest import DALI_MAX_DIFF, DALI_MEAN_DIFF, DALI_P99_DIFF, _crop_diff, _run_loader, planned_sources, write_odd_tree


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory, jpeg_tree) -> Path:
    return write_odd_tree(tmp_path_factory.mktemp("odd") / "tree", jpeg_tree)


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory, odd_tree) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("odd_shards") / "shards"
    summary = convert_shards(str(odd_tree), str(out), shard_size="24KB", workers=2, show_progress=False)
    return out, summary


def _tar_members(tar_path: Path) -> dict[str, tuple[bytes, int]]:
    with tarfile.open(tar_path) as tar:
        return {m.name: (tar.extractfile(m).read(), m.offset_data) for m in tar.getmembers()}


def test_shards_round_trip_with_tarfile(odd_tree, odd_shards):
    out, summary = odd_shards
    dataset = json.loads((out / "dataset.json").read_text())
    index = build_index(odd_tree, show_progress=False)
    assert summary["shards"] == len(dataset["shards"]) > 1
    assert summary["written"] == len(index) - 1 == dataset["num_samples"]  # the truncated file is left out
    assert dataset["class_counts"] == [len(index.paths) - 1 - 16, 8, 8]
    seen = 0
    for shard in dataset["shards"]:
        members = _tar_members(out / shard["tar"])
        with tarfile.open(out / shard["tar"]) as tar:
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
        for name, (data, _offset) in members.items():
            key, ext = name.split(".", 1)
            if ext != "json":
                continue
            info = json.loads(data)
            image_id = int(key)
            seen += 1
            assert info["path"] == index.paths[image_id] and [info["width"], info["height"]] == index.sizes[image_id].tolist()
            assert members[f"{key}.cls"][0] == str(index.labels[image_id]).encode()
            jpg, jpg_offset = members[f"{key}.jpg"]
            assert dataset["samples"]["offset"][image_id] == jpg_offset
            assert dataset["samples"]["nbytes"][image_id] == len(jpg)
            source = (odd_tree / info["path"]).read_bytes()
            if info["reencoded"]:  # re-encoded as RGB JPEG, same size, pixels close to the source's
                assert Path(info["path"]).name in ("odd_cmyk.jpg", "odd_png.jpg")
                with Image.open(io.BytesIO(jpg)) as im, Image.open(odd_tree / info["path"]) as src:
                    assert im.format == "JPEG" and im.mode == "RGB" and im.size == src.size
                    diff = np.abs(np.asarray(im, np.int16) - np.asarray(src.convert("RGB"), np.int16))
                    assert diff.mean() < 6
            else:
                assert jpg == source  # plain, gray and progressive JPEGs keep their bytes
    assert seen == summary["written"]
    skipped = {Path(s["path"]).name: s["reason"] for s in dataset["skipped"]}
    assert set(skipped) == {"odd_truncated.jpg", "odd_zero.jpg"}
    assert "truncated" in skipped["odd_truncated.jpg"] and "0 bytes" in skipped["odd_zero.jpg"]


def test_index_files_match_dali_tool_and_stock_reader(odd_tree, odd_shards, tmp_path):
    import wds2idx  # DALI's own index tool, installed with nvidia-dali
    from nvidia.dali import fn, pipeline_def

    out, summary = odd_shards
    dataset = json.loads((out / "dataset.json").read_text())
    shards = [s for s in dataset["shards"] if s["tar"]]
    for shard in shards:
        creator = wds2idx.IndexCreator(str(out / shard["tar"]), str(tmp_path / "ref.idx"), verbose=False)
        creator.create_index()
        creator.close()
        assert (out / shard["idx"]).read_text() == (tmp_path / "ref.idx").read_text()

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def stock():
        jpg, cls, meta = fn.readers.webdataset(
            paths=[str(out / s["tar"]) for s in shards],
            index_paths=[str(out / s["idx"]) for s in shards],
            ext=["jpg", "cls", "json"],
            missing_component_behavior="error",
        )
        return jpg, cls, meta

    pipe = stock()
    pipe.build()
    records = []
    while len(records) < summary["written"]:
        jpg, cls, meta = pipe.run()
        records += [
            (bytes(np.asarray(jpg[i])), int(bytes(np.asarray(cls[i]))), json.loads(bytes(np.asarray(meta[i]))))
            for i in range(len(jpg))
        ]
    records = records[: summary["written"]]
    assert [r[2]["path"] for r in records] == [
        p for i, p in enumerate(dataset["index"]["paths"]) if dataset["samples"]["shard"][i] >= 0
    ]
    for data, label, info in records:
        assert label == info["label"] == dataset["classes"].index(info["path"].split("/")[0])
        if not info["reencoded"]:
            assert data == (odd_tree / info["path"]).read_bytes()


def test_rerun_keeps_complete_shards_and_is_deterministic(jpeg_tree, tmp_path):
    out = tmp_path / "s"
    first = convert_shards(str(jpeg_tree), str(out), shard_size="20KB", workers=2, show_progress=False)
    assert first["shards"] > 2 and first["reused_shards"] == 0
    tars = sorted(out.glob("shard-*.tar"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tars}
    (out / ".shard-00001.tar.k3j9x2ab.tmp").write_bytes(b"half")  # a crashed run's leftover is not a shard
    tars[1].unlink()
    again = convert_shards(str(jpeg_tree), str(out), shard_size="20KB", workers=1, show_progress=False)
    assert again["reused_shards"] == first["shards"] - 1
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("shard-*.tar"))}
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before if n != tars[1].name)  # untouched
    assert after[tars[1].name][1] == before[tars[1].name][1]  # rewritten, byte-identical
    assert not list(out.glob(".*.tmp"))
    fresh = convert_shards(str(jpeg_tree), str(tmp_path / "t"), shard_size="20KB", workers=2, show_progress=False)
    assert fresh["shards"] == first["shards"]
    for p in out.glob("shard-*"):
        assert p.read_bytes() == (tmp_path / "t" / p.name).read_bytes()
    # a different shard size re-plans the shards: nothing is reused, and the extra old shards go
    assert convert_shards(str(jpeg_tree), str(out), shard_size="1GB", show_progress=False)["reused_shards"] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json",
        "shard-00000.idx",
        "shard-00000.meta.json",
        "shard-00000.tar",
    ]


def test_convert_user_errors(jpeg_tree, tmp_path):
    with pytest.raises(UserError, match="--shard-size 12 parsecs"):
        parse_size("12 parsecs")
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("300") == 300
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        convert_shards(str(jpeg_tree), str(tmp_path / "file"), show_progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="rded-fast did not write exists there"):
        convert_shards(str(jpeg_tree), str(tmp_path / "busy"), show_progress=False)
    with pytest.raises(UserError, match="dataset.json.*rded-fast convert --format shards"):
        open_format(tmp_path / "busy", kind=SHARDS)


def test_cli_convert_and_class_map(jpeg_tree, tmp_path, capsys):
    cmap = tmp_path / "map.txt"
    cmap.write_text("class_02\nclass_00\nclass_01\n")
    assert (
        main(
            [
                "convert",
                "--format",
                "dali",
                "--data",
                str(jpeg_tree),
                "--out",
                str(tmp_path / "s"),
                "--class-map",
                str(cmap),
                "--shard-size",
                "64KB",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == 24 and summary["shards"] >= 2
    index = open_source("dali", str(tmp_path / "s"), class_map=["class_02", "class_00", "class_01"]).index
    assert index.classes == ["class_02", "class_00", "class_01"] and index.root == str((tmp_path / "s").resolve())
    with pytest.raises(UserError, match="class order"):
        open_source("dali", str(tmp_path / "s"), class_map=["class_00", "class_01", "class_02"])


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_dali_loader_cuts_the_torch_loaders_boxes(odd_tree, odd_shards, source):
    data = str(odd_tree) if source == "folder" else str(odd_shards[0])
    torch_source, dali_source = (
        open_source("torch", str(odd_tree), show_progress=False),
        open_source("dali", data, show_progress=False),
    )
    torch_index, dali_index = torch_source.index, dali_source.index
    plan = make_plan(torch_index, seed=3, mipc=20, num_crop=3)  # the folder's lazy index lists the unreadable file
    dali_plan = make_plan(dali_index, seed=3, mipc=20, num_crop=3)
    assert planned_sources(torch_index, plan) == planned_sources(dali_index, dali_plan)  # the same images and boxes

    ref_loader = make_loader("torch", torch_source, plan, 24, batch_size=7, workers=0)
    ref_reasons, reasons = {}, {}
    ref_rows, ref, ref_ok = _run_loader(ref_loader, len(plan), 7, ref_reasons)
    loader = make_loader("dali", dali_source, dali_plan, 24, batch_size=7, workers=2)
    assert len(loader) == len(ref_loader)
    rows, got, ok = _run_loader(loader, len(plan), 7, reasons)
    assert rows == ref_rows == list(range(len(plan)))  # plan order, every row once
    assert torch.equal(ok, ref_ok) and int((~ok).sum()) == 1  # the truncated JPEG, in both
    bad = [torch_index.paths[int(plan.image_ids[r])] for r in reasons]
    assert bad == [torch_index.paths[int(plan.image_ids[r])] for r in ref_reasons] == ["class_00/odd_truncated.jpg"]
    if source == "shards":
        assert next(iter(reasons.values())).startswith("left out at convert time")
    assert not got[~ok].any()
    # rows whose pixels both loaders decode alike (the re-encoded CMYK/PNG samples are compared apart)
    reenc = {i for i, p in enumerate(dali_index.paths) if Path(p).name in ("odd_cmyk.jpg", "odd_png.jpg")}
    same = torch.tensor(
        [bool(o) and (source == "folder" or int(dali_plan.image_ids[r]) not in reenc) for r, o in enumerate(ok.tolist())]
    )
    max_d, mean_d, p99 = _crop_diff(got[same], ref[same])
    print(f"\n{source}: {int(same.sum())} images x 3 crops, DALI vs torch: max {max_d}, mean {mean_d:.3f}, p99 {p99:.1f}")
    assert max_d <= DALI_MAX_DIFF and mean_d <= DALI_MEAN_DIFF and p99 <= DALI_P99_DIFF


def test_dali_loader_shards_partition_the_plan(jpeg_tree):
    source = open_source("dali", str(jpeg_tree), show_progress=False)
    plan = make_plan(source.index, seed=0, mipc=8, num_crop=2)
    parts = []
    whole = _run_loader(DaliCropLoader(source, plan, 16, batch_size=5, workers=1, device="cpu"), len(plan), 5)[1]
    for block in np.array_split(np.arange(len(plan)), 3):  # one contiguous block of plan rows per loader
        part = replace(plan, image_ids=plan.image_ids[block], labels=plan.labels[block], boxes=plan.boxes[block])
        for batch in make_loader("dali", source, part, 16, batch_size=5, workers=1):
            rows = torch.from_numpy(block[batch.rows.numpy()])
            parts += rows.tolist()
            assert torch.equal(batch.crops, whole[rows])  # deterministic: same crops in any split
    assert parts == list(range(len(plan)))


def _cells(out: Path) -> list[tuple[str, tuple[int, ...]]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(c["source"], tuple(c["box"])) for image in manifest["images"] for c in image["cells"]]


def _scores(out: Path) -> dict[tuple[str, tuple[int, ...]], float]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {(c["source"], tuple(c["box"])): c["score"] for image in manifest["images"] for c in image["cells"]}


def test_distill_dali_selects_the_torch_cells(fashion_tree, fashion_observer, tmp_path):
    """Fashion-MNIST is stored as PNG. The fair comparison is DALI on the same ImageFolder (DALI decodes
    the PNGs to the same pixels, so only the resize filter differs); converting to shards re-encodes the
    PNGs as JPEG (q95), which changes pixels by itself, both must select at least 90 % of the torch loader's (source, box) cells."""
    from rded_fast.distill import DistillConfig, distill

    base = dict(
        data=str(fashion_tree),
        observer="conv3",
        weights=str(fashion_observer),
        ipc=10,
        factor=1,
        mipc=60,
        num_crop=5,
        input_size=32,
        workers=2,
        device="cpu",
        amp="none",
        show_progress=False,
        batch_size=64,
    )
    runs = {
        "torch": distill(DistillConfig(out=str(tmp_path / "torch"), loader="torch", **base)).out,
        "folder": distill(DistillConfig(out=str(tmp_path / "dali"), loader="dali", **base)).out,
    }
    convert_shards(str(fashion_tree), str(tmp_path / "shards"), workers=2, show_progress=False)
    runs["shards"] = distill(
        DistillConfig(out=str(tmp_path / "dali_shards"), loader="dali", **{**base, "data": str(tmp_path / "shards")})
    ).out
    ref, folder, shards = (_cells(runs[k]) for k in ("torch", "folder", "shards"))
    scores = {k: _scores(v) for k, v in runs.items()}
    common = set(scores["torch"]) & set(scores["shards"])
    # the shards run really scored other pixels (JPEG re-encoded), yet picks the same cells
    assert any(abs(scores["torch"][c] - scores["shards"][c]) > 1e-6 for c in common)
    common_f = set(scores["torch"]) & set(scores["folder"])
    print(
        f"\nmax |score difference| on common cells: folder "
        f"{max(abs(scores['torch'][c] - scores['folder'][c]) for c in common_f):.2e}, shards "
        f"{max(abs(scores['torch'][c] - scores['shards'][c]) for c in common):.2e}"
    )
    agree_folder = len(set(ref) & set(folder)) / len(ref)
    agree_shards = len(set(ref) & set(shards)) / len(ref)
    print(
        f"\ndistill cells equal to torch's: DALI ImageFolder {agree_folder:.1%}, DALI shards (JPEG q95) {agree_shards:.1%}"
        f" of {len(ref)}"
    )
    assert len(ref) == len(folder) == len(shards) == 100
    assert agree_folder >= 0.9
    assert agree_shards >= 0.9


def test_gpu_decoder_options_and_size_hint(jpeg_tree):
    """What the GPU decoder is given (checked here, where only the CPU decoder runs): the CPU decoders' chroma
    upsampling, the pinned split, and a typical planned size as the preallocation hint, not the largest."""
    from rded_fast.loaders.dali_loader import decoder_options

    assert decoder_options("cpu", 1.0, (500, 375)) == {}
    assert decoder_options("mixed", 1.0, (500, 375)) == {
        "jpeg_fancy_upsampling": True,
        "hw_decoder_load": 1.0,
        "preallocate_width_hint": 500,
        "preallocate_height_hint": 375,
    }
    assert decoder_options("mixed", None, (0, 0)) == {"jpeg_fancy_upsampling": True}
    source = open_source("dali", str(jpeg_tree), show_progress=False)
    index = source.index
    plan = make_plan(index, seed=0, mipc=8, num_crop=1)
    hint = DaliCropLoader(source, plan, 16, device="cpu")._size_hint
    sizes = index.sizes[plan.image_ids]
    assert all(lo <= h <= hi for lo, h, hi in zip(sizes.min(axis=0), hint, sizes.max(axis=0))), (hint, sizes)
    assert hint != tuple(sizes.max(axis=0)) or len(set(map(tuple, sizes))) == 1
