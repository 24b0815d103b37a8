"""`MODULE:FACTORY` models: any importable callable that returns an nn.Module (e.g. `mypkg.models:build_observer`,
or a file: `models/mine.py:build_observer`).

The callable gets `num_classes=` when its signature accepts it (by name or `**kwargs`); otherwise it is
called with no arguments and its output size is what it is. The current directory is importable, as
with `python -m`. The manifest records the factory's name and its module file's sha256.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys

from torch import nn

from rded_fast.errors import UserError
from rded_fast.models.checkpoint import file_sha256
from rded_fast.models.registry import ModelEntry, register_source


def _import_file(path: str, spec: str):
    """Import a .py file as a module named after its path (so two files with one name do not clash)."""
    if not os.path.isfile(path):
        raise UserError(f"model {spec}: no such file {path!r}; give MODULE:FACTORY or PATH.py:FACTORY")
    name = "rded_fast_factory_" + file_sha256(path)[:16]
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"model {spec}: importing {path!r} failed ({type(exc).__name__}: {exc})") from exc
    sys.modules[name] = module
    return module


def _import(module: str, spec: str):
    if module.endswith(".py"):
        return _import_file(module, spec)
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UserError(
            f"model {spec}: cannot import module {module!r} ({exc}); install it or run from the "
            "folder that contains it (or add that folder to PYTHONPATH)"
        ) from exc
    except Exception as exc:
        raise UserError(f"model {spec}: importing {module!r} failed ({type(exc).__name__}: {exc})") from exc
    finally:
        if added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


def accepts_num_classes(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _build(spec: str, fn, num_classes: int, input_size: int) -> nn.Module:
    try:
        model = fn(num_classes=num_classes) if accepts_num_classes(fn) else fn()
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"model {spec}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"model {spec}: the factory returned {type(model).__name__}, not a torch nn.Module")
    return model


def resolve(spec: str) -> ModelEntry:
    """The entry of `MODULE:FACTORY` (the attribute may be dotted: `pkg.mod:Class.build`)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"model {spec}: write a factory as MODULE:FACTORY, e.g. mypkg.models:build_observer")
    module = _import(module_name, spec)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise UserError(
                f"model {spec}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no attribute {attr!r}"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"model {spec}: {attr!r} is a {type(fn).__name__}, not a callable that returns a model")
    path = getattr(module, "__file__", None)
    origin = {"factory": spec, "file": path, "file_sha256": file_sha256(path) if path and os.path.isfile(path) else None}
    family = os.path.basename(module_name)[:-3] if module_name.endswith(".py") else module_name
    return ModelEntry(spec, "factory", family, functools.partial(_build, spec, fn), origin=origin, student_head_1000=False)


def factory_source(spec: str) -> str | None:
    """Where the `MODULE:FACTORY` model `spec` is read from, found without importing it: its .py file, or its
    top-level package's folder (or module file); None when `spec` is no factory or is not found (building it says
    why). An output must not hold it: replacing the output would move it away before it is read."""
    from rded_fast.models.registry import is_factory_name

    if not is_factory_name(spec):
        return None
    module = spec.partition(":")[0]
    if module.endswith(".py"):
        return module
    try:
        found = importlib.machinery.PathFinder.find_spec(module.split(".")[0], [*sys.path, os.getcwd()])
    except (ImportError, ValueError):
        return None
    if found is None:
        return None
    return next(iter(found.submodule_search_locations or []), None) or found.origin


register_source(
    "*",
    resolve,
    lambda: None,
    "MODULE:FACTORY (any importable callable returning an nn.Module, "
    "called with num_classes= when it takes it); --weights an optional checkpoint",
)
