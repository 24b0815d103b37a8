"""The tvjpeg loader (torchvision's JPEG decoder on the scoring device) and its exact batched crop arithmetic.

On a CPU torchvision's `decode_jpeg` and PIL run the same libjpeg-turbo and give the same pixels, so the
crops differ from the torch loader's only by the resize: measured max 1 grey level, mean 0.14-0.16, p99 1
(random images and boxes, 24-112 px crops). Asserted: max <= 1, mean <= 0.25. On CUDA nvJPEG's IDCT and
chroma upsampling round differently from libjpeg-turbo: the GPU tests below hold it to the project's GPU
tolerance (tests/test_gpu.py: mean <= 1.5, p99 <= 8) and print what they measure.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rded_fast.cli import main
from rded_fast.converters.shards import convert as convert_shards
from rded_fast.jpeg_check import JpegFrame, frame_header
from rded_fast.loaders import make_loader, open_source, resolve_loader
from rded_fast.loaders.box_resize import WEIGHT_BITS, axis_weights
from rded_fast.loaders.tvjpeg_loader import TvJpegCropLoader, on_device
from rded_fast.models import build
from rded_fast.plan import make_plan
from tests.conftest import kill_when, planned_sources, write_odd_tree, write_synthetic_jpegs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates its decoders
ROOT = Path(__file__).resolve().parents[1]
MAX_DIFF, MEAN_DIFF = 1, 0.25  # CPU: against the torch loader's crops of the same boxes
GPU_MEAN_DIFF, GPU_P99_DIFF = 1.5, 8  # CUDA: nvJPEG against libjpeg-turbo (as tests/test_gpu.py)


def needs_cuda(test):
    """Marked `gpu` (run by `pytest -m gpu`) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def test_axis_weights_are_integers_summing_to_one_inside_the_box():
    start, length = torch.tensor([[3, 0, 10]]), torch.tensor([[40, 7, 1]])
    w = axis_weights(start, length, 64, 12)
    assert w.shape == (1, 3, 12, 64)
    assert torch.equal(w, w.round()) and (w >= 0).all()
    assert (w.sum(-1) == 2**WEIGHT_BITS).all()
    assert not w[0, 0, :, :3].any() and not w[0, 0, :, 43:].any()  # nothing outside rows 3..42
    assert (w[0, 2, :, 10] == 2**WEIGHT_BITS).all()  # a 1-pixel box: that pixel everywhere
    assert torch.equal(axis_weights(start, length, 100, 12)[..., :64], w)  # padding changes nothing


def _jpeg(pixels: np.ndarray, mode: str = "RGB", **options) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


