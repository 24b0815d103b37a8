"""The `rded-fast` command: parse arguments, call the library, print what it returns. Nothing else lives here:
choices are library constants (`LibraryChoices`), ranges the library's checks, summaries rded_fast.summaries' lines."""

from __future__ import annotations

import argparse
import json
import sys

from rded_fast import recipe, summaries
from rded_fast.arguments import LibraryChoices, add_choice, check_numbers, crop_scale, seed_list
from rded_fast.errors import PeerFailed, UserError
from rded_fast.process import exit_promptly, interrupted_line, usable_inductor_cache
from rded_fast.recovery import os_error_message

AMP = LibraryChoices("rded_fast.device", "AMP_CHOICES")
TRAIN_AMP = LibraryChoices("rded_fast.device", "TRAIN_AMP_CHOICES")  # fp16 would need a loss scaler
COMPILE = LibraryChoices("rded_fast.compile_rule", "CHOICES")
LOADERS = LibraryChoices("rded_fast.loaders", "LOADER_CHOICES")
SELECTIONS = LibraryChoices("rded_fast.select", "SELECTIONS")
IMAGE_FORMATS = LibraryChoices("rded_fast.write", "IMAGE_FORMATS")
SCORE_MODES = LibraryChoices("rded_fast.score", "SCORE_MODES")
CONVERT_FORMATS = LibraryChoices("rded_fast.formats", "WRITABLE", "ALIASES")  # earlier spellings too
WRITE_MODES = LibraryChoices("rded_fast.converters.beton", "WRITE_MODES")
OPTIMIZERS = LibraryChoices("rded_fast.train.validate", "OPTIMIZERS")
LABELS = LibraryChoices("rded_fast.train.validate", "LABELS")
REGIONS = LibraryChoices("rded_fast.train.regions", "REGION_GRIDS")
BENCH_STAGES = LibraryChoices("rded_fast.benchmarks.stages", "STAGES", before=("all",), after=("quality", "train"))


def _fields(args, *drop: str) -> dict:
    """The parsed arguments that are library parameters (same names as the config fields)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run", "quiet", "argv", *drop)}


def _print(lines: list[str], file=None) -> None:
    for line in lines:
        print(line, file=file)


def add_overwrite(p, earlier: str, anything: str) -> None:
    """--overwrite (replace an earlier output of the command: `earlier`) and --overwrite-any (`anything`)."""
    p.add_argument("--overwrite", action="store_true", help=earlier)
    p.add_argument("--overwrite-any", action="store_true", help=anything)


def add_train_amp(p, what: str) -> None:
    """--amp of a training command (rded_fast.device.TRAIN_AMP_CHOICES)."""
    add_choice(
        p,
        "--amp",
        TRAIN_AMP,
        default="auto",
        help=f"autocast dtype of {what}; auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
        "else fp32; none = fp32 (the reference path)",
    )


def add_job(p, observer: dict) -> None:
    """The arguments of a distill job that `distill` and `bench` share: the observer, the recipe, the loader, the
    device and its dtype. `observer`: --observer's required/default and help."""
    p.add_argument("--observer", **observer)
    p.add_argument(
        "--weights",
        help="checkpoint path, torchvision weights name (e.g. IMAGENET1K_V1, read from the "
        "torch hub cache) or timm pretrained tag",
    )
    p.add_argument("--ipc", type=int, default=recipe.IPC, help=f"images per class to produce (default {recipe.IPC})")
    p.add_argument("--factor", type=int, default=recipe.FACTOR, help=f"cells per side of each image (default {recipe.FACTOR})")
    p.add_argument("--mipc", type=int, default=recipe.MIPC, help=f"source images sampled per class (default {recipe.MIPC})")
    p.add_argument(
        "--num-crop", type=int, default=recipe.NUM_CROP, help=f"random crops scored per source image (default {recipe.NUM_CROP})"
    )
    p.add_argument("--input-size", type=int, default=recipe.INPUT_SIZE, help=f"observer input size (default {recipe.INPUT_SIZE})")
    p.add_argument("--batch-size", type=int, default=64, help="source images per loader batch (default 64)")
    p.add_argument("--workers", type=int, help="decoding workers (default: the cores available)")
    p.add_argument("--prefetch", type=int, help="loader batches in flight (default 4 on CUDA, 2 on a CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--loader",
        default="auto",
        help="auto (default: ffcv for a .beton; on CUDA dali when installed, else tvjpeg; else torch), torch (PIL, the "
        "reference), ffcv (a .beton), dali or tvjpeg (shards or an ImageFolder; tvjpeg: nvJPEG on --device when CUDA)",
    ).choices = LOADERS
    add_choice(
        p,
        "--amp",
        AMP,
        default="auto",
        help="observer autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16, else fp32; "
        "none = the fp32 reference path",
    )
    add_choice(
        p,
        "--compile",
        COMPILE,
        default="auto",
        help="torch.compile the scoring step; auto = on for CUDA, on a CPU for runs large enough to repay it",
    )


