"""The GPU suite: everything only a GPU can show, measured in one process and written as JSON.

Steps (each recorded as soon as it ends, so a run cut short still leaves its numbers):
  tree     an ImageNet-like JPEG tree (benchmarks/make_imagenet_like.py; 100 classes x 300, about 500x375)
  convert  the tree as DALI shards and as an FFCV .beton (seconds, bytes)
  model    ResNet-18 @ 224 alone, bf16, compiled (CUDA graphs) and eager: crops/s and compile seconds
  decode   DALI mixed decode + 5 crops at 112 px over the whole plan, hw_decoder_load 0 and 1: img/s
  tvjpeg   torchvision's nvJPEG path: decode alone, decode + crops, the tvjpeg loader (tree, shards) and the
           DALI loader on the same plan (benchmarks/tv_decode.py)
  e2e      a whole `distill` (IPC 10, factor 2, mipc 300, 5 crops, 224 px, observer check skipped:
           the observer is a random-init ResNet-18) with each loader; crops/s and its fraction of model-only
  host     the host critical path per class (`bench --stage host`, where this version has it)
  tests    `pytest -m gpu tests/test_gpu.py tests/test_tvjpeg.py`: passed / failed / skipped
Where CUDA is absent, only `tree` and `convert` run (the suite's CPU-side parts; use small sizes).

Run: python -m rded_fast.benchmarks.gpu_suite OUT_DIR [--classes 100 --per-class 300 --work DIR --steps tree,convert,...]
(benchmarks/gpu_suite.sh wraps it, installing the DALI/ffcv payload first; see benchmarks/GPU_SETUP.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from rded_fast.device import available_cores, cpu_description

ROOT = Path(__file__).resolve().parents[1]


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name, module in (("dali", "nvidia.dali"), ("ffcv", "ffcv"), ("torchvision", "torchvision")):
        try:
            versions[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as exc:  # an optional package that is absent or broken: recorded, not fatal
            versions[name] = f"unavailable: {type(exc).__name__}: {exc}"
    return versions


class Recorder:
    """Collects results and rewrites OUT_DIR/gpu_suite.json after every step."""

    def __init__(self, out_dir: Path, header: dict):
        self.path = out_dir / "gpu_suite.json"
        self.result = {**header, "steps": {}}
        self.flush()

    def step(self, name: str, fn, *args, **kwargs):
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
            self.result["steps"][name] = {"seconds": round(time.perf_counter() - t, 2), **(value or {})}
        except Exception as exc:  # one failing step must not lose the others' numbers
            value = None
            self.result["steps"][name] = {
                "seconds": round(time.perf_counter() - t, 2),
                "error": f"{type(exc).__name__}: {exc}"[:2000],
            }
        print(json.dumps({name: self.result["steps"][name]}, indent=1)[:3000], flush=True)
        self.flush()
        return value

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        os.replace(tmp, self.path)


def make_tree(work: Path, classes: int, per_class: int) -> dict:
    from rded_fast.benchmarks.make_imagenet_like import make_tree as write

    return write(work / "tree", classes, per_class)


def _disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert_formats(work: Path, formats: list[str]) -> dict:
    from rded_fast.converters import convert

    result = {}
    jobs = {"dali": (work / "shards", {}), "ffcv": (work / "train.beton", {"max_resolution": 512, "write_mode": "jpg"})}
    for fmt in formats:
        out, options = jobs[fmt]
        t = time.perf_counter()
        try:
            summary = convert(fmt, str(work / "tree"), str(out), show_progress=False, workers=available_cores(), **options)
            result[fmt] = {
                "seconds": time.perf_counter() - t,
                "bytes": _disk_bytes(out),
                "written": summary.get("written"),
                "skipped": len(summary.get("skipped", {}) or {}),
            }
        except Exception as exc:
            result[fmt] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    return result


def _observer(num_classes: int):
    from rded_fast.models import build

    torch.manual_seed(0)
    return build("resnet18", num_classes, None, 224).model


def _rate(forward, x: torch.Tensor, reps: int = 20) -> tuple[float, float]:
    """(crops/s in steady state, seconds of the first call) of forward(x) under bf16 autocast."""
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.cuda.synchronize()
        t = time.perf_counter()
        forward(x)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        for _ in range(3):
            forward(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            forward(x)
        torch.cuda.synchronize()
        return reps * len(x) / (time.perf_counter() - t), first


def model_only(num_classes: int, batch: int = 500) -> dict:
    """ResNet-18 @ 224 on ready normalised bf16 channels-last tensors: eager and compiled (CUDA graphs), with
    cuDNN's heuristics (what distill uses) and, for comparison, with cudnn.benchmark autotuning."""
    device = torch.device("cuda")
    model = _observer(num_classes).to(device, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    result = {"batch": batch, "dtype": "bf16", "channels_last": True}
    rate, first = _rate(model, x)
    result["eager"] = {"crops_per_s": rate, "first_call_s": first}
    rate, first = _rate(torch.compile(model, dynamic=False, mode="reduce-overhead"), x)
    result["compiled"] = {"crops_per_s": rate, "first_call_s": first}
    result["compile_seconds"] = result["compiled"]["first_call_s"] - result["eager"]["first_call_s"]
    torch.backends.cudnn.benchmark = True
    try:
        torch._dynamo.reset()
        result["eager_cudnn_benchmark"] = {"crops_per_s": _rate(model, x)[0]}
        result["compiled_cudnn_benchmark"] = {
            "crops_per_s": _rate(torch.compile(model, dynamic=False, mode="reduce-overhead"), x)[0]
        }
    finally:
        torch.backends.cudnn.benchmark = False
        torch._dynamo.reset()
    return result


def dali_decode(work: Path, loads: tuple[float | None, ...] = (0.0, 1.0, None)) -> dict:
    """DALI mixed decode + 5 crops at 112 px of the whole plan (mipc 300) from the shards: img/s per split."""
    from rded_fast.loaders import open_index
    from rded_fast.loaders.dali_loader import DaliCropLoader
    from rded_fast.plan import make_plan

    index = open_index("dali", str(work / "shards"), show_progress=False)
    plan = make_plan(index, 0, 300, 5)
    result = {"images": len(plan), "crop": 112, "num_crop": 5}
    for load in loads:
        loader = DaliCropLoader(
            index,
            plan,
            112,
            batch_size=256,
            workers=available_cores(),
            device="mixed",
            hw_decoder_load=load,
            device_id=0,
            prefetch=2,
        )
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = failed = 0
        for batch in loader:
            n, failed = n + len(batch.rows), failed + len(batch.reasons)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        result[f"hw_decoder_load_{load}"] = {"img_per_s": n / seconds, "seconds": seconds, "failures": failed}
    return result


def e2e(work: Path, model_rate: float | None, loaders: list[tuple[str, str]]) -> dict:
    """A whole distill per (loader, data) pair on CUDA; crops/s over the class stage, and vs model-only."""
    from rded_fast.distill import DistillConfig, distill

    ckpt = work / "resnet18-random.pth"
    if not ckpt.exists():
        torch.save({"model": _observer(100).state_dict()}, ckpt)
    result = {}
    for name, data in loaders:
        loader = name.split("-")[0]
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        torch.cuda.reset_peak_memory_stats()
        cfg = DistillConfig(
            data=data,
            out=str(out),
            observer="resnet18",
            weights=str(ckpt),
            ipc=10,
            factor=2,
            mipc=300,
            num_crop=5,
            input_size=224,
            batch_size=100,
            workers=available_cores(),
            device="cuda",
            loader=loader,
            skip_observer_check=True,
            show_progress=False,
        )
        try:
            t = time.perf_counter()
            run = distill(cfg)
            wall = time.perf_counter() - t
            manifest = json.loads(run.manifest.read_text())
            crops = sum(min(c, 300) for c in manifest["data"]["class_counts"]) * 5
            rate = crops / run.seconds["classes"]
            result[name] = {
                "wall_s": wall,
                "stage_seconds": run.seconds,
                "images_written": run.num_images,
                "crops": crops,
                "crops_per_s": rate,
                "fraction_of_model_only": rate / model_rate if model_rate else None,
                "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
            }
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return result


def host_path(work: Path) -> dict:
    """The host critical path per class, where `rded-fast bench` has a `host` stage."""
    from rded_fast.benchmarks import stages as bench

    if "host" not in getattr(bench, "STAGES", ()):
        return {"unavailable": "this version's bench has no host stage"}
    proc = subprocess.run(
        [sys.executable, "-m", "rded_fast.cli", "bench", "--stage", "host", "--json", str(work / "host.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads((work / "host.json").read_text())


def gpu_tests(out_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-s", "tests/test_gpu.py", "tests/test_tvjpeg.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (out_dir / "gpu_tests.log").write_text(proc.stdout[-200_000:] + "\n" + proc.stderr[-50_000:])
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    return {"returncode": proc.returncode, "summary": summary, **counts}


STEPS = ("tree", "convert", "model", "decode", "tvjpeg", "e2e", "host", "tests")
E2E_SOURCES = {
    "dali-shards": "shards",
    "dali-folder": "tree",
    "ffcv-beton": "train.beton",
    "torch-folder": "tree",
    "tvjpeg-folder": "tree",
    "tvjpeg-shards": "shards",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--work", default="/tmp/rded-gpu-suite", help="tree, converted data and outputs (kept between runs)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--e2e", default=",".join(E2E_SOURCES), help=f"e2e runs: subset of {','.join(E2E_SOURCES)}")
    p.add_argument("--convert", default="dali,ffcv", help="formats to convert to")
    args = p.parse_args(argv)
    out_dir, work = Path(args.out_dir), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"--steps: unknown {sorted(unknown)}; choose from {','.join(STEPS)}")
    cuda = torch.cuda.is_available()
    header = {
        "device": torch.cuda.get_device_name(0) if cuda else "no CUDA device",
        "cpu": cpu_description(),
        "versions": _versions(),
        "tree": {"classes": args.classes, "per_class": args.per_class},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps_asked": steps,
    }
    rec = Recorder(out_dir, header)
    if "tree" in steps:
        rec.step("tree", make_tree, work, args.classes, args.per_class)
    if "convert" in steps:
        rec.step("convert", convert_formats, work, args.convert.split(","))
    if not cuda:
        print("no CUDA device: the GPU steps are left out")
        return 0
    model = rec.step("model", model_only, args.classes) if "model" in steps else None
    if model is None and (work / "model.json").is_file():
        model = json.loads((work / "model.json").read_text())  # from an earlier call of the suite
    elif model is not None:
        (work / "model.json").write_text(json.dumps(model))
    if "decode" in steps:
        rec.step("decode", dali_decode, work)
    if "tvjpeg" in steps:  # torchvision's nvJPEG path beside its ceilings and DALI (benchmarks/tv_decode.py)
        from rded_fast.benchmarks.tv_decode import tv_decode

        rec.step("tvjpeg", tv_decode, work)
    if "e2e" in steps:
        rate = model["compiled"]["crops_per_s"] if model else None
        pairs = [(name, str(work / E2E_SOURCES[name])) for name in args.e2e.split(",") if name]
        rec.step("e2e", e2e, work, rate, pairs)
    if "host" in steps:
        rec.step("host", host_path, work)
    if "tests" in steps:
        rec.step("tests", gpu_tests, out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
