"""distill end to end: real Fashion-MNIST data, reproducibility, the manifest, and bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rded_fast.chance import near_chance_threshold
from rded_fast.distill import DistillConfig, distill
from rded_fast.errors import UserError
from rded_fast.loaders.torch_loader import cut_crops, decode_rgb
from tests.conftest import fashion_config, random_observer, write_synthetic_jpegs


@pytest.fixture(scope="module")
def fashion_run(fashion_tree, fashion_observer, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fashion"
    return distill(fashion_config(fashion_tree, fashion_observer, out))


def test_end_to_end_on_fashion_mnist(fashion_run):
    result = fashion_run
    manifest = json.loads(result.manifest.read_text())
    check = manifest["observer"]["check"]
    assert check["accuracy"] > check["threshold"] and check["accuracy"] > 0.5
    for cls in manifest["data"]["classes"]:
        assert len(list((result.out / cls).glob("*.png"))) == 10
    assert result.num_images == 100
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.format == "PNG" and sheet.size[0] > 320 and sheet.size[1] >= 10 * 64
    assert manifest["observer"]["weights_sha256"] and manifest["versions"]["torch"]
    # scores are ranked: image 0 of each class holds the best cell of the class
    for meta in manifest["images"]:
        assert meta["cells"][0]["rank"] == int(meta["file"].split("_id")[1][:5])


def test_manifest_recut_reproduces_every_pixel(fashion_run):
    manifest = json.loads(fashion_run.manifest.read_text())
    root = manifest["data"]["root"]
    p = manifest["parameters"]["crop_size"]
    for meta in manifest["images"]:
        out = torch.from_numpy(np.asarray(Image.open(fashion_run.out / meta["file"]).convert("RGB"))).permute(2, 0, 1)
        for cell in meta["cells"]:
            crop = cut_crops(decode_rgb(os.path.join(root, cell["source"])), np.array([cell["box"]]), p)[0]
            top, left, h, w = cell["cell_box"]
            assert torch.equal(out[:, top : top + h, left : left + w], crop)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest_without_times(folder: Path) -> dict:
    m = json.loads((folder / "manifest.json").read_text())
    m.pop("run")  # timestamps, timings, world size, output path
    return m


def test_same_seed_same_bytes_factor2_recut(jpeg_tree, tmp_path):
    weights = random_observer(tmp_path, 3)
    cfg = dict(
        data=str(jpeg_tree),
        observer="conv3",
        weights=str(weights),
        ipc=2,
        factor=2,
        mipc=8,
        num_crop=3,
        input_size=32,
        seed=3,
        workers=0,
        device="cpu",
        show_progress=False,
        skip_observer_check=True,
    )
    a = distill(DistillConfig(out=str(tmp_path / "a"), **cfg))
    b = distill(DistillConfig(out=str(tmp_path / "b"), **cfg))
    c = distill(DistillConfig(out=str(tmp_path / "c"), **{**cfg, "seed": 4}))
    fa, fb, fc = _files(a.out), _files(b.out), _files(c.out)
    images = [k for k in fa if k.endswith(".png") and "contact" not in k]
    assert len(images) == 6
    assert all(fa[k] == fb[k] for k in images)
    assert _manifest_without_times(a.out) == _manifest_without_times(b.out)
    assert any(fa[k] != fc.get(k) for k in images)
    # factor 2: every 16x16 cell equals a re-cut of its source box
    manifest = json.loads(a.manifest.read_text())
    for meta in manifest["images"]:
        out = torch.from_numpy(np.asarray(Image.open(a.out / meta["file"]))).permute(2, 0, 1)
        assert [c["rank"] for c in meta["cells"]] == [k * 2 + int(meta["file"][-9:-4]) for k in range(4)]
        for cell in meta["cells"]:
            crop = cut_crops(decode_rgb(os.path.join(str(jpeg_tree), cell["source"])), np.array([cell["box"]]), 16)[0]
            top, left, h, w = cell["cell_box"]
            assert torch.equal(out[:, top : top + h, left : left + w], crop)


def test_jpg_format_and_overwrite_rules(jpeg_tree, tmp_path):
    weights = random_observer(tmp_path, 3)
    cfg = DistillConfig(
        data=str(jpeg_tree),
        out=str(tmp_path / "o"),
        observer="conv3",
        weights=str(weights),
        ipc=1,
        factor=1,
        mipc=4,
        num_crop=2,
        input_size=32,
        workers=0,
        device="cpu",
        format="jpg",
        jpeg_quality=80,
        show_progress=False,
        skip_observer_check=True,
    )
    result = distill(cfg)
    files = list(result.out.rglob("class*.jpg"))
    assert len(files) == 3 and all(Image.open(f).format == "JPEG" for f in files)
    with pytest.raises(UserError, match="holds an earlier rded-fast output"):
        distill(cfg)
    cfg.overwrite = True
    distill(cfg)
    assert not [p for p in (tmp_path / "o").rglob("*.tmp")]  # no temporary files left


def test_bad_inputs_are_skipped_and_listed(tmp_path):
    root = write_synthetic_jpegs(tmp_path / "data", classes=3, per_class=6)
    bad = root / "class_00"
    good = (bad / "img_000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (50, 40), (200, 10, 10)).save(bad / "png_named.JPEG", format="PNG")
    Image.new("CMYK", (48, 48), (10, 200, 30, 0)).save(bad / "cmyk.jpg", format="JPEG")
    Image.new("L", (44, 52), 128).save(bad / "gray.jpg", format="JPEG")
    (bad / "notes.txt").write_text("not an image")
    (bad / "fake.jpg").write_text("not an image either")
    (root / "class_03_empty").mkdir()
    weights = random_observer(tmp_path, 4)
    result = distill(
        DistillConfig(
            data=str(root),
            out=str(tmp_path / "o"),
            observer="conv3",
            weights=str(weights),
            ipc=2,
            factor=1,
            mipc=50,
            num_crop=2,
            input_size=32,
            workers=0,
            device="cpu",
            show_progress=False,
            skip_observer_check=True,
        )
    )
    manifest = json.loads(result.manifest.read_text())
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped_files"]}
    assert set(skipped) == {"empty.jpg", "notes.txt", "fake.jpg"}
    assert "0 bytes" in skipped["empty.jpg"]
    failures = [Path(f["path"]).name for f in manifest["decode_failures"]]
    assert failures == ["truncated.jpg"]
    assert manifest["short_classes"] == {"class_00": 10, "class_01": 6, "class_02": 6, "class_03_empty": 0}
    assert manifest["empty_classes"] == ["class_03_empty"]
    sources = {Path(c["source"]).name for m in manifest["images"] for c in m["cells"]}
    assert "truncated.jpg" not in sources
    assert len(list((result.out / "class_00").glob("*.png"))) == 2
    # CMYK, gray and PNG-as-JPEG decode to RGB through the loader
    for name in ("cmyk.jpg", "gray.jpg", "png_named.JPEG"):
        assert decode_rgb(str(bad / name)).shape[0] == 3


def test_observer_check_refuses_wrong_class_order(fashion_tree, fashion_observer, tmp_path):
    reversed_map = tmp_path / "classes.txt"
    reversed_map.write_text("\n".join(sorted((p.name for p in Path(fashion_tree).iterdir() if p.is_dir()), reverse=True)) + "\n")
    with pytest.raises(UserError, match="near chance.*class-map"):
        distill(fashion_config(fashion_tree, fashion_observer, tmp_path / "o", class_map=str(reversed_map)))
    assert not (tmp_path / "o").exists()
    assert near_chance_threshold(1000, 300) < 0.01


def test_observer_head_smaller_than_classes(jpeg_tree, tmp_path):
    weights = random_observer(tmp_path, 2)
    with pytest.raises(UserError, match="head has 2 outputs but the dataset has 3 classes"):
        distill(
            DistillConfig(
                data=str(jpeg_tree),
                out=str(tmp_path / "o"),
                observer="conv3",
                weights=str(weights),
                input_size=32,
                factor=1,
                ipc=1,
                mipc=2,
                workers=0,
                device="cpu",
                show_progress=False,
            )
        )
