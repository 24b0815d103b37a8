"""The GPU suite: everything only a GPU can show, measured in one process per call and written as JSON.

Steps (each recorded as soon as it ends, so a run cut short still leaves its numbers):
  tree      an ImageNet-like JPEG tree (benchmarks/make_imagenet_like.py; 100 classes x 300, about 500x375,
            every 4th image generated and the others shifted copies: 30k distinct JPEGs)
  tree1k    the ImageNet-1K shape: 1000 WNID folders x 300 hard links to the tree's 30k files (seconds)
  convert   the tree as DALI shards and as an FFCV .beton (seconds, bytes)
  model     the observer alone (ResNet-18 @ 224, bf16, channels-last): eager and compiled (CUDA graphs),
            crops/s and compile seconds: the ceiling of the class stage
  ceilings  every loader's own ceiling over one plan of the tree (mipc 300, 5 crops at 112 px): the DALI
            loader's graph alone (folder and shards), DALI's random_resized_crop graph, torchvision's batched
            decode_jpeg, PIL decode + crops in worker processes, ffcv's stock decoder (benchmarks/ceilings.py)
  tvjpeg    torchvision's nvJPEG path: decode alone, decode + crops, the tvjpeg loader (tree, shards) and the
            DALI loader on the same plan (benchmarks/tv_decode.py)
  decode    each loader present over the same plan: img/s, time to the first batch, and its fraction of its
            own ceiling (DALI also at hw_decoder_load 0.0 and DALI's default split)
  e2e       a whole `rded-fast distill` (IPC 10, factor 2, mipc 300, 5 crops, 224 px, random-init observer,
            check skipped) per loader on the tree, as a process of its own: wall, run.seconds, class-stage
            crops/s and its fraction of model-only
  e2e1k     the same on the 1000-class tree (300k images, 1.5 M crops): wall incl. start-up and cold compile
  host      the host critical path per class (`bench --stage host`)
  tests     `pytest -m gpu tests/test_gpu.py tests/test_tvjpeg.py` (or `--tests-k EXPR`): passed / failed / skipped
Without CUDA the steps run on the CPU with `--device cpu` (DALI decodes on the CPU, the model is not compiled);
with small sizes that is how tests/test_gpu_suite.py exercises the GPU path on a CPU machine.

Run: python -m rded_fast.benchmarks.gpu_suite OUT_DIR --steps tree,tree1k,convert [--work DIR ...]
(benchmarks/gpu_session.sh runs the whole session; see benchmarks/GPU_SETUP.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rded_fast.device import available_cores, cpu_description
from rded_fast.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tree", "tree1k", "convert", "model", "ceilings", "decode", "tvjpeg", "e2e", "e2e1k", "host", "tests")
E2E_SOURCES = {
    "dali-shards": "shards",
    "dali-folder": "tree",
    "ffcv-beton": "train.beton",
    "torch-folder": "tree",
    "tvjpeg-folder": "tree",
    "tvjpeg-shards": "shards",
}
E2E1K_SOURCES = {"dali-folder": "tree1k", "torch-folder": "tree1k", "ffcv-beton": "train1k.beton"}


@dataclass(frozen=True)
class Settings:
    """What the steps run on and with: one plain record made from the command line."""

    work: Path
    device: str  # "cuda" or "cpu"
    classes: int
    per_class: int
    classes_1k: int
    per_class_1k: int
    observer: str
    input_size: int
    ipc: int
    mipc: int
    num_crop: int
    crop: int
    batch: int
    workers: int


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name, module in (("dali", "nvidia.dali"), ("ffcv", "ffcv"), ("torchvision", "torchvision")):
        try:
            versions[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as exc:  # an optional package that is absent or broken: recorded, not fatal
            versions[name] = f"unavailable: {type(exc).__name__}: {exc}"
    return versions


def _have(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


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

    def part(self, step: str, name: str, fn, *args, **kwargs):
        """One part of a step, recorded (and flushed) as soon as it ends: a failing part keeps the others."""
        t = time.perf_counter()
        try:
            value = dict(fn(*args, **kwargs))
        except Exception as exc:
            value = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        value["part_seconds"] = round(time.perf_counter() - t, 2)
        self.result["steps"].setdefault(step, {})[name] = value
        print(f"   {step}/{name}: {json.dumps(value)[:600]}", flush=True)
        self.flush()
        return value

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        os.replace(tmp, self.path)


def make_tree(s: Settings) -> dict:
    from rded_fast.benchmarks.make_imagenet_like import make_tree as write

    return write(s.work / "tree", s.classes, s.per_class, variants=4)


def make_tree1k(s: Settings) -> dict:
    from rded_fast.benchmarks.make_imagenet1k_tree import link_tree

    return link_tree(s.work / "tree", s.work / "tree1k", s.per_class_1k, s.classes_1k)


def _disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert_formats(s: Settings, formats: list[str]) -> dict:
    from rded_fast.converters import convert

    result = {}
    jobs = {"dali": (s.work / "shards", {}), "ffcv": (s.work / "train.beton", {"max_resolution": 512, "write_mode": "jpg"})}
    for fmt in formats:
        out, options = jobs[fmt]
        t = time.perf_counter()
        try:
            summary = convert(fmt, str(s.work / "tree"), str(out), show_progress=False, workers=s.workers, **options)
            result[fmt] = {
                "seconds": time.perf_counter() - t,
                "bytes": _disk_bytes(out),
                "written": summary.get("written"),
                "skipped": len(summary.get("skipped", {}) or {}),
            }
        except Exception as exc:
            result[fmt] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    return result


def _observer(s: Settings, num_classes: int):
    from rded_fast.models import build

    torch.manual_seed(0)
    return build(s.observer, num_classes, None, s.input_size).model


def _rate(forward, x: torch.Tensor, device: str, reps: int = 20) -> tuple[float, float]:
    """(crops/s in steady state, seconds of the first call) of forward(x), under bf16 autocast on CUDA."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        sync()
        t = time.perf_counter()
        forward(x)
        sync()
        first = time.perf_counter() - t
        for _ in range(3):
            forward(x)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            forward(x)
        sync()
        return reps * len(x) / (time.perf_counter() - t), first