def add_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distill an ImageFolder into a few images per class (RDED)",
        description="Crop, score with an observer, select and stitch: RDED's synthesis. "
        "Defaults are the reference's ImageNet-1K settings.",
    )
    p.add_argument("--data", required=True, help="ImageFolder root: DIR/<class>/<images>")
    models = "model name (rded-fast models lists them), e.g. resnet18, conv3, timm:convnext_atto, mypkg.models:build_observer"
    add_job(p, {"required": True, "help": models})
    p.add_argument("--out", required=True, help="output folder (refused when it exists and is not empty)")
    p.add_argument(
        "--crop-scale",
        type=crop_scale,
        default=recipe.CROP_SCALE,
        metavar="MIN[,MAX]",
        help=f"area fraction of each random crop, uniform in MIN..MAX (default {recipe.CROP_SCALE[0]},"
        f"{recipe.CROP_SCALE[1]}, RDED's); 1 = whole images (their centred square: pass --num-crop 1, as every crop "
        "is the same)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--hw-decoder-load",
        type=float,
        default=1.0,
        help="DALI on CUDA: share of JPEGs for the hardware decoder (default 1; 0 or 1 keep output "
        "bytes independent of batch size)",
    )
    add_distill_output(p)
    p.set_defaults(run=run_distill)


def add_distill_output(p) -> None:
    """distill's arguments about what it writes and how it runs: format, class map, index, selection, scoring,
    replacing and resuming, processes."""
    add_choice(p, "--format", IMAGE_FORMATS, default="png", help="output image format (default png)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument(
        "--class-map",
        help="file with the observer's classes in output order, one per line; must name every "
        "class folder and may name classes the data lacks (WNID folders need none)",
    )
    p.add_argument("--index", help="index cache file to reuse (built and saved there when missing)")
    add_choice(
        p,
        "--select",
        SELECTIONS,
        default="rded",
        help="rded; rded-cover (RDED's score, the best crop of each of ipc*factor^2 groups of a class's images, grouped by the "
        "observer's features: covers the class instead of its prototypes); or a baseline: random-crops (random crops stitched "
        "like RDED's cells), random-images (random whole images, the literature's 'random'); random = random-crops",
    )
    add_choice(
        p,
        "--score-mode",
        SCORE_MODES,
        default="faithful",
        help="faithful: pad crops to --input-size as RDED does; native: score p x p crops unpadded (not RDED)",
    )
    add_overwrite(
        p,
        "replace an earlier distill output in --out (files in it that distill did not write are kept)",
        "replace a non-empty --out that rded-fast did not write (moved aside, deleted only on success)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (finished classes are kept)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this node, launched through torchrun")
    p.add_argument("--skip-observer-check", action="store_true", help="distill even when the observer looks near chance")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run_distill(args) -> int:
    from rded_fast import DistillConfig, distill

    if args.nproc > 1:
        from rded_fast.distributed import launch

        return launch(args.nproc, [*args.argv, "--nproc", "1"])  # the last wins, however the user spelt it
    options = {"hw_decoder_load": args.hw_decoder_load}  # DALI's own option (rded_fast.loaders.LOADER_OPTIONS)
    result = distill(DistillConfig(**_fields(args, "nproc", *options), loader_options=options, show_progress=not args.quiet))
    if result.is_main:
        _print(summaries.distill_lines(result))
        if result.num_images == 0:  # every class was skipped: the notes above say why
            raise UserError(f"--out {result.out}: no class got an image (see the notes above and {result.manifest.name})")
    return 0


