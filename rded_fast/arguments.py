"""The one rule for every command's arguments, whether they come from the command line or the Python API.

argparse parses `--ipc 2.5` as an error and `--ipc 2` as an int; the API takes whatever Python object it is given.
`check_config` gives a config dataclass the same checks the command line gets, before any work: every field of
the type its annotation names (an integer where an int belongs: not 2.5, not inf, not True; a number where a float
belongs, finite; a string where a path or a name belongs; True/False for a switch), and every number in its range
(`NUMBER_RANGES`, the table the command line checks too). Messages name the flag, as the command line's do.

For the command line (cli.py) this module also holds what argparse needs from the library: `check_numbers` (the same
ranges for every parsed number), `LibraryChoices` (a choice list that is a library constant) and the text forms of
tuple arguments (`seed_list`, `crop_scale`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import numbers
import os
import types
import typing
from collections.abc import Sequence

from rded_fast.errors import UserError

# Allowed range of every numeric argument, by destination name, for every command (lo, hi or None).
# tests/test_safety.py checks that every int/float argument of the parser has an entry here.
NUMBER_RANGES = {
    "ipc": (1, None),
    "factor": (1, None),
    "mipc": (1, None),
    "num_crop": (1, None),
    "input_size": (1, None),
    "seed": (0, 2**63 - 1),
    "batch_size": (1, None),
    "workers": (0, None),
    "jpeg_quality": (1, 100),
    "nproc": (1, None),
    "epochs": (1, None),
    "per_class": (1, None),
    "student_epochs": (1, None),
    "max_resolution": (1, 65500),
    "top_k": (0, None),  # 0: every class
    "model_crops": (1, None),
    "seeds": (1, None),
    "lr": (0.0, None),
    "weight_decay": (0.0, None),
    "prefetch": (1, None),
    "host_classes": (1, None),
    "hw_decoder_load": (0.0, 1.0),
    "num_classes": (1, None),
    "classes": (1, None),  # bench --stage train: classes of the synthetic set
}
POSITIVE = ("lr",)  # > 0, not >= 0


def flag_of(name: str) -> str:
    """`num_crop` -> `--num-crop`."""
    return "--" + name.replace("_", "-")


def check_number(name: str, value, integer: bool, flag: str | None = None) -> None:
    """Refuse `value` for the argument `name` unless it is an integer (`integer`) or a finite number, in the range
    NUMBER_RANGES gives `name` (when it gives one); `flag`: how the message names it (default `--name`)."""
    flag = flag or flag_of(name)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"{flag} {value!r}: must be {'an integer' if integer else 'a number'}")
    if not integer and not math.isfinite(value):
        raise UserError(f"{flag} {value}: must be a finite number")
    lo, hi = NUMBER_RANGES.get(name, (None, None))
    if lo is not None and (value < lo or (name in POSITIVE and value <= lo)):
        raise UserError(f"{flag} {value}: must be {'>' if name in POSITIVE else '>='} {lo}")
    if hi is not None and value > hi:
        raise UserError(f"{flag} {value}: must be <= {hi}")


def _check_value(name: str, value, hint, path: bool) -> None:
    """`value` against the annotation `hint` (int, float, bool, str, a tuple of numbers, or one of those | None); a
    `path` may be an os.PathLike too."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next((a for a in args if a is not type(None)), hint)
        args = typing.get_args(hint)
    flag = flag_of(name)
    if value is None:
        raise UserError(f"{flag} None: a value is required")
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{flag} {value!r}: must be True or False")
    elif hint in (int, float):
        check_number(name, value, integer=hint is int)
    elif hint is str:
        if not isinstance(value, str) and not (path and isinstance(value, os.PathLike)):
            raise UserError(f"{flag} {value!r}: must be a string, not {type(value).__name__}")
    elif typing.get_origin(hint) is tuple and all(a is float for a in args):
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != len(args):
            raise UserError(f"{flag} {value!r}: must be {len(args)} numbers")
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise UserError(f"{flag} {value!r}: must be {len(args)} finite numbers")


def paths_as_strings(cfg, names: tuple[str, ...]):
    """`cfg` with its path fields `names` given as os.PathLike (a pathlib.Path) turned into strings, the type the
    rest of the run (and its JSON records) expects."""
    changes = {n: os.fspath(v) for n in names if isinstance(v := getattr(cfg, n), os.PathLike)}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def check_config(cfg, paths: tuple[str, ...] = ()) -> None:
    """Every field of the config dataclass `cfg` of the type its annotation names and, for numbers, in its range:
    one line naming the flag (module docstring); the fields `paths` may be os.PathLike too (`paths_as_strings`
    turns them into strings). Fields of other types are left to the command's own checks."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        _check_value(f.name, getattr(cfg, f.name), hints[f.name], f.name in paths)


def check_numbers(values: dict) -> None:
    """The command line's check of every number it parsed (`values`: dest -> value), by NUMBER_RANGES, and of
    --workers by its one rule (rded_fast.device); argparse only checks that they parse."""
    for dest in NUMBER_RANGES:
        value = values.get(dest)
        if value is None or isinstance(value, (bool, tuple)):  # a tuple (evaluate --seeds): the library checks it
            continue
        check_number(dest, value, integer=isinstance(value, int))
    if values.get("workers") is not None:  # every command that takes --workers
        from rded_fast.device import check_workers

        check_workers(values["workers"])


class LibraryChoices(Sequence):
    """An argparse choice list that is made of library constants (`module.NAME`, and more NAMEs of the same module,
    each a tuple or the keys of a dict; between the command's own `before` and `after` names), read when argparse
    first needs it (a value given for the option, its command's usage or help): a command imports only the modules
    its own options name, and `rded-fast --help` none."""

    def __init__(self, module: str, *names: str, before: tuple[str, ...] = (), after: tuple[str, ...] = ()):
        self.module, self.names, self.before, self.after = module, names, before, after

    def _names(self) -> tuple[str, ...]:
        found = importlib.import_module(self.module)
        return (*self.before, *(value for name in self.names for value in getattr(found, name)), *self.after)

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())


def add_choice(parser: argparse.ArgumentParser, flag: str, names: LibraryChoices, **options) -> None:
    """`flag` with the choices `names`, set once argparse has made the option (it reads a choice list given to
    `add_argument` at once, to check the metavar; a library constant is read only when needed: LibraryChoices)."""
    parser.add_argument(flag, **options).choices = names


def seed_list(text: str) -> tuple[int, ...]:
    """--seeds A,B,C as whole numbers (distinct and >= 0: the library's check, rded_fast.train.student)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas, e.g. 0,1,2,3,4") from None


def crop_scale(text: str) -> tuple[float, float]:
    """--crop-scale MIN[,MAX] (MAX defaults to 1) as a (min, max) area fraction; the range is distill's check."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN or MIN,MAX (e.g. 0.08,1 or 1)")
    return values[0], values[1] if len(values) == 2 else 1.0