def model_only(s: Settings, batch: int = 500) -> dict:
    """The observer on ready normalised channels-last tensors: eager and (on CUDA) compiled with CUDA graphs, with
    cuDNN's heuristics (what distill uses) and, for comparison, with cudnn.benchmark autotuning."""
    cuda = s.device == "cuda"
    batch = batch if cuda else 16
    model = _observer(s, s.classes).to(s.device, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, s.input_size, s.input_size, device=s.device).contiguous(memory_format=torch.channels_last)
    result = {"batch": batch, "dtype": "bf16" if cuda else "fp32", "channels_last": True, "observer": s.observer}
    rate, first = _rate(model, x, s.device, 20 if cuda else 2)
    result["eager"] = {"crops_per_s": rate, "first_call_s": first}
    if not cuda:  # compiling on a CPU is not what the ceiling is about (and takes minutes)
        result["compiled"] = {"crops_per_s": rate, "first_call_s": first, "note": "CPU: eager stands in"}
        return result
    rate, first = _rate(torch.compile(model, dynamic=False, mode="reduce-overhead"), x, s.device)
    result["compiled"] = {"crops_per_s": rate, "first_call_s": first}
    result["compile_seconds"] = result["compiled"]["first_call_s"] - result["eager"]["first_call_s"]
    torch.backends.cudnn.benchmark = True
    try:
        torch._dynamo.reset()
        result["compiled_cudnn_benchmark"] = {
            "crops_per_s": _rate(torch.compile(model, dynamic=False, mode="reduce-overhead"), x, s.device)[0]
        }
    finally:
        torch.backends.cudnn.benchmark = False
        torch._dynamo.reset()
    return result


def _plan(s: Settings, source: str):
    """The suite's plan (mipc, num_crop) over `source` ("tree", "shards", "train.beton") as its loader indexes it."""
    from rded_fast.loaders import open_source
    from rded_fast.plan import make_plan

    name = {"tree": "torch", "shards": "dali", "train.beton": "ffcv"}[source]
    opened = open_source(name, str(s.work / source), show_progress=False)
    return opened, make_plan(opened.index, 0, s.mipc, s.num_crop)


def ceilings(rec: Recorder, s: Settings) -> None:
    """Each loader's ceiling over the suite's plan of the tree (benchmarks/ceilings.py), one part at a time."""
    from rded_fast.benchmarks import ceilings as c

    tree, plan = _plan(s, "tree")
    index = tree.index
    files = [os.path.join(index.root, index.paths[i]) for i in plan.image_ids.tolist()]
    prefetch = 4 if s.device == "cuda" else 2
    if _have("nvidia.dali"):
        for load in (1.0,) if s.device == "cuda" else (None,):
            rec.part("ceilings", "dali_graph_folder", c.dali_graph, tree, plan, s.crop, s.device, s.batch, s.workers, prefetch,
                     hw_decoder_load=load)  # fmt: skip
        if (s.work / "shards").is_dir():
            shards, shard_plan = _plan(s, "shards")
            rec.part("ceilings", "dali_graph_shards", c.dali_graph, shards, shard_plan, s.crop, s.device, s.batch,
                     s.workers, prefetch, hw_decoder_load=1.0 if s.device == "cuda" else None)  # fmt: skip
        rec.part("ceilings", "dali_rrc", c.dali_rrc, files, s.crop, s.num_crop, s.device, s.batch, s.workers, prefetch)
    rec.part("ceilings", "tv_decode", c.tv_decode, files, s.device, s.batch)
    rec.part("ceilings", "pil_processes", c.pil_processes, index, plan, s.crop, s.workers, limit=PIL_IMAGES)
    if _have("ffcv") and (s.work / "train.beton").is_file():
        rec.part("ceilings", "ffcv_stock", c.ffcv_stock, str(s.work / "train.beton"), s.crop, s.batch, s.workers)