def add_train_observer(sub) -> None:
    p = sub.add_parser(
        "train-observer",
        help="train an observer on a small ImageFolder",
        description="Train a registry model (e.g. conv3) and save {'model': state_dict} for --weights.",
    )
    p.add_argument("--data", required=True, help="training ImageFolder")
    p.add_argument("--val", help="validation ImageFolder (same class folders) for the reported accuracy")
    p.add_argument("--arch", default="conv3")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    add_choice(p, "--optimizer", OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=float, help="default 0.05 (sgd) or 1e-3 (adamw)")
    p.add_argument("--weight-decay", type=float, help="default 5e-4 (sgd) or 0.01 (adamw)")
    p.add_argument("--per-class", type=int, help="train on at most this many images per class")
    add_train_amp(p, "the training")
    p.add_argument("--resume", action="store_true", help="continue from OUT.state, the per-epoch state of an interrupted run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="checkpoint path (refused when a checkpoint is there, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier checkpoint of train-observer at --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run_train_observer)


def run_train_observer(args) -> int:
    from rded_fast import ObserverConfig, train_observer

    _print(summaries.observer_lines(train_observer(ObserverConfig(**_fields(args), show_progress=not args.quiet)), args.arch))
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on Fashion-MNIST in a few CPU minutes",
        description="Fashion-MNIST (Debian's dataset-fashion-mnist) -> Conv3 observer -> distill IPC 10.",
    )
    p.add_argument("--out", default="demo-output", help="output folder (default ./demo-output)")
    p.add_argument("--data-dir", help="where the dataset is cached (default ~/.cache/rded-fast or $RDED_FAST_DATA)")
    p.add_argument("--epochs", type=int, default=3, help="observer epochs (default 3)")
    p.add_argument("--per-class", type=int, default=1000, help="observer training images per class")
    p.add_argument("--student-epochs", type=int, default=30, help="student epochs on the distilled set (default 30)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from rded_fast.demo import run_demo as demo

    _print(summaries.demo_lines(demo(**_fields(args), show_progress=not args.quiet)))
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an ImageFolder to an FFCV .beton or DALI shards",
        description="Write an ImageFolder as an FFCV .beton (--format beton) or as webdataset tar "
        "shards with DALI index files (--format shards).",
    )
    add_choice(p, "--format", CONVERT_FORMATS, required=True, help="shards or beton (dali, ffcv: their earlier names)")
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--out", required=True, help="train.beton (ffcv) or a shard folder (dali)")
    p.add_argument("--class-map", help="one class folder name per line, in the observer's output order")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--max-resolution", type=int, default=512, help="ffcv: longest stored side (default 512)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="ffcv: JPEG quality of stored images (default 90)")
    add_choice(p, "--write-mode", WRITE_MODES, default="jpg", help="ffcv: image storage mode")
    p.add_argument("--shard-size", default="1GB", help="dali: target shard size, e.g. 1GB, 256MB (default 1GB)")
    add_overwrite(
        p,
        "replace an earlier conversion at --out (dali: files in the folder that convert did not write are kept)",
        "replace a file or folder at --out that rded-fast did not write (kept aside until success)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from rded_fast.converters import convert
    from rded_fast.formats import ALIASES, BETON
    from rded_fast.index import read_class_map
    from rded_fast.models.classes import unlisted_folders

    beton = ALIASES.get(args.format, args.format) == BETON
    others = ("shard_size",) if beton else ("max_resolution", "jpeg_quality", "write_mode")  # the other writer's options
    summary = convert(args.format, **_fields(args, "format", *others), show_progress=not args.quiet)
    print(json.dumps(summary, indent=1))
    unlisted = unlisted_folders(read_class_map(args.class_map), args.data) if args.class_map else []
    _print(summaries.convert_notes(summary, unlisted, args.out), file=sys.stderr)  # stderr: stdout stays one JSON document
    return 0


def add_teacher(p, student: bool) -> None:
    """The distilled set and the teacher: what `evaluate` and `relabel` both read."""
    p.add_argument("--distilled", required=True, help="a distilled set made by `rded-fast distill`")
    p.add_argument(
        "--teacher",
        required=not student,
        help="teacher model name (the observer), e.g. resnet18, timm:NAME, MODULE:FACTORY"
        + ("; not needed with --labels hard or --soft-labels" if student else ""),
    )
    p.add_argument("--teacher-weights", help="checkpoint path, torchvision weights name or timm pretrained tag")


def add_training(p, student: bool) -> None:
    """The training run's arguments that `evaluate` and `relabel` share (relabel replays evaluate's epochs)."""
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, help="default: RDED's rule from IPC and class count")
    add_train_amp(p, "student and teacher")
    add_choice(
        p,
        "--compile",
        COMPILE,
        default="auto",
        help="torch.compile the teacher and student steps; auto = on CUDA (with CUDA graphs), and on a CPU only for "
        "runs long enough to repay a cold compile",
    )
    p.add_argument(
        "--skip-teacher-check",
        action="store_true",
        help="do not stop when the teacher's top-1 on a sample of "
        + ("--val" if student else "the distilled set")
        + " is near chance (the check catches a class order that does not match the teacher's outputs)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="train a student on a distilled set and test it on real data",
        description="RDED's recipe: ShufflePatches, RandomResizedCrop, flip, CutMix; KL to the "
        "teacher's soft labels at T=20; AdamW with a half-cosine schedule.",
    )
    add_teacher(p, student=True)
    p.add_argument("--val", required=True, help="real validation ImageFolder (same class folders)")
    p.add_argument(
        "--student", required=True, help="student model name, randomly initialised (e.g. resnet18, timm:NAME, MODULE:FACTORY)"
    )
    p.add_argument("--lr", type=float, help="default: RDED's (1e-3; 2e-3 for CIFAR-100 conv3)")
    p.add_argument("--soft-labels", help="labels folder from `rded-fast relabel` (replayed instead of a teacher)")
    add_choice(
        p,
        "--labels",
        LABELS,
        default="soft",
        help="soft: the teacher's (RDED's recipe, default); hard: the images' own one-hot labels, no "
        "teacher (what the images alone carry)",
    )
    p.add_argument(
        "--bn-refresh",
        default="on",
        choices=["on", "off"],
        help="on (the reference's behaviour): an extra no-grad train-mode student forward per step, "
        "which moves BatchNorm's running statistics a second time; off: one forward",
    )
    add_evaluate_run(p)
    add_training(p, student=True)
    p.set_defaults(run=run_evaluate)


