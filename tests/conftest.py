"""Shared fixtures: small real-looking datasets built once per session in temporary folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_synthetic_jpegs(root: Path, classes: int = 3, per_class: int = 8, seed: int = 0, quality: int = 90) -> Path:
    """A tree of smooth random-colour JPEGs of varied sizes (40..72 px a side), one colour theme per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(40, 73)), int(rng.integers(40, 73))
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.array([(c * 80) % 256, (c * 150 + 60) % 256, (c * 40 + 120) % 256], dtype=np.float64)
            img = base + 60 * np.sin(xx[..., None] / (3 + i) + yy[..., None] / (4 + c) + rng.random(3) * 6)
            img += rng.normal(0, 8, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.jpg", quality=quality)
    return root


def write_odd_tree(root: Path, jpeg_tree: Path) -> Path:
    """jpeg_tree plus one of each odd file in class_00: CMYK, gray, progressive, PNG named .jpg,
    truncated and zero-byte JPEGs (named to sort after the normal images)."""
    shutil.copytree(jpeg_tree, root)
    folder = root / "class_00"
    yy, xx = np.mgrid[0:48, 0:56]
    pixels = np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it close
    Image.fromarray(pixels).convert("CMYK").save(folder / "odd_cmyk.jpg", quality=90)
    Image.fromarray(pixels).convert("L").save(folder / "odd_gray.jpg", quality=90)
    Image.fromarray(pixels).save(folder / "odd_progressive.jpg", quality=90, progressive=True)
    Image.fromarray(pixels).save(folder / "odd_png.jpg", format="PNG")
    good = (folder / "img_000.jpg").read_bytes()
    (folder / "odd_truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "odd_zero.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """The decoded-validation cache of the runs under test (rded_fast.train.val_cache) in a temporary folder, not
    the user's ~/.cache; subprocesses inherit it."""
    import os

    folder = tmp_path_factory.mktemp("rded_cache")
    os.environ["RDED_FAST_CACHE"] = str(folder)
    return folder


def age_folders(root: Path, seconds: float = 3600) -> None:
    """Date `root` and every folder below it `seconds` back, as a tree at rest: an index cache then records their
    modification times (a folder changed within RACY_NS of its listing is listed again at the next reuse)."""
    import os
    import time

    when = time.time() - seconds
    for folder in [root, *(p for p in Path(root).rglob("*") if p.is_dir())]:
        os.utime(folder, (when, when))


@pytest.fixture(scope="session")
def jpeg_tree(tmp_path_factory) -> Path:
    return write_synthetic_jpegs(tmp_path_factory.mktemp("jpeg_tree"))


@pytest.fixture(scope="session")
def fashion_tree(tmp_path_factory) -> Path:
    """Real data: 10 Fashion-MNIST classes x 60 training images as 32x32 RGB PNGs."""
    from rded_fast.data import fashion_mnist

    root = tmp_path_factory.mktemp("fashion") / "train"
    return fashion_mnist.write_image_folder(root, "train", per_class=60, show_progress=False)


@pytest.fixture(scope="session")
def fashion_observer(tmp_path_factory) -> Path:
    """A Conv3 observer trained on 200 Fashion-MNIST images per class for 2 epochs (once per session: it is slow)."""
    from rded_fast.data import fashion_mnist
    from rded_fast.train.observer import ObserverConfig, train_observer

    base = tmp_path_factory.mktemp("observer")
    train = fashion_mnist.write_image_folder(base / "train200", "train", per_class=200, show_progress=False)
    ckpt = base / "conv3.pth"
    train_observer(
        ObserverConfig(data=str(train), out=str(ckpt), arch="conv3", input_size=32, epochs=2, device="cpu", show_progress=False)
    )
    return ckpt


@pytest.fixture(scope="session")
def factor2_distilled(fashion_tree, fashion_observer, tmp_path_factory):
    """A small RDED set at factor 2 (Fashion-MNIST, IPC 2, 32 px), made once; tests only read it."""
    from rded_fast.distill import DistillConfig, distill

    out = tmp_path_factory.mktemp("distilled") / "set"
    distill(
        DistillConfig(
            data=str(fashion_tree),
            out=str(out),
            observer="conv3",
            weights=str(fashion_observer),
            ipc=2,
            factor=2,
            mipc=20,
            num_crop=2,
            input_size=32,
            workers=0,
            device="cpu",
            show_progress=False,
        )
    )
    return out


@pytest.fixture
def small(tmp_path):
    """2 classes x 4 JPEGs in `tmp_path/data` and a random conv3 checkpoint `tmp_path/w.pth` (runs that use it
    skip the observer check)."""
    import torch

    from rded_fast.models import build

    data = write_synthetic_jpegs(tmp_path / "data", classes=2, per_class=4)
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save({"model": build("conv3", 2, None, 32).model.state_dict()}, weights)
    return data, weights


def kill_when(cmd: list[str], ready, cwd: Path, timeout: float = 240) -> int:
    """Start `cmd`, SIGKILL it as soon as `ready()` is true, return its exit code (-9 when killed)."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    return proc.wait()


def crash_after(real, calls: int):
    """Wrap `real` so that its `calls`-th call completes and then raises KeyboardInterrupt (a simulated kill)."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        real(*args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt

    return wrapped


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planned_sources(index, plan) -> tuple[list[str], list, list]:
    """What a plan asks a loader for, independent of the index's numbering: each row's path, size and boxes."""
    ids = plan.image_ids
    return [index.paths[i] for i in ids], index.sizes[ids].tolist(), plan.boxes.tolist()


# ---- helpers shared by several test modules ---------------------------------------------------------------------

# The DALI loader against the torch loader on the same planned boxes, grey levels (tests/test_dali.py's docstring):
# largest, mean, 99th percentile.
DALI_MAX_DIFF, DALI_MEAN_DIFF, DALI_P99_DIFF = 8, 0.5, 2


def fashion_config(tree, observer, out, **kw):
    """A DistillConfig of the Fashion-MNIST tree with the conv3 `observer` (IPC 10, factor 1, 32 px, CPU), `kw` over it."""
    from rded_fast.distill import DistillConfig

    base = dict(
        data=str(tree),
        out=str(out),
        observer="conv3",
        weights=str(observer),
        ipc=10,
        factor=1,
        mipc=60,
        num_crop=5,
        input_size=32,
        seed=0,
        batch_size=64,
        workers=0,
        device="cpu",
        show_progress=False,
    )
    base.update(kw)
    return DistillConfig(**base)


def random_observer(tmp_path, classes, size=32):
    """An untrained conv3 checkpoint: for pipeline mechanics only (observer check skipped)."""
    import torch

    from rded_fast.models import build

    torch.manual_seed(0)
    path = tmp_path / "random_conv3.pth"
    torch.save({"model": build("conv3", classes, None, size).model.state_dict()}, path)
    return path


def _distill_argv(data, weights, out, *extra):
    """The smallest distill command line (IPC 1, factor 1, 32 px, CPU, no observer check) with `extra` after it."""
    return [
        "distill",
        "--data",
        str(data),
        "--observer",
        "conv3",
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--input-size",
        "32",
        "--factor",
        "1",
        "--ipc",
        "1",
        "--mipc",
        "4",
        "--num-crop",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--skip-observer-check",
        "--quiet",
        *extra,
    ]


def _one_line_error(capsys) -> str:
    """The captured stderr, checked to be one line and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below `root` (links not followed) -> sha256 of its bytes: to prove nothing changed."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _relabel_argv(distilled: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    fixed = "--teacher conv3 --epochs 1 --device cpu --quiet --skip-teacher-check".split()  # the checkpoint is random
    return ["relabel", "--distilled", str(distilled), "--teacher-weights", str(weights), "--out", str(out), *fixed, *extra]


def distill_args(data, ckpt, out, *extra):
    """A small distill command line (IPC 2, factor 2, 32 px, batches of 5, CPU, no observer check) with `extra`."""
    return [
        "distill",
        "--data",
        str(data),
        "--observer",
        "conv3",
        "--weights",
        str(ckpt),
        "--out",
        str(out),
        "--input-size",
        "32",
        "--factor",
        "2",
        "--ipc",
        "2",
        "--mipc",
        "8",
        "--num-crop",
        "3",
        "--workers",
        "0",
        "--batch-size",
        "5",
        "--device",
        "cpu",
        "--skip-observer-check",
        "--quiet",
        *extra,
    ]


def output_files(out: Path) -> dict[str, bytes]:
    """Every output byte, the manifest without its run section (timestamps, timings, world size)."""
    import json

    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            rel = str(p.relative_to(out))
            if rel == "manifest.json":
                m = json.loads(p.read_text())
                m.pop("run")
                files[rel] = json.dumps(m, sort_keys=True).encode()
            else:
                files[rel] = p.read_bytes()
    return files


def _run_loader(loader, n_rows: int, batch_size: int, reasons: dict | None = None):
    """Every batch of `loader` gathered by plan row: (rows in yield order, crops [M, K, 3, p, p], ok [M]);
    failed rows' reasons go into `reasons` when given."""
    import torch

    rows, crops, ok = [], None, None
    for batch in loader:
        assert set(batch.reasons) == set(batch.rows[~batch.ok].tolist())  # a reason for every failed row, no other
        if reasons is not None:
            reasons.update(batch.reasons)
        assert batch.crops.dtype == torch.uint8 and len(batch.rows) <= batch_size
        if crops is None:
            crops = torch.zeros((n_rows, *batch.crops.shape[1:]), dtype=torch.uint8)
            ok = torch.zeros(n_rows, dtype=torch.bool)
        rows += batch.rows.tolist()
        crops[batch.rows] = batch.crops.cpu()
        ok[batch.rows] = batch.ok
    return rows, crops, ok


def _crop_diff(a, b) -> tuple[int, float, float]:
    """Largest, mean and 99th-percentile |a - b| of two uint8 crop tensors, in grey levels."""
    d = (a.int() - b.int()).abs().float()
    return int(d.max()), float(d.mean()), float(d.flatten().quantile(0.99))