PIL_IMAGES = 8000  # the PIL ceiling and the torch loader run on the plan's first rows only: ~3 s each on 16 cores
LOADER_CEILING = {
    "dali-folder": "dali_graph_folder",
    "dali-shards": "dali_graph_shards",
    "torch-folder": "pil_processes",
    "ffcv-beton": "ffcv_stock",
    "tvjpeg-folder": "tv_decode",  # torchvision's batched decode alone (no crops): the loader's bound
    "tvjpeg-shards": "tv_decode",
}


def decode(rec: Recorder, s: Settings) -> None:
    """Each loader present over the suite's plan; its rate against its own ceiling (step `ceilings`, same call)."""
    from rded_fast.benchmarks import ceilings as c

    jobs = [("torch-folder", "tree", {})]
    if _have("nvidia.dali"):
        load = {"hw_decoder_load": 1.0} if s.device == "cuda" else {}
        jobs = [("dali-folder", "tree", load), ("dali-shards", "shards", load), *jobs]
        if s.device == "cuda":
            jobs += [
                ("dali-folder-load0", "tree", {"hw_decoder_load": 0.0}),
                ("dali-folder-default", "tree", {"hw_decoder_load": None}),
            ]
    if _have("ffcv"):
        jobs.append(("ffcv-beton", "train.beton", {}))
    if s.device == "cuda":  # on a CPU tvjpeg is ~10x slower than PIL and never chosen (tests/test_tvjpeg.py)
        jobs += [("tvjpeg-folder", "tree", {}), ("tvjpeg-shards", "shards", {})]
    prefetch = 4 if s.device == "cuda" else 2
    for name, source, options in jobs:
        if not (s.work / source).exists():
            continue
        opened, plan = _plan(s, source)
        if name.startswith("torch"):
            plan = plan.only(sorted(set(plan.labels[:PIL_IMAGES].tolist())))
        value = rec.part("decode", name, c.loader_rate, name.split("-")[0], opened, plan, s.crop, s.device, s.batch, s.workers,
                         prefetch=prefetch, **options)  # fmt: skip
        ceiling = rec.result["steps"].get("ceilings", {}).get(LOADER_CEILING.get(name, ""), {})
        for key in ("img_per_s", "whole_img_per_s"):
            if value.get(key) and ceiling.get(key):
                value[f"fraction_of_ceiling_{key}"] = value[key] / ceiling[key]
        rec.flush()


def _checkpoint(s: Settings, num_classes: int) -> Path:
    path = s.work / f"{s.observer}-{s.input_size}-random-{num_classes}.pth"
    if not path.exists():
        torch.save({"model": _observer(s, num_classes).state_dict()}, path)
    return path


def distill_run(s: Settings, name: str, data: Path, num_classes: int, model_rate: float | None) -> dict:
    """`rded-fast distill` as a process of its own (start-up, cold compile and manifest included in `wall_s`), with
    an empty compile cache of its own."""
    out = s.work / f"out-{data.name}-{name}"
    argv = [
        sys.executable, "-m", "rded_fast.cli", "distill", "--data", str(data), "--out", str(out), "--overwrite",
        "--observer", s.observer, "--weights", str(_checkpoint(s, num_classes)), "--ipc", str(s.ipc), "--factor", "2",
        "--mipc", str(s.mipc), "--num-crop", str(s.num_crop), "--input-size", str(s.input_size), "--batch-size", "100",
        "--workers", str(s.workers), "--device", s.device, "--loader", name.split("-")[0], "--skip-observer-check", "--quiet",
    ]  # fmt: skip
    cache = tempfile.mkdtemp(prefix="inductor-", dir=s.work)  # a cold compile, as a first run anywhere has
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
    t = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": f"rc {proc.returncode}: {proc.stderr[-2000:]}", "wall_s": wall}
    manifest = read_manifest(out / "manifest.json")
    seconds = manifest.seconds
    crops = sum(min(c, s.mipc) for c in manifest.class_counts) * s.num_crop
    rate = crops / seconds["classes"]
    return {
        "classes": num_classes,
        "wall_s": wall,
        "outside_run_s": wall - seconds["total"],  # interpreter start-up, imports, claiming --out, the manifest
        "run_seconds": seconds,
        "images_written": len(manifest.images),
        "decode_failures": len(manifest.decode_failures),
        "crops": crops,
        "crops_per_s": rate,
        "model_only_crops_per_s": model_rate,
        "fraction_of_model_only": rate / model_rate if model_rate else None,
    }


