"""The host side of throughput: the host stage, batched durable writes, class regrouping by slices, the
batched observer check, warmed and long-lived compiled scorers, and the `auto` defaults."""

import errno
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_many
from rded_fast.host import HostStage
from rded_fast.loaders.base import BufferRing, CropBatch


def test_host_stage_commits_in_order_in_batches_and_overlaps():
    committed, batches = [], []

    def prepare(i):
        def run():
            time.sleep(0.02 if i % 2 else 0.0)  # out-of-order completion in the pool
            return i

        return run

    def commit(items):
        batches.append(len(items))
        committed.extend(items)

    t = time.perf_counter()
    with HostStage(commit, workers=3, depth=4) as host:
        for i in range(12):
            host.submit(prepare(i))
        submitted = time.perf_counter() - t
    assert committed == list(range(12))
    assert sum(batches) == 12
    assert submitted < 0.12 * 12 / 2  # submit does not run the work on the caller's thread


def test_host_stage_error_stops_later_commits_and_reaches_the_caller():
    committed = []

    def commit(items):
        if any(i == 3 for i in items):
            raise OSError(errno.ENOSPC, "No space left on device")
        committed.extend(items)

    with pytest.raises(OSError, match="No space"):
        with HostStage(commit, workers=1, depth=1, max_batch=1) as host:
            for i in range(8):
                host.submit(lambda i=i: i)
    assert committed == [0, 1, 2]


def test_host_stage_bounds_classes_in_flight():
    release, running = threading.Event(), []

    def slow():
        running.append(1)
        release.wait(5)
        return 0

    host = HostStage(lambda items: None, workers=1, depth=2)
    blocked = threading.Thread(target=lambda: [host.submit(slow) for _ in range(5)])
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive()  # the queue is full: submit waits instead of piling up classes in memory
    release.set()
    blocked.join(5)
    host.close()
    assert len(running) == 5 and host.waited > 0


def test_atomic_write_many_is_complete_or_absent(tmp_path):
    items = [(tmp_path / "a" / f"f{i}.bin", bytes([i]) * 1000) for i in range(5)]
    atomic_write_many(items)
    assert all(p.read_bytes() == data for p, data in items)
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(OSError):  # the second folder cannot be made: nothing of the batch may be left behind
        atomic_write_many([(tmp_path / "b" / "ok.bin", b"1"), (blocker / "sub" / "bad.bin", b"2")])
    assert not (tmp_path / "b" / "ok.bin").exists()
    assert not list(tmp_path.rglob("*.tmp"))


class _OneBufferLoader:
    """Yields batches of uneven sizes from ONE buffer, rewritten for every batch (the harshest reuse)."""

    def __init__(self, crops, ok, sizes):
        self.crops, self.ok, self.sizes = crops, ok, sizes
        self.buffer = torch.empty((max(sizes), *crops.shape[1:]), dtype=crops.dtype)

    def __iter__(self):
        pos = 0
        for n in self.sizes:
            self.buffer[:n] = self.crops[pos : pos + n]
            rows = torch.arange(pos, pos + n)
            yield CropBatch(
                rows=rows,
                crops=self.buffer[:n],
                ok=self.ok[pos : pos + n],
                reasons={int(r): f"bad row {int(r)}" for r in rows[~self.ok[pos : pos + n]]},
            )
            pos += n


def test_iter_classes_regroups_by_slices_even_from_a_reused_buffer():
    from rded_fast.class_stage import iter_classes
    from rded_fast.plan import CropPlan

    labels = np.array([4, 4, 4, 0, 0, 7, 7, 7, 7, 7, 2], np.int64)  # contiguous classes, any order
    plan = CropPlan(np.arange(11), labels, np.zeros((11, 2, 4), np.int64), 0, 5, 2, (0.08, 1.0), (1.0, 1.0))
    crops = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1, 1).expand(11, 2, 3, 2, 2).contiguous()
    ok = torch.tensor([True] * 5 + [False] + [True] * 5)
    got = list(iter_classes(_OneBufferLoader(crops, ok, [2, 4, 1, 3, 1]), plan))
    assert [g[0] for g in got] == [4, 0, 7, 2]
    start = 0
    for label, class_crops, class_ok, reasons in got:
        n = int((labels == label).sum())
        assert torch.equal(class_crops, crops[start : start + n]) and torch.equal(class_ok, ok[start : start + n])
        assert reasons == ({5: "bad row 5"} if label == 7 else {})  # each class gets its own failed rows' reasons
        start += n


