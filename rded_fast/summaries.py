"""What each command says when its work is done: a result's summary as plain lines of text.

The command line prints them (stdout, or stderr for notes beside a JSON document); a notebook can print the same.
Every function takes the result a library call returned (and the names the user gave) and returns lines.
"""

from __future__ import annotations


def distill_lines(result) -> list[str]:
    """A DistillResult in words: the manifest's notes, the observer check, what was written and where."""
    lines = [f"note: {line}" for line in result.notes]
    if result.observer_accuracy is not None:
        lines.append(f"observer top-1 on a sample of training images: {result.observer_accuracy:.1%}")
    lines.append(f"wrote {result.num_images} images to {result.out} in {result.seconds['total']:.1f} s")
    lines.append(f"manifest: {result.manifest}")
    if result.contact_sheet is not None:
        lines.append(f"contact sheet: {result.contact_sheet}")
    return lines


def observer_lines(summary: dict, arch: str) -> list[str]:
    """`train_observer`'s summary: what it replaced, its accuracies and time, the checkpoint."""
    lines = [f"note: replaced the earlier checkpoint {summary['replaced']}"] if summary["replaced"] else []
    val = summary["val_accuracy"]
    lines.append(
        f"trained {arch} on {summary['train_images']} images in {summary['seconds']:.1f} s: "
        f"train top-1 {summary['train_accuracy']:.1%}" + (f", val top-1 {val:.1%}" if val is not None else "")
    )
    lines.append(f"checkpoint: {summary['checkpoint']}")
    return lines


def demo_lines(result) -> list[str]:
    """The demo's stages: the data, the observer, the distilled set, the student, the time."""
    st = result.student
    return [
        f"data: {result.data_dir} (Fashion-MNIST, 32x32 RGB PNG, train/ and test/)",
        f"observer: {result.observer}, test top-1 {result.observer_test_accuracy:.1%}",
        *distill_lines(result.distill),
        f"student conv3 trained {st['parameters']['recipe']['epochs']} epochs on the {st['train_images']} distilled "
        f"images: test top-1 {st['final_top1']:.1%} (Fashion-MNIST test split, {st['val_images']} images)",
        f"demo finished in {result.seconds:.1f} s",
    ]


def convert_notes(summary: dict, unlisted: list[str], out: str) -> list[str]:
    """Notes beside convert's JSON summary: class folders the class map left out (`unlisted`), what was replaced
    or reused at `out`."""
    notes = []
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (", ..." if len(unlisted) > 5 else "")
        notes.append(f"note: --class-map does not name {len(unlisted)} class folder(s) of --data; NOT converted: {shown}")
    if summary.get("replaced"):
        notes.append(f"note: replaced the earlier output {summary['replaced']}")
    elif summary.get("reused_shards"):
        notes.append(f"note: kept {summary['reused_shards']} complete shard(s) of an earlier conversion in {out}")
    return notes


def set_notes(result: dict, distilled: str) -> list[str]:
    """What the distilled set held beyond or below its manifest (evaluate's and relabel's `set_notes`)."""
    return [f"note: --distilled {distilled}: {line}" for line in result["set_notes"]]


def labels_line(parameters: dict) -> str:
    """What the student learnt from, for the summary line: hard labels (no teacher) or whose soft labels."""
    if parameters["teacher_used"] is None:
        return "hard labels, no teacher"
    return f"{parameters['soft_label_source']} soft labels of {parameters['teacher_used']}"