def e2e(rec: Recorder, s: Settings, step: str, sources: dict[str, str], names: list[str], num_classes: int) -> None:
    model = rec.result["steps"].get("model")
    if not model and (s.work / "model.json").is_file():
        model = json.loads((s.work / "model.json").read_text())  # from an earlier call of the suite
    rate = (model or {}).get("compiled", {}).get("crops_per_s")
    for name in names:
        data = s.work / sources[name]
        if (
            not data.exists()
            or (name.startswith("dali") and not _have("nvidia.dali"))
            or (name.startswith("ffcv") and not _have("ffcv"))
        ):
            continue
        rec.part(step, name, distill_run, s, name, data, num_classes, rate)


def host_path(s: Settings) -> dict:
    """The host critical path per class, where `rded-fast bench` has a `host` stage."""
    from rded_fast.benchmarks import stages as bench

    if "host" not in getattr(bench, "STAGES", ()):
        return {"unavailable": "this version's bench has no host stage"}
    proc = subprocess.run(
        [sys.executable, "-m", "rded_fast.cli", "bench", "--stage", "host", "--json", str(s.work / "host.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads((s.work / "host.json").read_text())


def gpu_tests(out_dir: Path, select: str | None) -> dict:
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-s", "tests/test_gpu.py", "tests/test_tvjpeg.py"]
    proc = subprocess.run(argv + (["-k", select] if select else []), cwd=ROOT, capture_output=True, text=True, timeout=900)
    (out_dir / "gpu_tests.log").write_text(proc.stdout[-200_000:] + "\n" + proc.stderr[-50_000:])
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    return {"returncode": proc.returncode, "summary": summary, "select": select, **counts}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--classes-1k", type=int, default=1000, help="tree1k: class folders")
    p.add_argument("--per-class-1k", type=int, default=300, help="tree1k: links per class")
    p.add_argument("--work", default="/tmp/rded-gpu-suite", help="trees, converted data and outputs (kept between calls)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--e2e", default=",".join(E2E_SOURCES), help=f"e2e runs: subset of {','.join(E2E_SOURCES)}")
    p.add_argument("--e2e1k", default="dali-folder,torch-folder", help=f"e2e1k runs: subset of {','.join(E2E1K_SOURCES)}")
    p.add_argument("--convert", default="dali,ffcv", help="formats to convert to")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--observer", default="resnet18")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--mipc", type=int, default=300)
    p.add_argument("--num-crop", type=int, default=5)
    p.add_argument("--crop", type=int, default=112, help="ceilings/decode: crop side")
    p.add_argument("--batch", type=int, default=256, help="ceilings/decode: images per batch")
    p.add_argument("--workers", type=int, default=available_cores())
    p.add_argument("--tests-k", help="tests: a pytest -k expression (default: every GPU test)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    out_dir, work = Path(args.out_dir), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    steps = [x for x in args.steps.split(",") if x]
    if unknown := set(steps) - set(STEPS):
        p.error(f"--steps: unknown {sorted(unknown)}; choose from {','.join(STEPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; pass --device cpu to run the steps on the CPU")
    s = Settings(work, args.device, args.classes, args.per_class, args.classes_1k, args.per_class_1k, args.observer,
                 args.input_size, args.ipc, args.mipc, args.num_crop, args.crop, args.batch, args.workers)  # fmt: skip
    header = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "cpu": cpu_description(),
        "versions": _versions(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(s).items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps_asked": steps,
    }
    rec = Recorder(out_dir, header)
    if "tree" in steps:
        rec.step("tree", make_tree, s)
    if "tree1k" in steps:
        rec.step("tree1k", make_tree1k, s)
    if "convert" in steps:
        rec.step("convert", convert_formats, s, args.convert.split(","))
    if "model" in steps and (model := rec.step("model", model_only, s)) is not None:
        (work / "model.json").write_text(json.dumps(model))
    if "ceilings" in steps:
        ceilings(rec, s)
    if "decode" in steps:
        decode(rec, s)
    if "tvjpeg" in steps:  # torchvision's nvJPEG path beside its ceilings and DALI (benchmarks/tv_decode.py)
        from rded_fast.benchmarks.tv_decode import tv_decode

        rec.step("tvjpeg", tv_decode, s.work)
    if "e2e" in steps:
        e2e(rec, s, "e2e", E2E_SOURCES, [x for x in args.e2e.split(",") if x], s.classes)
    if "e2e1k" in steps:
        e2e(rec, s, "e2e1k", E2E1K_SOURCES, [x for x in args.e2e1k.split(",") if x], s.classes_1k)
    if "host" in steps:
        rec.step("host", host_path, s)
    if "tests" in steps:
        rec.step("tests", gpu_tests, out_dir, args.tests_k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
