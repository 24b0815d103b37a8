"""The `rded-fast` command: parse arguments, call the library, print results. Nothing else lives here."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading

from rded_fast import recipe
from rded_fast.arguments import NUMBER_RANGES, check_number
from rded_fast.errors import PeerFailed, UserError


def _fields(args, *drop: str) -> dict:
    """The parsed arguments that are library parameters (same names as the config fields)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run", "quiet", "argv", *drop)}


def add_train_amp(p, what: str) -> None:
    """--amp of a training command (rded_fast.device.TRAIN_AMP_CHOICES; fp16 would need a loss scaler)."""
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "none", "bf16"],
        help=f"autocast dtype of {what}; auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
        "else fp32; none = fp32 (the reference path)",
    )


def without_option(argv: list[str], name: str) -> list[str]:
    """`argv` less every `name VALUE` and `name=VALUE` (argparse accepts both spellings)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def seed_list(text: str) -> tuple[int, ...]:
    """--seeds A,B,C as distinct whole numbers >= 0."""
    try:
        seeds = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas, e.g. 0,1,2,3,4") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct whole numbers >= 0")
    return seeds


def crop_scale(text: str) -> tuple[float, float]:
    """--crop-scale MIN[,MAX] (MAX defaults to 1) as a (min, max) area fraction; the range is distill's check."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN or MIN,MAX (e.g. 0.08,1 or 1)")
    return values[0], values[1] if len(values) == 2 else 1.0


def add_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distill an ImageFolder into a few images per class (RDED)",
        description="Crop, score with an observer, select and stitch: RDED's synthesis. "
        "Defaults are the reference's ImageNet-1K settings.",
    )
    p.add_argument("--data", required=True, help="ImageFolder root: DIR/<class>/<images>")
    p.add_argument(
        "--observer",
        required=True,
        help="model name (rded-fast models lists them), e.g. resnet18, conv3, timm:convnext_atto, mypkg.models:build_observer",
    )
    p.add_argument(
        "--weights",
        help="checkpoint path, torchvision weights name (e.g. IMAGENET1K_V1, read from the "
        "torch hub cache) or timm pretrained tag",
    )
    p.add_argument("--out", required=True, help="output folder (refused when it exists and is not empty)")
    p.add_argument("--ipc", type=int, default=recipe.IPC, help=f"images per class to produce (default {recipe.IPC})")
    p.add_argument("--factor", type=int, default=recipe.FACTOR, help=f"cells per side of each image (default {recipe.FACTOR})")
    p.add_argument("--mipc", type=int, default=recipe.MIPC, help=f"source images sampled per class (default {recipe.MIPC})")
    p.add_argument(
        "--num-crop", type=int, default=recipe.NUM_CROP, help=f"random crops scored per source image (default {recipe.NUM_CROP})"
    )
    p.add_argument(
        "--crop-scale",
        type=crop_scale,
        default=recipe.CROP_SCALE,
        metavar="MIN[,MAX]",
        help=f"area fraction of each random crop, uniform in MIN..MAX (default {recipe.CROP_SCALE[0]},"
        f"{recipe.CROP_SCALE[1]}, RDED's); 1 = whole images (their centred square: pass --num-crop 1, as every crop "
        "is the same)",
    )
    p.add_argument("--input-size", type=int, default=recipe.INPUT_SIZE, help=f"observer input size (default {recipe.INPUT_SIZE})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="source images per loader batch (default 64)")
    p.add_argument("--workers", type=int, help="decoding workers (default: the cores available)")
    p.add_argument("--prefetch", type=int, help="loader batches in flight (default 4 on CUDA, 2 on a CPU)")
    p.add_argument(
        "--hw-decoder-load",
        type=float,
        default=1.0,
        help="DALI on CUDA: share of JPEGs for the hardware decoder (default 1; 0 or 1 keep output "
        "bytes independent of batch size)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--loader",
        default="auto",
        help="auto (default: ffcv for a .beton; on CUDA dali when installed, else tvjpeg; else torch), torch (PIL, "
        "reference), ffcv (--data a .beton), dali (--data shards/ or an ImageFolder), tvjpeg (torchvision's JPEG "
        "decoder on --device: nvJPEG on CUDA; --data shards/ or an ImageFolder)",
    )
    p.add_argument("--format", default="png", choices=["png", "jpg"], help="output image format (default png)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument(
        "--class-map",
        help="file with the observer's classes in output order, one per line; must name every "
        "class folder and may name classes the data lacks (WNID folders need none)",
    )
    p.add_argument("--index", help="index cache file to reuse (built and saved there when missing)")
    p.add_argument(
        "--select",
        default="rded",
        choices=["rded", "rded-cover", "random-crops", "random-images", "random"],
        help="rded; rded-cover (RDED's score, the best crop of each of ipc*factor^2 groups of a class's images, "
        "grouped by the observer's features: covers the class instead of its prototypes); or a baseline: "
        "random-crops (random crops stitched like RDED's cells), random-images (random whole images, the "
        "literature's 'random'); random = random-crops",
    )
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "none", "bf16", "fp16"],
        help="observer autocast dtype; auto = bf16 on CUDA and on CPUs with native bf16, else fp32; "
        "none = the fp32 reference path",
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile the scoring step; auto = on for CUDA, on a CPU for runs large enough to repay it",
    )
    p.add_argument(
        "--score-mode",
        default="faithful",
        choices=["faithful", "native"],
        help="faithful: pad crops to --input-size as RDED does; native: score p x p crops unpadded (not RDED)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier distill output in --out (files in it that distill did not write are kept)",
    )
    p.add_argument(
        "--overwrite-any",
        action="store_true",
        help="replace a non-empty --out that rded-fast did not write (moved aside, deleted only on success)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (finished classes are kept)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this node, launched through torchrun")
    p.add_argument("--skip-observer-check", action="store_true", help="distill even when the observer looks near chance")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_distill)