def _twelve_bit(data: bytes) -> bytes:
    """The same JPEG with its frame header claiming 12-bit samples (structurally whole; PIL cannot decode it)."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 4] + bytes([12]) + data[sof + 5 :]


def test_frame_header_routes_only_plain_baseline_jpegs_to_the_device():
    pixels = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    base = _jpeg(pixels)
    frame = frame_header(base)
    assert (frame.marker, frame.precision, frame.height, frame.width, frame.components) == (0xC0, 8, 24, 40, (1, 2, 3))
    assert on_device(frame) and on_device(frame_header(_jpeg(pixels, subsampling=0)))
    others = {
        "progressive": _jpeg(pixels, progressive=True),
        "cmyk": _jpeg(pixels, "CMYK"),
        "gray": _jpeg(pixels, "L"),
        "12-bit": _twelve_bit(base),
    }
    assert not any(on_device(frame_header(data)) for data in others.values())
    assert frame_header(others["cmyk"]).adobe_transform == 0 and frame_header(others["12-bit"]).precision == 12
    rgb_coded = JpegFrame(0xC0, 8, 24, 40, (ord("R"), ord("G"), ord("B")), None)
    assert not on_device(rgb_coded) and not on_device(JpegFrame(0xC0, 8, 24, 40, (1, 2, 3), 0))
    assert frame_header(b"\xff\xd8\xff\xd9") is None and frame_header(base[:8]) is None


def _add_hostile_files(root: Path) -> None:
    """More odd files in class_01: 12-bit, a quantisation table id nvJPEG and PIL both refuse, and a marker
    written into the middle of the image data (PIL may decode it; its structure is broken)."""
    folder = root / "class_01"
    good = (folder / "img_000.jpg").read_bytes()
    (folder / "odd_12bit.jpg").write_bytes(_twelve_bit(good))
    (folder / "odd_badtable.jpg").write_bytes(good.replace(b"\xff\xdb\x00\x43\x00", b"\xff\xdb\x00\x43\x05", 1))
    scan = good.index(b"\xff\xda") + 40
    (folder / "odd_marker_inside.jpg").write_bytes(good[:scan] + b"\xff\x12" + good[scan + 2 :])


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory, jpeg_tree) -> Path:
    root = write_odd_tree(tmp_path_factory.mktemp("tvjpeg") / "tree", jpeg_tree)
    _add_hostile_files(root)
    return root


def _gather(loader, n_rows: int):
    """(rows in yield order, crops [n, K, 3, p, p] on the CPU, ok [n], reasons) over a whole pass."""
    rows, crops, ok, reasons = [], None, torch.zeros(n_rows, dtype=torch.bool), {}
    for batch in loader:
        assert set(batch.reasons) == set(batch.rows[~batch.ok].tolist())  # a reason for every failed row
        assert not batch.crops[~batch.ok].any()
        if crops is None:
            crops = torch.zeros((n_rows, *batch.crops.shape[1:]), dtype=torch.uint8)
        rows += batch.rows.tolist()
        crops[batch.rows] = batch.crops.cpu()
        ok[batch.rows] = batch.ok
        reasons.update(batch.reasons)
    return rows, crops, ok, reasons


def _file_names(index, plan) -> list[str]:
    """The file name of each plan row's image."""
    return [Path(index.paths[int(i)]).name for i in plan.image_ids]


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_tvjpeg_cuts_the_torch_loaders_boxes_and_names_every_bad_file(hostile_tree, tmp_path, source):
    data = str(hostile_tree)
    if source == "shards":
        data = str(tmp_path / "shards")
        convert_shards(str(hostile_tree), data, shard_size="24KB", workers=2, show_progress=False)
    torch_source = open_source("torch", str(hostile_tree), show_progress=False)
    torch_index = torch_source.index
    torch_plan = make_plan(torch_index, seed=3, mipc=20, num_crop=3)
    opened = open_source("tvjpeg", data, show_progress=False)
    index = opened.index
    plan = make_plan(index, seed=3, mipc=20, num_crop=3)
    assert planned_sources(index, plan) == planned_sources(torch_index, torch_plan)  # the same images and boxes
    files = _file_names(index, plan)
    names = {name: r for r, name in enumerate(files) if name.startswith("odd_")}
    _, ref, ref_ok, ref_reasons = _gather(make_loader("torch", torch_source, torch_plan, 24, batch_size=7, workers=0), len(plan))
    loader = make_loader("tvjpeg", opened, plan, 24, batch_size=7, workers=3)
    assert isinstance(loader, TvJpegCropLoader) and len(loader) == math.ceil(len(plan) / 7)
    rows, got, ok, reasons = _gather(loader, len(plan))
    assert rows == list(range(len(plan)))  # plan order, every row once
    failed = {files[r] for r in range(len(plan)) if not ok[r]}
    assert failed == {"odd_truncated.jpg", "odd_12bit.jpg", "odd_badtable.jpg", "odd_marker_inside.jpg"}
    assert torch.equal(ok, ref_ok)  # PIL cannot decode the marker written inside the image data either
    if source == "folder":
        for name in ("odd_12bit.jpg", "odd_badtable.jpg"):  # refused by PIL (and the bad table by the decoder first)
            assert reasons[names[name]] == ref_reasons[names[name]]
        assert reasons[names["odd_marker_inside.jpg"]].startswith("corrupt JPEG structure: invalid marker 0xFF12")
        assert reasons[names["odd_truncated.jpg"]].startswith("corrupt JPEG structure: image data has no end marker")
        # CMYK, gray, progressive and the PNG named .jpg are PIL's; the bad table went to the decoder, then to PIL
        assert loader.counts == {"device": len(plan) - 8, "pil": 4, "failed": 4, "device_refused": 1}
        same = ok
    else:  # the converter left out what PIL cannot decode, and re-encoded the CMYK and PNG files as baseline JPEGs
        assert all(reasons[names[n]].startswith("left out at convert time") for n in failed)
        assert loader.counts == {"device": len(plan) - 6, "pil": 2, "failed": 4}
        same = ok & torch.tensor([name not in ("odd_cmyk.jpg", "odd_png.jpg") for name in files])
    d = (got[same].int() - ref[same].int()).abs().float()
    print(f"\n{source}: {int(same.sum())} images x 3 crops, tvjpeg vs torch: max {int(d.max())}, mean {float(d.mean()):.3f}")
    assert int(d.max()) <= MAX_DIFF and float(d.mean()) <= MEAN_DIFF