def add_evaluate_run(p) -> None:
    """evaluate's own run arguments: when to test, where the result and the per-epoch state go, the seeds."""
    p.add_argument(
        "--final-only",
        action="store_true",
        help="test once, after the last epoch (the reference also tests every 10th epoch of the last 20 %%; "
        "best_top1 is then final_top1)",
    )
    p.add_argument("--json", help="write the result JSON here")
    p.add_argument("--checkpoint", help="per-epoch training state file (for --resume)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument(
        "--seeds",
        type=seed_list,
        help="train one student per seed in one process, e.g. 0,1,2,3,4 (each as a single run with that seed; "
        "they share the loaded set, the val set, the teacher and the compile); the JSON gives each and the mean +- std",
    )


def run_evaluate(args) -> int:
    from rded_fast import StudentConfig, evaluate

    fields = {**_fields(args), "bn_refresh": args.bn_refresh == "on"}
    r = evaluate(StudentConfig(**fields, show_progress=not args.quiet))
    _print(summaries.set_notes(r, args.distilled), file=sys.stderr)
    _print(summaries.evaluate_lines(r, args.student, args.json))
    return 0


def add_relabel(sub) -> None:
    p = sub.add_parser(
        "relabel",
        help="store soft labels so students train without the teacher",
        description="For every epoch and sample, store the augmentation parameters and the "
        "teacher's top-k logits (fp16); `evaluate --soft-labels` replays them. With "
        "--region, store instead one label per cell of each stitched image (the paper's "
        "region-level labels; any number of epochs can use them).",
    )
    add_teacher(p, student=False)
    add_training(p, student=False)
    p.add_argument("--student", help="student name (only for RDED's batch-size rule)")
    p.add_argument(
        "--top-k",
        type=int,
        help="teacher logits kept per view (default: 10, or all classes when there are fewer; 0: all classes); "
        "the rest of the probability is spread evenly",
    )
    add_choice(
        p,
        "--region",
        REGIONS,
        nargs="?",
        const="cells",
        help="static labels: 'cells' (the default of a bare --region: one per cell of the factor x factor "
        "grid; a crop gets the cells it covers, by area) or 'image' (one per whole image)",
    )
    p.add_argument("--out", required=True, help="labels folder (refused when it exists and is not empty)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier labels folder of relabel at --out (files in it that relabel did not write are kept)",
    )
    p.set_defaults(run=run_relabel)