def run_distill(args) -> int:
    from rded_fast import DistillConfig, distill

    if args.nproc > 1:
        from rded_fast.distributed import launch

        return launch(args.nproc, without_option(list(args.argv), "--nproc"))
    fields = _fields(args, "nproc", "hw_decoder_load")
    options = {"hw_decoder_load": args.hw_decoder_load}
    result = distill(DistillConfig(**fields, loader_options=options, show_progress=not args.quiet))
    if result.is_main:
        print_distill(result)
        if result.num_images == 0:  # every class was skipped: the notes above say why
            raise UserError(f"--out {result.out}: no class got an image (see the notes above and {result.manifest.name})")
    return 0


def print_distill(result) -> None:
    for line in result.notes:
        print(f"note: {line}")
    if result.observer_accuracy is not None:
        print(f"observer top-1 on a sample of training images: {result.observer_accuracy:.1%}")
    print(f"wrote {result.num_images} images to {result.out} in {result.seconds['total']:.1f} s")
    print(f"manifest: {result.manifest}")
    if result.contact_sheet is not None:
        print(f"contact sheet: {result.contact_sheet}")


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
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
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

    fields = _fields(args)
    summary = train_observer(ObserverConfig(**fields, show_progress=not args.quiet))
    if summary["replaced"]:
        print(f"note: replaced the earlier checkpoint {summary['replaced']}")
    val = summary["val_accuracy"]
    print(
        f"trained {args.arch} on {summary['train_images']} images in {summary['seconds']:.1f} s: "
        f"train top-1 {summary['train_accuracy']:.1%}" + (f", val top-1 {val:.1%}" if val is not None else "")
    )
    print(f"checkpoint: {summary['checkpoint']}")
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

    result = demo(
        out=args.out,
        data_dir=args.data_dir,
        epochs=args.epochs,
        per_class=args.per_class,
        student_epochs=args.student_epochs,
        device=args.device,
        show_progress=not args.quiet,
    )
    print(f"data: {result.data_dir} (Fashion-MNIST, 32x32 RGB PNG, train/ and test/)")
    print(f"observer: {result.observer}, test top-1 {result.observer_test_accuracy:.1%}")
    print_distill(result.distill)
    st = result.student
    print(
        f"student conv3 trained {st['parameters']['recipe']['epochs']} epochs on the {st['train_images']} distilled "
        f"images: test top-1 {st['final_top1']:.1%} (Fashion-MNIST test split, {st['val_images']} images)"
    )
    print(f"demo finished in {result.seconds:.1f} s")
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an ImageFolder to an FFCV .beton or DALI shards",
        description="Write an ImageFolder as an FFCV .beton (--format ffcv) or as webdataset tar "
        "shards with DALI index files (--format dali).",
    )
    p.add_argument("--format", required=True, choices=["ffcv", "dali"])
    p.add_argument("--data", required=True, help="ImageFolder root")
    p.add_argument("--out", required=True, help="train.beton (ffcv) or a shard folder (dali)")
    p.add_argument("--class-map", help="one class folder name per line, in the observer's output order")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--max-resolution", type=int, default=512, help="ffcv: longest stored side (default 512)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="ffcv: JPEG quality of stored images (default 90)")
    p.add_argument("--write-mode", default="jpg", choices=["jpg", "raw", "proportion"], help="ffcv: image storage mode")
    p.add_argument("--shard-size", default="1GB", help="dali: target shard size, e.g. 1GB, 256MB (default 1GB)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier conversion at --out (dali: files in the folder that convert did not write are kept)",
    )
    p.add_argument(
        "--overwrite-any",
        action="store_true",
        help="replace a file or folder at --out that rded-fast did not write (kept aside until success)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=run_convert)


def run_convert(args) -> int:
    from rded_fast.converters import convert

    common = {
        "class_map": args.class_map,
        "workers": args.workers,
        "show_progress": not args.quiet,
        "overwrite": args.overwrite,
        "overwrite_any": args.overwrite_any,
    }
    if args.format == "ffcv":
        extra = {"max_resolution": args.max_resolution, "jpeg_quality": args.jpeg_quality, "write_mode": args.write_mode}
    else:
        extra = {"shard_size": args.shard_size}
    summary = convert(args.format, args.data, args.out, **common, **extra)
    print(json.dumps(summary, indent=1))
    if args.class_map:  # on stderr, like every note here: stdout stays one JSON document
        from rded_fast.index import read_class_map
        from rded_fast.models.classes import unlisted_folders

        if left := unlisted_folders(read_class_map(args.class_map), args.data):
            shown = ", ".join(left[:5]) + (", ..." if len(left) > 5 else "")
            print(
                f"note: --class-map does not name {len(left)} class folder(s) of --data; NOT converted: {shown}", file=sys.stderr
            )
    if summary.get("replaced"):  # on stderr: stdout stays one JSON document
        print(f"note: replaced the earlier output {summary['replaced']}", file=sys.stderr)
    elif summary.get("reused_shards"):
        print(f"note: kept {summary['reused_shards']} complete shard(s) of an earlier conversion in {args.out}", file=sys.stderr)
    return 0


def _student_args(p, student: bool) -> None:
    p.add_argument("--distilled", required=True, help="a distilled set made by `rded-fast distill`")
    p.add_argument(
        "--teacher",
        required=not student,
        help="teacher model name (the observer), e.g. resnet18, timm:NAME, MODULE:FACTORY"
        + ("; not needed with --labels hard or --soft-labels" if student else ""),
    )
    p.add_argument("--teacher-weights", help="checkpoint path, torchvision weights name or timm pretrained tag")
    if student:
        p.add_argument("--val", required=True, help="real validation ImageFolder (same class folders)")
        p.add_argument(
            "--student", required=True, help="student model name, randomly initialised (e.g. resnet18, timm:NAME, MODULE:FACTORY)"
        )
        p.add_argument("--lr", type=float, help="default: RDED's (1e-3; 2e-3 for CIFAR-100 conv3)")
        p.add_argument("--soft-labels", help="labels folder from `rded-fast relabel` (replayed instead of a teacher)")
        p.add_argument(
            "--labels",
            default="soft",
            choices=["soft", "hard"],
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
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--batch-size", type=int, help="default: RDED's rule from IPC and class count")
    add_train_amp(p, "student and teacher")
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
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
    _student_args(p, student=True)
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from rded_fast import StudentConfig, evaluate

    fields = {**_fields(args), "bn_refresh": args.bn_refresh == "on"}
    r = evaluate(StudentConfig(**fields, show_progress=not args.quiet))
    for line in r["set_notes"]:
        print(f"note: --distilled {args.distilled}: {line}", file=sys.stderr)
    if r["val_unused_classes"]:
        print(
            f"note: --val has {len(r['val_unused_classes'])} class folder(s) the distilled set does not have; "
            f"they were not tested: {', '.join(r['val_unused_classes'][:5])}"
        )
    seeds = r["parameters"]["seeds"]
    print(
        f"{args.student} on {r['train_images']} distilled images, {r['parameters']['recipe']['epochs']} epochs "
        f"({labels_line(r['parameters'])}), {len(seeds)} seed(s), {r['seconds']:.1f} s "
        f"({r['train_img_per_s']:,.0f} student img/s)"
    )
    if len(seeds) > 1:
        for run in r["runs"]:
            print(f"seed {run['seed']}: final top-1 {run['final_top1']:.2%}  top-5 {run['final_top5']:.2%}")
        print(f"mean final top-1 {r['final_top1']:.2%} +- {r['final_top1_std']:.2%} over {len(seeds)} seeds", end="")
    else:
        print(f"final top-1 {r['final_top1']:.2%}  top-5 {r['final_top5']:.2%}", end="")
    print(f"  best top-1 (last 20%) {r['best_top1']:.2%}  on {r['val_images']} validation images")
    if args.json:
        print(f"json: {args.json}")
    return 0


def labels_line(parameters: dict) -> str:
    """What the student learnt from, for the summary line: hard labels (no teacher) or whose soft labels."""
    if parameters["teacher_used"] is None:
        return "hard labels, no teacher"
    return f"{parameters['soft_label_source']} soft labels of {parameters['teacher_used']}"


def add_relabel(sub) -> None:
    p = sub.add_parser(
        "relabel",
        help="store soft labels so students train without the teacher",
        description="For every epoch and sample, store the augmentation parameters and the "
        "teacher's top-k logits (fp16); `evaluate --soft-labels` replays them. With "
        "--region, store instead one label per cell of each stitched image (the paper's "
        "region-level labels; any number of epochs can use them).",
    )
    _student_args(p, student=False)
    p.add_argument("--student", help="student name (only for RDED's batch-size rule)")
    p.add_argument(
        "--top-k",
        type=int,
        help="teacher logits kept per view (default: 10, or all classes when there are fewer; 0: all classes); "
        "the rest of the probability is spread evenly",
    )
    p.add_argument(
        "--region",
        nargs="?",
        const="cells",
        choices=["cells", "image"],
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

    fields = _fields(args)
    r = relabel(StudentConfig(**fields, show_progress=not args.quiet))
    for line in r["set_notes"]:
        print(f"note: --distilled {args.distilled}: {line}", file=sys.stderr)
    if r["replaced"]:
        print(f"note: replaced the earlier soft labels in {r['replaced']}")
    if "region" in r:
        print(
            f"stored {r['cells']} {r['region']} labels of {r['samples']} images, top-{r['top_k']} logits: "
            f"{r['total_bytes'] / 1024**2:.2f} MiB, in {r['out']}"
        )
    else:
        print(
            f"stored {r['epochs']} epochs x {r['samples']} samples, top-{r['top_k']} logits: "
            f"{r['bytes_per_epoch'] / 1024:.1f} KiB per epoch, {r['total_bytes'] / 1024**2:.2f} MiB in all, in {r['out']}"
        )
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
    p.add_argument("--stage", default="all", choices=["all", "decode", "score", "model", "e2e", "host", "quality", "train"])
    p.add_argument("--data", help="ImageFolder (or the loader's format) to run on")
    p.add_argument("--loader", default="auto")
    p.add_argument("--observer", default="resnet18")
    p.add_argument("--weights")
    p.add_argument("--input-size", type=int, default=recipe.INPUT_SIZE)
    p.add_argument("--factor", type=int, default=recipe.FACTOR)
    p.add_argument("--ipc", type=int, default=recipe.IPC)
    p.add_argument("--mipc", type=int, default=recipe.MIPC)
    p.add_argument("--num-crop", type=int, default=recipe.NUM_CROP)
    p.add_argument("--batch-size", type=int, default=64, help="source images per batch")
    p.add_argument("--workers", type=int, help="decoding workers (default: the cores available)")
    p.add_argument("--prefetch", type=int, help="loader batches in flight (default 4 on CUDA, 2 on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
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
    p.add_argument("--labels", default="soft", choices=["soft", "hard"], help="train: the teacher's labels or hard ones")
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

        argv = [
            "--work",
            args.work,
            "--seeds",
            str(args.seeds),
            "--epochs",
            str(args.epochs),
            "--device",
            args.device,
            "--ipcs",
            args.ipcs,
            "--factors",
            args.factors,
        ]
        return quality.main(argv + (["--json", args.json] if args.json else []))
    from pathlib import Path

    from rded_fast.benchmarks.stages import BenchConfig, run_bench as bench
    from rded_fast.distill import DistillConfig
    from rded_fast.fileio import atomic_write_text

    if not args.data and args.stage != "host":
        raise UserError(
            "bench --stage " + args.stage + " needs --data DIR (e.g. from python -m rded_fast.benchmarks.make_imagenet_like)"
        )
    job = DistillConfig(
        out="",
        show_progress=False,
        **{
            k: getattr(args, k)
            for k in (
                "data",
                "loader",
                "observer",
                "weights",
                "input_size",
                "factor",
                "ipc",
                "mipc",
                "num_crop",
                "batch_size",
                "workers",
                "device",
                "amp",
                "compile",
                "prefetch",
            )
        },
    )
    result = bench(
        BenchConfig(job, stage=args.stage, model_crops=args.model_crops, host_classes=args.host_classes, reference=args.reference)
    )
    for row in result.get("host", []):
        print(
            f"    host: {row['format']}: {row['critical_path_ms']:.2f} ms/class critical path ({row['serial_ms']:.1f} ms "
            f"serial, {row['host_workers']} thread(s), {'keeps up with' if row['keeps_up'] else 'falls behind'} "
            f"{row['score_ms']:.0f} ms/class scoring)"
        )
    for key, unit in (("decode", "img_per_s"), ("score", "crops_per_s"), ("model", "crops_per_s"), ("e2e", "crops_per_s")):
        if key in result:
            print(f"{key:>8}: {result[key][unit]:>10.0f} {unit.replace('_per_s', '/s')}")
    if "e2e" in result:
        frac = result["e2e"].get("fraction_of_model_only")
        print(f"     e2e: {result['e2e']['seconds']:.1f} s" + (f", {frac:.0%} of model-only" if frac else ""))
    if "speedup" in result:
        print(f"reference: {result['reference']['seconds']:.1f} s, speedup {result['speedup']:.2f}x")
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
    if args.source or args.family:
        if not rows:
            given = " ".join(f"--{k} {v}" for k, v in (("source", args.source), ("family", args.family)) if v)
            raise UserError(f"no models with {given}; run `rded-fast models` for the sources and families")
        print("\n".join(name for _, _, names in rows for name in names))
        return 0
    print(f"{'source':<12} {'family':<26} {'models':>6}  examples")
    for source, family, names in rows:
        print(f"{source:<12} {family:<26} {len(names):>6}  {' '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    if not any(source == "timm" for source, _, _ in rows):
        print("timm         (not installed: pip install 'rded-fast[timm]')")
    print("\nalso: " + "\n      ".join(source_usages().values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rded-fast", description="Fast, faithful RDED dataset distillation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_demo,
        add_distill,
        add_train_observer,
        add_evaluate,
        add_relabel,
        add_convert,
        add_bench,
        add_index,
        add_models,
    ):
        add(sub)
    return parser


def check_numbers(args) -> None:
    """One-line errors for numeric arguments out of range (argparse only checks that they parse); the ranges are one
    table for the command line and the Python API (rded_fast.arguments.NUMBER_RANGES)."""
    for dest in NUMBER_RANGES:
        value = getattr(args, dest, None)
        if value is None or isinstance(value, (bool, tuple)):  # a tuple (evaluate --seeds) was checked as it parsed
            continue
        check_number(dest, value, integer=isinstance(value, int))
    if getattr(args, "workers", None) is not None:  # every command that takes --workers: one rule (device.py)
        from rded_fast.device import check_workers

        check_workers(args.workers)


def os_error_fix(args, exc: OSError) -> str:
    """What to do after an OS error (disk full, permission): continue with --resume only where finished work was
    kept; a replacing run that failed has put the earlier output back. Looking for that work may fail the same
    way (a name too long, a folder unreadable): then the plain advice."""
    try:
        return _os_error_fix(args, exc)
    except OSError:
        return f"fix it and rerun {args.command}"


def _os_error_fix(args, exc: OSError) -> str:
    from pathlib import Path

    if getattr(exc, "put_back", None):
        return f"the earlier output {exc.put_back} was put back as it was; fix it and rerun"
    out = getattr(args, "out", None) or ""
    if args.command == "distill" and out and any(Path(out, ".rded-journal").glob("class_*.json")):
        return "finished classes are kept; fix it and rerun with --resume"
    if args.command == "train-observer" and Path(f"{out}.state").is_file():
        return "the per-epoch state OUT.state is kept; fix it and rerun with --resume"
    if args.command == "evaluate" and args.checkpoint and Path(args.checkpoint).is_file():
        return "fix it and rerun with --resume (--checkpoint holds the last finished epoch)"
    if args.command == "convert" and args.format == "dali" and out and any(Path(out).glob("shard-*.meta.json")):
        return "fix it and rerun convert (complete shards are kept)"
    return f"fix it and rerun {args.command}"


def os_error_message(args, exc: OSError) -> str:
    """`--out DIR: No space left on device (...)`: the argument whose path holds the failing file, the fix."""
    from pathlib import Path

    where = f" ({exc.filename})" if exc.filename else ""
    flag = None
    if exc.filename:
        failing = Path(os.path.abspath(str(exc.filename)))
        for dest, value in vars(args).items():
            if isinstance(value, str) and value and dest not in ("command", "device", "loader", "observer", "arch"):
                mine = Path(os.path.abspath(value))
                if (
                    failing == mine
                    or failing.is_relative_to(mine)
                    or (failing.parent == mine.parent and mine.name in failing.name)
                ):
                    flag = f"--{dest.replace('_', '-')} {value}"
                    break
    head = f"{flag}: " if flag else ""
    return f"{head}{exc.strerror or exc}{where}; {os_error_fix(args, exc)}"


def usable_inductor_cache() -> None:
    """An unusable TORCHINDUCTOR_CACHE_DIR makes `import torchvision` fail (torch creates it at import),
    even for runs that never compile: point it at a fresh temporary folder for this run, and say so."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK | os.X_OK):
            return
        why = "not writable"
    except OSError as exc:
        why = exc.strerror or str(exc)
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rded-fast-inductor-")
    print(
        f"note: TORCHINDUCTOR_CACHE_DIR {path} is unusable ({why}); using {os.environ['TORCHINDUCTOR_CACHE_DIR']} for this run",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        check_numbers(args)
        usable_inductor_cache()
        return args.run(args)
    except PeerFailed:  # another torchrun rank failed and prints its error; 0, so the launcher reports that rank's code
        return 0
    except UserError as exc:
        print(f"rded-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions, vanished files: name the argument and the fix
        print(f"rded-fast {args.command}: error: {os_error_message(args, exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP while an output is claimed (rded_fast.outputs)
        signum = getattr(exc, "signum", 2)
        back = f"; the earlier output {exc.put_back} was put back as it was" if getattr(exc, "put_back", None) else ""
        print(f"interrupted{f' ({exc})' if signum != 2 else ''}{back}", file=sys.stderr)
        return 128 + signum


def run() -> None:
    """The console command: `main`, then `exit_promptly` with its exit status."""
    exit_promptly(main())


def exit_promptly(code: int) -> None:
    """Exit with `code` without the interpreter's teardown of torch and its libraries (0.8-1.3 s measured on a
    2-core EPYC, every command, after the work is done): streams are flushed and exit handlers run, as at a
    normal exit. By then every file is written and renamed (each write is atomic). Only when a thread other than
    idle executor workers is still alive (work a normal exit would wait for) is the exit the normal one; unnamed
    executor workers are library pools (torch's compile workers) that a normal exit joins idle. After a signal
    (`code` 128 + signum) nothing is waited for: the run has cleaned up (the earlier output is back), a scheduler
    expects the process gone within seconds, and a thread the signal interrupted mid-import may never end."""
    busy = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive() and not t.name.startswith("ThreadPoolExecutor-")
    ]
    if busy and code <= 128:
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs after joining threads: logging, process pools, torchrun's group
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say there
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
