"""Per-epoch training state, written atomically, so training resumes where it stopped.

The state holds the model, optimizer and scheduler, every random generator the loop draws from,
and the metrics so far; on CPU a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_bytes


def save_state(path: str | os.PathLike, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | os.PathLike) -> dict | None:
    """The saved state, or None when there is none yet."""
    if not Path(path).is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"{path}: unreadable training checkpoint ({type(exc).__name__}); delete it to start over") from exc


def capture(model, opt, sched, generator: torch.Generator | None, epoch: int, **metrics) -> dict:
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "generator": generator.get_state() if generator is not None else None,
        "torch_rng": torch.get_rng_state(),
        **metrics,
    }


def restore(state: dict, model, opt, sched, generator: torch.Generator | None) -> int:
    """Load `state` into the training objects; returns the first epoch still to run."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]) + 1
