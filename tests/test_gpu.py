"""What only a GPU can show: DALI mixed decoding, compiled CUDA scoring, CUDA graphs, NCCL, GPU determinism.

Run with `pytest -m gpu tests/test_gpu.py` on a machine with CUDA; every test is skipped without one, so
CI on a CPU passes or fails on the other tests alone. benchmarks/gpu_suite.sh runs these and records the result.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, kill_when, write_synthetic_jpegs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]
# Documented tolerance of GPU (nvJPEG) against CPU (libjpeg-turbo) crops of the same boxes, grey levels:
# the decoders' IDCTs and chroma upsampling round differently (README, "Loaders and devices").
MIXED_MEAN_DIFF, MIXED_P99_DIFF = 1.5, 8


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


needs_dali = pytest.mark.skipif(not _dali_available(), reason="needs DALI")


@pytest.fixture(scope="module")
def gpu_tree(tmp_path_factory) -> Path:
    return write_synthetic_jpegs(tmp_path_factory.mktemp("gpu_tree"), classes=24, per_class=8, seed=5)


@pytest.fixture(scope="module")
def gpu_observer(tmp_path_factory) -> Path:
    """A seeded random-init ResNet-18 with 24 outputs (the check is skipped: nothing here measures accuracy)."""
    from rded_fast.models import build

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("observer") / "resnet18.pth"
    torch.save({"model": build("resnet18", 24, None, 64).model.state_dict()}, path)
    return path


def _crops(loader) -> torch.Tensor:
    return torch.cat([b.crops.cpu() for b in loader])


def _dali_crops(tree: Path, decode: str, batch_size: int, hw_decoder_load: float | None = None) -> torch.Tensor:
    from rded_fast.formats import FOLDER, Source
    from rded_fast.formats.folder import build_index
    from rded_fast.loaders.dali_loader import DaliCropLoader
    from rded_fast.plan import make_plan

    index = build_index(tree, show_progress=False)
    plan = make_plan(index, 0, 8, 3)
    loader = DaliCropLoader(
        Source(FOLDER, index),
        plan,
        32,
        batch_size=batch_size,
        workers=4,
        device=decode,
        hw_decoder_load=hw_decoder_load,
        device_id=0 if decode == "mixed" else None,
    )
    return _crops(loader)


@needs_dali
@pytest.mark.parametrize("hw_decoder_load", [0.0, 1.0])
def test_mixed_crops_match_cpu_crops(gpu_tree, hw_decoder_load):
    gpu = _dali_crops(gpu_tree, "mixed", 16, hw_decoder_load)
    cpu = _dali_crops(gpu_tree, "cpu", 16)
    d = (gpu.int() - cpu.int()).abs().float()
    mean, p99 = float(d.mean()), float(d.flatten().quantile(0.99))
    print(f"\nmixed (hw_decoder_load {hw_decoder_load}) vs cpu: mean {mean:.3f}, p99 {p99:.1f}, max {int(d.max())}")
    assert mean <= MIXED_MEAN_DIFF and p99 <= MIXED_P99_DIFF


@needs_dali
@pytest.mark.parametrize("hw_decoder_load", [0.0, 1.0])
def test_pinned_decoder_split_gives_the_same_bytes_at_any_batch_size(gpu_tree, hw_decoder_load):
    a = _dali_crops(gpu_tree, "mixed", 16, hw_decoder_load)
    b = _dali_crops(gpu_tree, "mixed", 7, hw_decoder_load)
    assert torch.equal(a, b)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_compiled_scores_match_eager_on_cuda(gpu_observer, amp):
    from rded_fast.models import build
    from rded_fast.score import Scorer

    model = build("resnet18", 24, str(gpu_observer), 64).model
    g = torch.Generator().manual_seed(1)
    crops = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 24, (100,), generator=g)
    eager, _ = Scorer(model, 64, "cuda", amp_dtype=amp, batch_size=64)(crops, labels)
    compiled, _ = Scorer(model, 64, "cuda", amp_dtype=amp, batch_size=64, compile=True)(crops, labels)
    tol = 1e-3 if amp is None else 5e-2
    assert torch.allclose(eager, compiled, atol=tol, rtol=tol), float((eager - compiled).abs().max())


def test_cuda_graphs_are_used_by_the_compiled_scorer(gpu_observer):
    from torch._dynamo.utils import counters

    from rded_fast.models import build
    from rded_fast.score import Scorer

    counters.clear()
    model = build("resnet18", 24, str(gpu_observer), 64).model
    scorer = Scorer(model, 64, "cuda", amp_dtype=torch.bfloat16, batch_size=32, compile=True)
    crops = torch.randint(0, 256, (80, 3, 32, 32), dtype=torch.uint8)
    for _ in range(3):  # warm-up, recording, replays
        scorer(crops, torch.zeros(80, dtype=torch.int64))
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and any(manager.roots.values()), "no CUDA graph was recorded"


def test_nccl_group_and_all_ok_on_one_rank():
    import torch.distributed as dist

    from rded_fast.distributed import backend_for

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend=backend_for("cuda"), rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        flag = torch.tensor([1])  # what all_ok reduces: a CPU tensor, carried by the group's gloo backend
        dist.all_reduce(flag)
        on_gpu = torch.ones(4, device="cuda")  # and a CUDA tensor, carried by NCCL
        dist.all_reduce(on_gpu)
        torch.cuda.synchronize()
        assert int(flag) == 1 and float(on_gpu.sum()) == 4.0
    finally:
        dist.destroy_process_group()


def _distill_args(tree: Path, ckpt: Path, out: Path, loader: str, batch: int, *extra: str) -> list[str]:
    return [
        "distill",
        "--data",
        str(tree),
        "--observer",
        "resnet18",
        "--weights",
        str(ckpt),
        "--out",
        str(out),
        "--input-size",
        "64",
        "--factor",
        "2",
        "--ipc",
        "1",
        "--mipc",
        "8",
        "--num-crop",
        "3",
        "--batch-size",
        str(batch),
        "--device",
        "cuda",
        "--loader",
        loader,
        "--skip-observer-check",
        "--quiet",
        *extra,
    ]


def _output(out: Path) -> dict[str, bytes]:
    """The distilled images' bytes and the manifest's per-cell records (source, box, score, rank); not the
    run parameters, which record the batch size itself."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.png")) if p.name != "contact_sheet.png"}
    files["manifest.json:images"] = json.dumps(json.loads((out / "manifest.json").read_text())["images"]).encode()
    return files