@pytest.fixture(scope="module")
def plain(jpeg_tree):
    source = open_source("tvjpeg", str(jpeg_tree), show_progress=False)
    return source, make_plan(source.index, seed=1, mipc=8, num_crop=2)


def test_same_bytes_across_batch_sizes_workers_and_read_ahead(plain):
    source, plan = plain
    runs = [
        _gather(TvJpegCropLoader(source, plan, 20, batch_size=b, workers=w, prefetch=f), len(plan))[1]
        for b, w, f in [(5, 2, 2), (1, 1, 1), (64, 3, 4), (7, 2, 1)]
    ]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])


def test_an_image_the_device_refuses_costs_that_image_alone(plain, monkeypatch):
    """A batch call that fails is retried image by image; the image refused alone is decoded by PIL (on a CPU the
    same pixels), and the batch's other images keep the device decoder."""
    source, plan = plain
    index = source.index
    expected = _gather(TvJpegCropLoader(source, plan, 20, batch_size=6, workers=2), len(plan))[1]
    victim = (Path(index.root) / index.paths[int(plan.image_ids[8])]).read_bytes()
    real, calls = TvJpegCropLoader._decode_call, []

    def refusing(self, encoded):
        calls.append(len(encoded))
        if any(bytes(e.numpy()) == victim for e in encoded):
            raise RuntimeError("nvjpeg refuses this one")
        return real(self, encoded)

    monkeypatch.setattr(TvJpegCropLoader, "_decode_call", refusing)
    loader = TvJpegCropLoader(source, plan, 20, batch_size=6, workers=2)
    _, got, ok, _ = _gather(loader, len(plan))
    assert ok.all() and torch.equal(got, expected)
    assert loader.counts == {"device": len(plan) - 1, "pil": 1, "device_refused": 1, "failed": 0}
    assert calls.count(1) == 6 and calls.count(6) == len(plan) // 6  # the refused batch again, one image at a time


def test_decoding_stays_a_bounded_distance_ahead_and_stops_with_the_consumer(plain, monkeypatch):
    source, plan = plain
    cut, real = [], TvJpegCropLoader._cut
    monkeypatch.setattr(TvJpegCropLoader, "_cut", lambda self, *a: cut.append(1) or real(self, *a))
    loader = TvJpegCropLoader(source, plan, 20, batch_size=2, workers=2, prefetch=2)
    assert len(loader) > 8
    taken = 0
    for _ in loader:
        taken += 1
        time.sleep(0.2)  # a slow consumer: the decoding thread waits instead of running ahead
        assert len(cut) <= taken + loader.prefetch + 1
        if taken == 3:
            break
    assert not [t for t in threading.enumerate() if t.name.startswith("tvjpeg")]  # decoding and reader threads ended
    assert len(cut) <= 3 + loader.prefetch + 1