def run_relabel(args) -> int:
    from rded_fast import StudentConfig, relabel

    r = relabel(StudentConfig(**_fields(args), show_progress=not args.quiet))
    _print(summaries.set_notes(r, args.distilled), file=sys.stderr)
    _print(summaries.relabel_lines(r))
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput of every stage (or the quality benchmark), as JSON",
        description="decode: loader img/s; score: engine crops/s; model: observer-only crops/s (the "
        "ceiling); e2e: a whole distill; --reference: the RDED reference's way, and the "
        "speedup. --stage quality: RDED vs random-images vs random-crops, soft and hard labels, on "
        "Fashion-MNIST.",
    )
    add_choice(p, "--stage", BENCH_STAGES, default="all")
    p.add_argument("--data", help="ImageFolder (or the loader's format) to run on")
    add_job(p, {"default": "resnet18"})
    p.add_argument("--host-classes", type=int, default=24, help="host: synthetic 224 px classes per format")
    p.add_argument("--model-crops", type=int, default=4096, help="crops per timed score/model repetition")
    p.add_argument("--reference", action="store_true", help="also run the reference's way and report the speedup")
    p.add_argument("--json", help="output JSON (default benchmarks/results/bench_<device>.json)")
    p.add_argument("--work", default="bench-quality", help="quality: working folder")
    p.add_argument("--seeds", type=int, default=3, help="quality: seeds; train: students (seeds 0..N-1)")
    p.add_argument("--ipcs", default="1,10", help="quality: comma-separated IPCs")
    p.add_argument("--factors", default="1", help="quality: comma-separated factors (factor f at 32*f px)")
    p.add_argument("--epochs", type=int, default=300, help="quality, train: student epochs")
    p.add_argument("--student", default="conv3", help="train: the student (the teacher is --observer/--weights)")
    p.add_argument("--distilled", help="train: a distilled set (default: a synthetic one of --ipc x --classes images)")
    p.add_argument("--classes", type=int, default=10, help="train: classes of the synthetic set")
    add_choice(p, "--labels", LABELS, default="soft", help="train: the teacher's labels or hard ones")
    p.set_defaults(run=run_bench)


def run_bench(args) -> int:
    from rded_fast.outputs import check_place, check_result_file

    if args.json:  # checked before the work: the result is written at the end
        check_result_file(args.json, "--json", {"device"})
    elif args.stage not in ("quality", "train"):
        check_place("benchmarks/results/bench.json", "--json (default: benchmarks/results/bench_DEVICE.json)")
    if args.stage == "train":
        return run_train_bench(args)
    if args.stage == "quality":
        from rded_fast.benchmarks import quality

        argv = ["--work", args.work, "--seeds", str(args.seeds), "--epochs", str(args.epochs), "--device", args.device]
        argv += ["--ipcs", args.ipcs, "--factors", args.factors]
        return quality.main(argv + (["--json", args.json] if args.json else []))
    return run_stages_bench(args)


