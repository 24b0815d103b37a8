"""rded-fast: fast, faithful RDED dataset distillation.

Stages (see README): index -> plan -> loader -> score -> select -> stitch -> write, wired in
`rded_fast.distill`. The public API, for notebooks and scripts (the `rded-fast` command calls exactly these):

    from rded_fast import DistillConfig, distill, StudentConfig, evaluate, relabel, build, list_models

    result = distill(DistillConfig(data="train/", out="distilled/", observer="timm:resnet18", weights="r18.pth"))
    report = evaluate(StudentConfig(distilled="distilled/", teacher="timm:resnet18", teacher_weights="r18.pth",
                                    val="val/", student="resnet18"))

Names are imported on first use, so `import rded_fast` stays light. `rded_fast.distill` is the function
(the module of the same name is `sys.modules["rded_fast.distill"]`).
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

from rded_fast.version import __version__  # written once, in a leaf module (setup.py reads it there)

# The command (`cli.py`), the format writers (`converters/`) and the benchmarks (`benchmarks/`) sit beside this
# package in the repository and are installed inside it (setup.py), so that they import as rded_fast.cli,
# rded_fast.converters and rded_fast.benchmarks in both places and pip claims no generic top-level names.
_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "cli.py").is_file() and str(_CHECKOUT) not in __path__:
    __path__.append(str(_CHECKOUT))

# torch logs "No CUDA runtime is found, using CUDA_HOME=..." when anything imports torch.utils.cpp_extension (inductor
# does, compiling on a CPU) on a machine with a CUDA toolkit and no GPU: noise for a run that needs no CUDA. That one
# message is dropped; every other of that logger stays.
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not str(record.msg).startswith("No CUDA runtime is found")
)

# public name -> module that defines it
_EXPORTS = {
    "DistillConfig": "rded_fast.config",
    "DistillResult": "rded_fast.distill",
    "distill": "rded_fast.distill",
    "StudentConfig": "rded_fast.train.student",
    "evaluate": "rded_fast.train.student",
    "relabel": "rded_fast.train.student",
    "ObserverConfig": "rded_fast.train.observer",
    "train_observer": "rded_fast.train.observer",
    "BuiltModel": "rded_fast.models",
    "build": "rded_fast.models",
    "register": "rded_fast.models",
    "list_models": "rded_fast.models",
    "UserError": "rded_fast.errors",
}
__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily below
    from rded_fast.config import DistillConfig as DistillConfig
    from rded_fast.distill import DistillResult as DistillResult, distill as distill
    from rded_fast.errors import UserError as UserError
    from rded_fast.models import BuiltModel as BuiltModel, build as build, list_models as list_models, register as register
    from rded_fast.train.observer import ObserverConfig as ObserverConfig, train_observer as train_observer
    from rded_fast.train.student import StudentConfig as StudentConfig, evaluate as evaluate, relabel as relabel


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rded_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package; `distill` names the function, so that binding is skipped."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