def test_an_error_in_the_decoding_thread_reaches_the_consumer(plain, monkeypatch):
    source, plan = plain

    def broken(*args, **kwargs):
        raise MemoryError("out of device memory")

    monkeypatch.setattr("rded_fast.loaders.tvjpeg_loader.resize_boxes", broken)
    with pytest.raises(MemoryError, match="out of device memory"):
        list(TvJpegCropLoader(source, plan, 20, batch_size=4, workers=2))
    assert not [t for t in threading.enumerate() if t.name.startswith("tvjpeg")]


def test_auto_takes_tvjpeg_on_cuda_when_dali_is_absent(jpeg_tree, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    assert resolve_loader("auto", str(jpeg_tree), "cpu") == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nvidia.dali" else real(name, *a))
    assert resolve_loader("auto", str(jpeg_tree), "cuda") == "tvjpeg"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "nvidia.dali" else real(name, *a))
    assert resolve_loader("auto", str(jpeg_tree), "cuda") == "dali"
    assert resolve_loader("tvjpeg", str(jpeg_tree), "cpu") == "tvjpeg"


def test_distill_with_tvjpeg_same_bytes_across_runs_batch_sizes_and_resume(tmp_path):
    from tests.conftest import distill_args, output_files

    data = write_synthetic_jpegs(tmp_path / "data", classes=6, per_class=8, seed=4)
    ckpt = tmp_path / "conv3.pth"
    torch.manual_seed(0)
    torch.save({"model": build("conv3", 6, None, 32).model.state_dict()}, ckpt)

    def args(out: str, batch: int, *extra: str) -> list[str]:
        return distill_args(
            data, ckpt, tmp_path / out, "--loader", "tvjpeg", "--workers", "2", "--batch-size", str(batch), *extra
        )

    def result(out: str) -> dict[str, bytes]:
        """The images' bytes and the manifest's images (cells, sources, boxes, scores); not the run's parameters."""
        files = output_files(tmp_path / out)
        return {k: v for k, v in files.items() if k.endswith(".png")} | {
            "cells": json.dumps(json.loads(files["manifest.json"])["images"]).encode()
        }

    assert main(args("a", 5)) == 0 and main(args("b", 8)) == 0
    a = result("a")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["parameters"]["loader"] == "tvjpeg"
    assert len([k for k in a if k.endswith(".png")]) == 13  # 12 images and the contact sheet
    assert result("b") == a
    journal = tmp_path / "killed" / ".rded-journal"
    code = kill_when(
        [sys.executable, "-m", "rded_fast.cli", *args("killed", 5)],
        lambda: journal.is_dir() and len(list(journal.glob("class_*.json"))) >= 2,
        ROOT,
    )
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert main(args("killed", 5, "--resume")) == 0
    assert result("killed") == a


@pytest.fixture(scope="module")
def gpu_case(tmp_path_factory):
    tree = write_synthetic_jpegs(tmp_path_factory.mktemp("gpu_tvjpeg"), classes=24, per_class=8, seed=5)
    source = open_source("tvjpeg", str(tree), show_progress=False)
    return source, make_plan(source.index, 0, 8, 3)


def _cuda_crops(source, plan, **options) -> torch.Tensor:
    loader = TvJpegCropLoader(source, plan, 32, device="cuda", **{"batch_size": 16, "workers": 4, **options})
    crops = [b.crops.clone() for b in loader]
    assert all(c.is_cuda for c in crops) and loader.counts["device"] == len(plan)
    return torch.cat(crops).cpu()


@needs_cuda
def test_gpu_crops_match_the_cpu_crops_and_bad_files_fail_alike(gpu_case, hostile_tree):
    source, plan = gpu_case
    gpu = _cuda_crops(source, plan)
    cpu = torch.cat([b.crops for b in make_loader("torch", source, plan, 32, batch_size=16, workers=2)])
    d = (gpu.int() - cpu.int()).abs().float()
    mean, p99 = float(d.mean()), float(d.flatten().quantile(0.99))
    print(f"\ntvjpeg cuda vs torch (PIL) cpu: mean {mean:.3f}, p99 {p99:.1f}, max {int(d.max())}")
    assert mean <= GPU_MEAN_DIFF and p99 <= GPU_P99_DIFF
    hostile_source = open_source("tvjpeg", str(hostile_tree), show_progress=False)
    hostile = hostile_source.index
    hplan = make_plan(hostile, seed=3, mipc=20, num_crop=3)
    files = _file_names(hostile, hplan)
    failed = {}
    for device in ("cpu", "cuda"):
        loader = TvJpegCropLoader(hostile_source, hplan, 24, batch_size=7, workers=3, device=device)
        failed[device] = {files[r] for r in _gather(loader, len(hplan))[3]}
        print(f"{device}: failed {sorted(failed[device])}, counts {dict(loader.counts)}")
    # nvJPEG may decode the file whose table id libjpeg refuses; every other bad file fails alike
    assert failed["cuda"] in (failed["cpu"], failed["cpu"] - {"odd_badtable.jpg"})


