"""The training commands' arguments checked before any work, as the command line checks them, for the Python API too.

`validate_observer_config` (train-observer) and `validate_student_config` (evaluate, relabel) refuse a wrong type
(`epochs=2.5`, `lr=float('inf')`, `seed=None`, `resume="no"`), a number out of range (the command line's table,
rded_fast.arguments.NUMBER_RANGES) and a choice that is not one, in one line naming the flag; each returns the
config with path fields given as a pathlib.Path turned into strings. The configs are duck-typed (any dataclass
with those fields), so this module imports neither trainer.
"""

from __future__ import annotations

from rded_fast.arguments import check_config, paths_as_strings
from rded_fast.compile_rule import CHOICES as COMPILE_CHOICES
from rded_fast.device import TRAIN_AMP_CHOICES
from rded_fast.errors import UserError
from rded_fast.train.regions import REGION_GRIDS

OPTIMIZERS = ("sgd", "adamw")  # train-observer --optimizer
LABELS = ("soft", "hard")  # evaluate --labels: the teacher's soft labels, or the images' own one-hot ones
OBSERVER_PATHS = ("data", "out", "val")
STUDENT_PATHS = ("distilled", "teacher_weights", "val", "soft_labels", "out", "json", "checkpoint")


def _choose(flag: str, value, choices: tuple) -> None:
    if value not in choices:
        raise UserError(f"{flag} {value!r}: choose one of {', '.join(str(c) for c in choices)}")


def validate_observer_config(cfg):
    """`train_observer`'s arguments (an ObserverConfig), checked as the command line checks them; returns the config
    with its path fields as strings."""
    check_config(cfg, OBSERVER_PATHS)
    _choose("--optimizer", cfg.optimizer, OPTIMIZERS)
    _choose("--amp", cfg.amp, TRAIN_AMP_CHOICES)
    return paths_as_strings(cfg, OBSERVER_PATHS)


def validate_student_config(cfg):
    """`evaluate`'s and `relabel`'s arguments (a StudentConfig), checked as the command line checks them; returns the
    config with its path fields as strings."""
    check_config(cfg, STUDENT_PATHS)
    _choose("--labels", cfg.labels, LABELS)
    _choose("--amp", cfg.amp, TRAIN_AMP_CHOICES)
    _choose("--region", cfg.region, (None, *REGION_GRIDS))
    _choose("--compile", cfg.compile, COMPILE_CHOICES)
    return paths_as_strings(cfg, STUDENT_PATHS)