def evaluate_lines(r: dict, student: str, json_path: str | None) -> list[str]:
    """`evaluate`'s result: classes of --val left untested, the run, each seed's accuracy (or the one run's), the
    best top-1 and where the JSON went."""
    lines = []
    if unused := r["val_unused_classes"]:
        lines.append(
            f"note: --val has {len(unused)} class folder(s) the distilled set does not have; "
            f"they were not tested: {', '.join(unused[:5])}"
        )
    seeds = r["parameters"]["seeds"]
    lines.append(
        f"{student} on {r['train_images']} distilled images, {r['parameters']['recipe']['epochs']} epochs "
        f"({labels_line(r['parameters'])}), {len(seeds)} seed(s), {r['seconds']:.1f} s "
        f"({r['train_img_per_s']:,.0f} student img/s)"
    )
    if len(seeds) > 1:
        lines += [f"seed {run['seed']}: final top-1 {run['final_top1']:.2%}  top-5 {run['final_top5']:.2%}" for run in r["runs"]]
        head = f"mean final top-1 {r['final_top1']:.2%} +- {r['final_top1_std']:.2%} over {len(seeds)} seeds"
    else:
        head = f"final top-1 {r['final_top1']:.2%}  top-5 {r['final_top5']:.2%}"
    lines.append(f"{head}  best top-1 (last 20%) {r['best_top1']:.2%}  on {r['val_images']} validation images")
    if json_path:
        lines.append(f"json: {json_path}")
    return lines


def relabel_lines(r: dict) -> list[str]:
    """`relabel`'s result: what it replaced, and how many labels it stored where (per view, or per region)."""
    lines = [f"note: replaced the earlier soft labels in {r['replaced']}"] if r["replaced"] else []
    if "region" in r:
        lines.append(
            f"stored {r['cells']} {r['region']} labels of {r['samples']} images, top-{r['top_k']} logits: "
            f"{r['total_bytes'] / 1024**2:.2f} MiB, in {r['out']}"
        )
    else:
        lines.append(
            f"stored {r['epochs']} epochs x {r['samples']} samples, top-{r['top_k']} logits: "
            f"{r['bytes_per_epoch'] / 1024:.1f} KiB per epoch, {r['total_bytes'] / 1024**2:.2f} MiB in all, in {r['out']}"
        )
    return lines


def bench_lines(result: dict) -> list[str]:
    """`bench`'s stages (rded_fast.benchmarks.stages.run_bench's result): host rows, each stage's rate, the whole
    run against model-only, the reference's time and the speedup."""
    lines = [
        f"    host: {row['format']}: {row['critical_path_ms']:.2f} ms/class critical path ({row['serial_ms']:.1f} ms "
        f"serial, {row['host_workers']} thread(s), {'keeps up with' if row['keeps_up'] else 'falls behind'} "
        f"{row['score_ms']:.0f} ms/class scoring)"
        for row in result.get("host", [])
    ]
    for key, unit in (("decode", "img_per_s"), ("score", "crops_per_s"), ("model", "crops_per_s"), ("e2e", "crops_per_s")):
        if key in result:
            lines.append(f"{key:>8}: {result[key][unit]:>10.0f} {unit.replace('_per_s', '/s')}")
    if "e2e" in result:
        frac = result["e2e"].get("fraction_of_model_only")
        lines.append(f"     e2e: {result['e2e']['seconds']:.1f} s" + (f", {frac:.0%} of model-only" if frac else ""))
    if "speedup" in result:
        lines.append(f"reference: {result['reference']['seconds']:.1f} s, speedup {result['speedup']:.2f}x")
    return lines


def models_table(rows: list[tuple[str, str, list[str]]], usages: list[str]) -> list[str]:
    """`rded-fast models` without options: one line per (source, family, names) row, then the other sources'
    `usages` (rded_fast.models.source_usages)."""
    lines = [f"{'source':<12} {'family':<26} {'models':>6}  examples"]
    for source, family, names in rows:
        lines.append(f"{source:<12} {family:<26} {len(names):>6}  {' '.join(names[:4])}{' ...' if len(names) > 4 else ''}")
    if not any(source == "timm" for source, _, _ in rows):
        lines.append("timm         (not installed: pip install 'rded-fast[timm]')")
    lines.append("\nalso: " + "\n      ".join(usages))
    return lines