def run_stages_bench(args) -> int:
    """bench's throughput stages (rded_fast.benchmarks.stages) on the distill job the arguments describe."""
    from dataclasses import fields
    from pathlib import Path

    from rded_fast.benchmarks.stages import BenchConfig, run_bench as bench
    from rded_fast.distill import DistillConfig
    from rded_fast.fileio import atomic_write_text

    if not args.data and args.stage != "host":
        raise UserError(
            "bench --stage " + args.stage + " needs --data DIR (e.g. from python -m rded_fast.benchmarks.make_imagenet_like)"
        )
    names = {f.name for f in fields(DistillConfig)} - {"out", "show_progress"}
    job = DistillConfig(out="", show_progress=False, **{k: v for k, v in vars(args).items() if k in names})
    result = bench(
        BenchConfig(job, stage=args.stage, model_crops=args.model_crops, host_classes=args.host_classes, reference=args.reference)
    )
    _print(summaries.bench_lines(result))
    out = Path(args.json) if args.json else Path("benchmarks/results") / f"bench_{result['device'].replace(' ', '_')}.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    print(f"json: {out}")
    return 0


def run_train_bench(args) -> int:
    """bench --stage train: the student loop against its model-only loop (rded_fast.benchmarks.train_bench)."""
    from rded_fast.benchmarks import train_bench

    argv = ["--student", args.student, "--teacher", args.observer if args.labels == "soft" else "none"]
    argv += ["--epochs", str(args.epochs), "--seeds", str(args.seeds), "--classes", str(args.classes), "--ipc", str(args.ipc)]
    argv += ["--size", str(args.input_size), "--factor", str(args.factor), "--device", args.device, "--amp", args.amp]
    argv += ["--compile", args.compile] + (["--teacher-weights", args.weights] if args.weights else [])
    argv += (["--distilled", args.distilled] if args.distilled else []) + (["--json", args.json] if args.json else [])
    return train_bench.main(argv)


def add_index(sub) -> None:
    p = sub.add_parser(
        "index",
        help="read every image header once into an index cache for distill --index",
        description="distill reads only the headers of the images it plans and keeps them in its --index cache; "
        "this reads all of them once, so that every later seed and mipc plans without reading any.",
    )
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--out", required=True, help="index cache file to write (e.g. imagenet_index.npz)")
    p.add_argument("--class-map", help="file with the observer's classes in output order (as for distill)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_index)


def run_index(args) -> int:
    from rded_fast.formats.folder import write_index_cache
    from rded_fast.index import read_class_map
    from rded_fast.models.classes import restrict_class_map

    class_map = restrict_class_map(read_class_map(args.class_map), args.data) if args.class_map else None  # as distill
    index = write_index_cache(args.data, args.out, class_map=class_map, show_progress=not args.quiet)
    print(f"indexed {len(index)} images in {index.num_classes} classes ({len(index.skipped)} files left out) into {args.out}")
    if note := index.empty_note():
        print(f"note: {note}")
    return 0


def add_models(sub) -> None:
    p = sub.add_parser(
        "models",
        help="list observer/student models by source and family",
        description="Without options: one line per family. With --source or --family: every name.",
    )
    p.add_argument("--source", help="conv, modified, torchvision or timm")
    p.add_argument("--family", help="e.g. resnet, convnext, mobilenetv2")
    p.set_defaults(run=run_models)


def run_models(args) -> int:
    from rded_fast.models import model_families, source_usages

    rows = model_families(args.source, args.family)
    if not (args.source or args.family):
        _print(summaries.models_table(rows, list(source_usages().values())))
    elif rows:
        print("\n".join(name for _, _, names in rows for name in names))
    else:
        given = " ".join(f"--{k} {v}" for k, v in (("source", args.source), ("family", args.family)) if v)
        raise UserError(f"no models with {given}; run `rded-fast models` for the sources and families")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rded-fast", description="Fast, faithful RDED dataset distillation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (add_demo, add_distill, add_train_observer, add_evaluate, add_relabel, add_convert, add_bench, add_index)
    for add in (*commands, add_models):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usable_inductor_cache()  # before anything imports torch: parsing may (a choice list read from the library)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        check_numbers(vars(args))
        return args.run(args)
    except PeerFailed:  # another torchrun rank failed and prints its error; 0, so the launcher reports that rank's code
        return 0
    except UserError as exc:
        print(f"rded-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, vanished files: name the argument and the fix
        print(f"rded-fast {args.command}: error: {os_error_message(args.command, vars(args), exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP while an output is claimed (rded_fast.outputs)
        print(interrupted_line(exc), file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)


def run() -> None:
    """The console command: `main`, then `exit_promptly` with its exit status."""
    exit_promptly(main())


if __name__ == "__main__":
    run()