def test_buffer_ring_rotates_buffers_made_once():
    ring = BufferRing(3, pin=False)
    first = [ring.take((4, 2)).data_ptr() for _ in range(3)]
    again = [ring.take((4 if i else 2, 2)).data_ptr() for i in range(3)]
    assert len(set(first)) == 3 and again == first


def test_observer_check_is_one_batched_pass(jpeg_tree):
    from rded_fast.distill import DistillConfig
    from rded_fast.formats import FOLDER, Source
    from rded_fast.formats.folder import build_index
    from rded_fast.observer_check import check_observer

    index = build_index(jpeg_tree, show_progress=False)
    calls = []

    class Oracle:
        device = torch.device("cpu")

        def __call__(self, crops, labels, eager=False):
            calls.append((tuple(crops.shape), labels.clone(), eager))
            return torch.zeros(len(labels)), labels.clone()

    cfg = DistillConfig(
        data=str(jpeg_tree),
        out="unused",
        observer="conv3",
        input_size=32,
        batch_size=4,
        workers=0,
        loader="torch",
        show_progress=False,
    )
    report = check_observer(Source(FOLDER, index), cfg, Oracle(), torch.device("cpu"))
    assert len(calls) == 1  # every class's check images in one call, each row with its own label
    shape, labels, eager = calls[0]
    assert eager  # not compiled for its crop size: the class stage's is the only compile
    assert shape[0] == report["images"] == 24 and shape[1:] == (3, 32, 32)
    assert sorted(set(labels.tolist())) == [0, 1, 2] and report["accuracy"] == 1.0


def _tiny_model(width: int):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))


def test_many_compiled_scorers_in_one_process_never_hit_the_recompile_limit(monkeypatch):
    """Ten compiled scorers of different observers (more than dynamo's default limit of 8 entries per code
    object), each warmed at two crop sizes: with the limit hit, dynamo would raise here instead of silently
    running eagerly."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from rded_fast.score import Scorer

    monkeypatch.setattr(dynamo_config, "fail_on_recompile_limit_hit", True)
    crops = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1])
    for i in range(10):
        torch.manual_seed(i)
        model = _tiny_model(4 + i)
        scorer = Scorer(model, 16, "cpu", compile=True, batch_size=8)
        assert scorer.warm(8) > 0 and scorer.warm(16) > 0 and scorer.warm(8) == 0
        graphs = counters["stats"]["unique_graphs"]
        scores, _ = scorer(crops, labels)  # warmed: no compile inside the call
        assert counters["stats"]["unique_graphs"] == graphs
        eager, _ = Scorer(model, 16, "cpu", batch_size=8)(crops, labels)
        assert torch.allclose(scores, eager, atol=1e-4)


def test_auto_defaults(monkeypatch, tmp_path):
    import importlib

    from rded_fast import device as device_mod
    from rded_fast.loaders import resolve_loader

    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    assert device_mod.resolve_amp("auto", "cpu") is None  # emulated bf16 is slower than fp32
    assert device_mod.resolve_amp("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    assert device_mod.resolve_amp("auto", "cpu") is torch.bfloat16
    assert device_mod.resolve_amp("none", "cuda") is None
    with pytest.raises(UserError, match="--amp fp16: choose auto, none, bf16"):
        device_mod.resolve_amp("fp16", "cpu", device_mod.TRAIN_AMP_CHOICES)
    from rded_fast.compile_rule import MIN_WORK_CPU, resolve_compile

    for work in ("distill", "relabel"):
        small, large = MIN_WORK_CPU[work] - 1, MIN_WORK_CPU[work]
        assert not resolve_compile("auto", "cpu", work, small) and resolve_compile("auto", "cpu", work, large)
        assert resolve_compile("auto", "cuda", work, 1) and not resolve_compile("off", "cuda", work, large)
    assert not resolve_compile("auto", "cpu", "train", 10**12) and resolve_compile("auto", "cuda", "train", 1)
    assert resolve_compile("on", "cpu", "train", 1)
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    assert resolve_loader("auto", str(beton), "cpu") == "ffcv"
    assert resolve_loader("auto", str(tmp_path), "cpu") == "torch"
    assert resolve_loader("dali", str(tmp_path), "cpu") == "dali"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "nvidia.dali" else real(name, *a))
    assert resolve_loader("auto", str(tmp_path), "cuda") == "dali"
    assert device_mod.available_cores() >= 1


def test_instruction_set_cap_turns_off_native_bf16(monkeypatch):
    from rded_fast import device

    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    assert device.cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert device.cpu_has_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN then emulates bf16, 3-5x slower than fp32
    assert not device.cpu_has_native_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert not device.cpu_has_native_bf16()
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2"})
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert not device.cpu_has_native_bf16()
