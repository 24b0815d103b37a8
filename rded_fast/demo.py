"""The demo: real data (Fashion-MNIST) through the whole pipeline in a few minutes on a CPU.

Writes Fashion-MNIST once as 32x32 RGB PNG ImageFolders, trains a Conv3 observer for a few epochs on
a class-balanced subset, checks it on the real test split, distills IPC 10 at factor 1, and trains a
Conv3 student on the distilled images for a few epochs (RDED's recipe) to show a test accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rded_fast.data import fashion_mnist
from rded_fast.distill import DistillConfig, DistillResult, distill
from rded_fast.outputs import DEMO_FOLDER, claim_output
from rded_fast.train.observer import ObserverConfig, train_observer
from rded_fast.train.student import StudentConfig, evaluate


@dataclass
class DemoResult:
    data_dir: Path
    observer: Path
    observer_test_accuracy: float
    distill: DistillResult
    student: dict
    seconds: float


def run_demo(
    out: str = "demo-output",
    data_dir: str | None = None,
    epochs: int = 3,
    per_class: int = 1000,
    ipc: int = 10,
    student_epochs: int = 30,
    device: str = "auto",
    show_progress: bool = True,
) -> DemoResult:
    """Run the demo into `out`, which is checked first (before any data preparation): a new or empty
    folder, or an earlier demo output (replaced), never inside or around `data_dir`."""
    with claim_output(
        out, "--out", {"--data-dir": data_dir or fashion_mnist.default_data_dir()}, DEMO_FOLDER, overwrite=True, any_flag=None
    ):
        return _run_demo(out, data_dir, epochs, per_class, ipc, student_epochs, device, show_progress)


def _run_demo(
    out: str, data_dir: str | None, epochs: int, per_class: int, ipc: int, student_epochs: int, device: str, show_progress: bool
) -> DemoResult:
    t0 = time.perf_counter()
    train_dir, test_dir = fashion_mnist.prepare(Path(data_dir) if data_dir else None, show_progress=show_progress)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    ckpt = out_path / "observer_conv3.pth"
    summary = train_observer(
        ObserverConfig(
            data=str(train_dir),
            out=str(ckpt),
            arch="conv3",
            input_size=32,
            epochs=epochs,
            per_class=per_class,
            val=str(test_dir),
            device=device,
            show_progress=show_progress,
        )
    )
    result = distill(
        DistillConfig(
            data=str(train_dir),
            out=str(out_path / "distilled"),
            observer="conv3",
            weights=str(ckpt),
            ipc=ipc,
            factor=1,
            mipc=300,
            num_crop=5,
            input_size=32,
            seed=0,
            batch_size=128,
            workers=2,
            device=device,
            index=str(out_path / "train_index.npz"),
            overwrite=True,
            show_progress=show_progress,
        )
    )
    student = evaluate(
        StudentConfig(
            distilled=str(result.out),
            val=str(test_dir),
            teacher="conv3",
            teacher_weights=str(ckpt),
            student="conv3",
            epochs=student_epochs,
            seed=0,
            device=device,
            json=str(out_path / "evaluate.json"),
            show_progress=show_progress,
        )
    )
    return DemoResult(train_dir.parent, ckpt, summary["val_accuracy"], result, student, time.perf_counter() - t0)