def _differing(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.mark.parametrize("loader", ["torch", "tvjpeg", pytest.param("dali", marks=needs_dali)])
def test_gpu_distill_same_bytes_across_runs_batch_sizes_and_resume(gpu_tree, gpu_observer, tmp_path, loader):
    from rded_fast.cli import main

    assert main(_distill_args(gpu_tree, gpu_observer, tmp_path / "a", loader, 8)) == 0
    assert main(_distill_args(gpu_tree, gpu_observer, tmp_path / "b", loader, 8)) == 0
    assert main(_distill_args(gpu_tree, gpu_observer, tmp_path / "c", loader, 5)) == 0
    a = _output(tmp_path / "a")
    assert len([k for k in a if k.endswith(".png")]) == 24
    assert not (diff := _differing(_output(tmp_path / "b"), a)), f"two runs differ: {diff[:5]}"
    assert not (diff := _differing(_output(tmp_path / "c"), a)), f"batch sizes 8 and 5 differ: {diff[:5]}"

    out = tmp_path / "killed"
    journal = out / ".rded-journal"
    code = kill_when(
        [sys.executable, "-m", "rded_fast.cli", *_distill_args(gpu_tree, gpu_observer, out, loader, 8)],
        lambda: journal.is_dir() and len(list(journal.glob("class_*.json"))) >= 3,
        ROOT,
        timeout=600,
    )
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert main(_distill_args(gpu_tree, gpu_observer, out, loader, 8, "--resume")) == 0
    assert not (diff := _differing(_output(out), a)), f"kill -9 + --resume differs: {diff[:5]}"


def test_students_compiled_with_cuda_graphs_train_as_eager_and_seeds_as_single_runs(tmp_path):
    """The student engine on CUDA: two students in one process, compiled with CUDA graphs (each student's parameters
    recorded apart), each equal to its single run; compiled and eager losses agree to bf16 noise."""
    from rded_fast.benchmarks.train_bench import TrainBenchConfig, _source, synthetic_set
    from rded_fast.train.augment import Augmenter
    from rded_fast.train.engine import make_run, make_steps, train_epoch, warm

    device = torch.device("cuda")
    data = synthetic_set(classes=4, ipc=8, size=32, factor=2)
    cfg = TrainBenchConfig(student="conv3", teacher="conv3", classes=4, ipc=8, size=32, batch_size=12, epochs=2)
    source = _source(cfg, data, device)
    images = data.images.to(device)
    augmenter = Augmenter(images, 2)
    losses = {}
    for compiled, seeds in ((False, (0,)), (True, (0,)), (True, (1, 0))):
        steps = make_steps(source, compiled)
        runs = [make_run("conv3", 4, 32, s, source.recipe, device) for s in seeds]
        warm(steps, runs, source, images, True)
        per_epoch = [train_epoch(runs, source, steps, augmenter, e) for e in range(2)]
        losses[compiled, seeds] = [[epoch[i] for epoch in per_epoch] for i in range(len(seeds))]
    assert losses[True, (1, 0)][1] == losses[True, (0,)][0]  # the second student of two is the single run
    assert torch.allclose(torch.tensor(losses[True, (0,)]), torch.tensor(losses[False, (0,)]), rtol=0.05)
