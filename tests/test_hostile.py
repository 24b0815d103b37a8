"""Hostile input: links, odd names, decompression bombs, 16-bit and EXIF-rotated images, resumable training."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rded_fast.decode import decode_rgb_array
from rded_fast.distill import DistillConfig, distill
from rded_fast.formats.folder import build_index
from rded_fast.models import build
from tests.conftest import crash_after, write_synthetic_jpegs


def _bomb_header(path: Path) -> None:
    """A small JPEG whose SOF0 header claims 20000 x 20000 pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") + (20000).to_bytes(2, "big")
    path.write_bytes(bytes(data))


@pytest.fixture
def hostile_tree(tmp_path):
    root = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=5)
    c0 = root / "class_00"
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (50, 50)).save(outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", c0 / "escape.jpg")  # file link out of the root
    os.symlink(outside, c0 / "escape_dir")  # folder link out of the root
    os.symlink("..", c0 / "loop")  # folder loop
    os.symlink(c0 / "b.jpg", c0 / "a.jpg")  # file link loop
    os.symlink(c0 / "a.jpg", c0 / "b.jpg")
    os.symlink(c0 / "img_000.jpg", c0 / "inside_link.jpg")  # a link inside the root is fine
    os.symlink(outside, root / "class_99_link")  # a class folder behind a link
    for name in ("with space.jpg", "ünïcödé_图.jpg", "new\nline.jpg"):
        Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(c0 / name)
    _bomb_header(c0 / "bomb.jpg")
    return root


def test_links_are_not_followed_and_odd_names_work(hostile_tree, tmp_path):
    index = build_index(hostile_tree, show_progress=False)
    assert index.classes == ["class_00", "class_01"]
    skipped = {s["path"]: s["reason"] for s in index.skipped}
    assert skipped["class_00/escape.jpg"].startswith("symlink to outside")
    assert skipped["class_00/escape_dir"] == "symlinked folder not followed"
    assert skipped["class_00/loop"] == "symlinked folder not followed"
    assert skipped["class_00/a.jpg"] == skipped["class_00/b.jpg"] == "broken or looping symlink"
    assert skipped["class_99_link"] == "symlinked class folder not followed"
    assert "too large" in skipped["class_00/bomb.jpg"]
    assert {"class_00/with space.jpg", "class_00/ünïcödé_图.jpg", "class_00/new\nline.jpg", "class_00/inside_link.jpg"} <= set(
        index.paths
    )
    ckpt = tmp_path / "c.pth"
    torch.manual_seed(0)
    torch.save(build("conv3", 2, None, 32).model.state_dict(), ckpt)
    # ipc 9 = every usable image of class_00 (5 + 1 link + 3 odd names), so all of them must be used
    r = distill(
        DistillConfig(
            data=str(hostile_tree),
            out=str(tmp_path / "o"),
            observer="conv3",
            weights=str(ckpt),
            ipc=9,
            factor=1,
            mipc=20,
            num_crop=1,
            input_size=32,
            workers=0,
            device="cpu",
            skip_observer_check=True,
            show_progress=False,
        )
    )
    manifest = json.loads(r.manifest.read_text())
    sources = {c["source"] for m in manifest["images"] for c in m["cells"]}
    assert "class_00/new\nline.jpg" in sources and "class_00/ünïcödé_图.jpg" in sources
    assert not any("secret" in s for s in sources) and len(sources) == 9
    assert "class_01" in manifest["skipped_classes"]  # 5 images cannot fill 9 cells


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(3, 0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    rgb = decode_rgb_array(tmp_path / "deep.png")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_rotation_is_not_applied(tmp_path):
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    (tmp_path / "c").mkdir()
    image.save(tmp_path / "c" / "rot.jpg", exif=exif.tobytes(), quality=95)
    index = build_index(tmp_path, show_progress=False)
    assert index.sizes.tolist() == [[60, 40]]  # stored width x height
    assert decode_rgb_array(tmp_path / "c" / "rot.jpg").shape == (40, 60, 3)


def test_observer_training_resumes_to_identical_weights(fashion_tree, tmp_path, monkeypatch):
    from rded_fast.train import checkpoint
    from rded_fast.train.observer import ObserverConfig, train_observer

    cfg = dict(data=str(fashion_tree), arch="conv3", input_size=32, epochs=3, batch_size=100, device="cpu", show_progress=False)
    train_observer(ObserverConfig(out=str(tmp_path / "full.pth"), **cfg))
    real = checkpoint.save_state
    monkeypatch.setattr(checkpoint, "save_state", crash_after(real, 1))  # killed right after epoch 0's checkpoint
    with pytest.raises(KeyboardInterrupt):
        train_observer(ObserverConfig(out=str(tmp_path / "part.pth"), **cfg))
    assert not (tmp_path / "part.pth").exists()
    train_observer(ObserverConfig(out=str(tmp_path / "part.pth"), resume=True, **cfg))
    a = torch.load(tmp_path / "full.pth")["model"]
    b = torch.load(tmp_path / "part.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_student_training_resumes_to_identical_result(fashion_tree, fashion_observer, tmp_path, monkeypatch):
    from rded_fast.train import checkpoint
    from rded_fast.train.student import StudentConfig, evaluate

    distilled = tmp_path / "d"
    distill(
        DistillConfig(
            data=str(fashion_tree),
            out=str(distilled),
            observer="conv3",
            weights=str(fashion_observer),
            ipc=2,
            factor=1,
            mipc=10,
            num_crop=2,
            input_size=32,
            workers=0,
            device="cpu",
            show_progress=False,
        )
    )
    base = dict(
        distilled=str(distilled),
        teacher="conv3",
        teacher_weights=str(fashion_observer),
        val=str(fashion_tree),
        student="conv3",
        epochs=4,
        device="cpu",
        show_progress=False,
    )
    full = evaluate(StudentConfig(**base))
    real = checkpoint.save_state
    monkeypatch.setattr(checkpoint, "save_state", crash_after(real, 2))
    with pytest.raises(KeyboardInterrupt):
        evaluate(StudentConfig(**base, checkpoint=str(tmp_path / "s.state")))
    monkeypatch.setattr(checkpoint, "save_state", real)
    resumed = evaluate(StudentConfig(**base, checkpoint=str(tmp_path / "s.state"), resume=True))
    assert resumed["epoch_loss"] == full["epoch_loss"]
    assert resumed["final_top1"] == full["final_top1"]


def test_a_models_weights_given_as_checkpoint_are_refused_and_kept(factor2_distilled, fashion_observer, fashion_tree, tmp_path):
    """Each epoch replaces --checkpoint; a file that is no training state of ours (here: an observer's weights, a
    torch.save zip like ours) is refused before any training, and left as it was."""
    import shutil

    from rded_fast.errors import UserError
    from rded_fast.train.student import StudentConfig, evaluate

    weights = tmp_path / "observer.pth"
    shutil.copy(fashion_observer, weights)
    before = weights.read_bytes()
    cfg = StudentConfig(
        distilled=str(factor2_distilled), teacher="conv3", teacher_weights=str(fashion_observer), val=str(fashion_tree),
        student="conv3", epochs=1, device="cpu", show_progress=False, checkpoint=str(weights),
    )  # fmt: skip
    with pytest.raises(UserError, match="not a training state of rded-fast"):
        evaluate(cfg)
    assert weights.read_bytes() == before