@needs_cuda
def test_gpu_same_bytes_across_runs_batch_sizes_and_a_busy_consumer(gpu_case):
    source, plan = gpu_case
    a = _cuda_crops(source, plan)
    assert torch.equal(_cuda_crops(source, plan), a)
    assert torch.equal(_cuda_crops(source, plan, batch_size=7, workers=2, prefetch=1), a)
    # the consumer queues long work on its stream and frees memory that work still reads, between batches:
    # the pattern in which nvJPEG's hardware engine overwrote live memory (pytorch/vision#9606)
    loader = TvJpegCropLoader(source, plan, 32, batch_size=16, workers=4, device="cuda")
    busy, x = [], torch.randn(2048, 2048, device="cuda")
    for batch in loader:
        for _ in range(8):
            x = torch.tanh(x @ x)
        scratch = [torch.full((1 << 20,), float(i), device="cuda") for i in range(8)]
        sums = [s.sum() for s in scratch]
        del scratch
        busy.append(batch.crops.clone())
        assert all(float(s) == i * (1 << 20) for i, s in enumerate(sums))
    assert torch.equal(torch.cat(busy).cpu(), a)


@needs_cuda
def test_gpu_memory_stays_bounded_over_repeated_passes(gpu_case):
    source, plan = gpu_case
    loader = TvJpegCropLoader(source, plan, 32, batch_size=16, workers=4, device="cuda", prefetch=2)
    torch.cuda.synchronize()
    base, peaks, free = torch.cuda.memory_allocated(), [], []
    for _ in range(4):
        torch.cuda.reset_peak_memory_stats()
        for _batch in loader:
            pass
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        free.append(torch.cuda.mem_get_info()[0])
        assert torch.cuda.memory_allocated() - base < 2**20  # nothing outlives a pass
    print(f"\npeak MiB per pass {[round(p / 2**20, 1) for p in peaks]}, free MiB {[f // 2**20 for f in free]}")
    assert max(peaks[1:]) <= peaks[0] * 1.1 + 2**20  # no growth from pass to pass
    assert peaks[0] < 512 * 2**20  # 16-image batches of ~60 px images: a few batches and one chunk's buffers
    assert min(free[1:]) >= free[1] - 64 * 2**20  # nor in memory outside torch's allocator (nvJPEG's own buffers)


def test_tv_decode_benchmark_runs_every_row_on_the_cpu(jpeg_tree, tmp_path):
    """The GPU suite's `tvjpeg` step, on a CPU and a tiny tree: every row runs and reports a rate."""
    from rded_fast.benchmarks.tv_decode import tv_decode

    shutil.copytree(jpeg_tree, tmp_path / "tree")
    convert_shards(str(tmp_path / "tree"), str(tmp_path / "shards"), workers=2, show_progress=False)
    result = tv_decode(tmp_path, device="cpu", crop_size=16, num_crop=2, batch_size=8, workers=2)
    assert result["images"] == 24
    for name in ("decode_only", "decode_crop", "tvjpeg_folder", "tvjpeg_folder_batch64", "tvjpeg_shards", "dali_folder"):
        assert result[name].get("img_per_s", 0) > 0 or "unavailable" in result[name], (name, result[name])
    assert result["tvjpeg_folder"]["counts"] == {"device": 24, "failed": 0} == result["tvjpeg_shards"]["counts"]
