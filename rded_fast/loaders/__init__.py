"""The loaders, as one table: each `*_loader` module of this package declares its LoaderSpec (rded_fast.loaders.base),
and everything here reads the table, so adding a loader is adding its module.

`open_source(name, data)` opens a source as loader `name` reads it (refusing a format it cannot read, naming the
loaders that can), `make_loader(name, source, plan, ...)` builds the CropLoader that executes a CropPlan over it,
`resolve_loader("auto", data, device)` picks the fast one, `check_options` checks the loader-only options
(`LOADER_OPTIONS`, from which the command line makes its flags) and `preload(name)` imports a loader's library ahead
of its first use. The specs' modules import no backend library (DALI, ffcv) until a loader is made or preloaded.
Nothing outside this package branches on the loader name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import threading
from collections.abc import Mapping
from typing import Any

import torch

from rded_fast.errors import UserError
from rded_fast.formats import BETON, Source, detect, open as open_format
from rded_fast.loaders.base import CropBatch, CropLoader, LoaderOption, LoaderSpec
from rded_fast.plan import CropPlan


def _discover() -> dict[str, LoaderSpec]:
    """name -> LoaderSpec of every `*_loader` module here: the reference loader first, then by name."""
    specs = [
        importlib.import_module(f"{__name__}.{m.name}").SPEC for m in pkgutil.iter_modules(__path__) if m.name.endswith("_loader")
    ]
    return {s.name: s for s in sorted(specs, key=lambda s: (not s.reference, s.name))}


SPECS = _discover()
LOADER_NAMES = tuple(SPECS)
LOADER_CHOICES = ("auto", *LOADER_NAMES)
LOADER_OPTIONS = tuple(option for spec in SPECS.values() for option in spec.options)


def default_prefetch(device: str) -> int:
    """Batches each loader keeps in flight: deeper beside a GPU (it consumes fast), shallow on a CPU (the
    cores are shared with scoring, and every batch ahead is memory)."""
    return 4 if str(device).startswith("cuda") else 2


def preload(name: str) -> None:
    """Start loader `name`'s preload hook (its library's import, seconds for DALI or ffcv, then what it compiles of
    its own) in a background thread: the work overlaps the index, the plan and
    the observer's compile instead of delaying the observer check, the loader's first user. A failing hook is left
    to the place the loader is made, which imports the library again and says what is wrong.

    `make_loader` waits for it: the library's import must not run in two threads at once (a package whose modules
    import each other, as ffcv's do, is then seen half-initialised by one of them). The thread is a daemon, so an
    exit does not wait for it: a signal that interrupts the main thread inside an import can leave the import lock
    held for ever (CPython does not release it), and this thread would then never end."""
    spec = SPECS.get(name)
    if spec is not None and spec.preload is not None and name not in _PRELOADS:
        thread = threading.Thread(target=_run_quietly, args=(spec.preload,), name=f"preload-{name}", daemon=True)
        _PRELOADS[name] = thread
        thread.start()


_PRELOADS: dict[str, threading.Thread] = {}  # each loader's preload thread, once per process


def _join_preloads() -> None:
    """Before any fork of this process: a child gets a copy of every lock a preload thread holds (numba's compile
    lock, an import lock) but not the thread that would release it, and hangs on the first one it needs (a
    converter's worker after a refused distill in one Python session did). So a fork waits for the preloads."""
    for thread in list(_PRELOADS.values()):
        if thread is not threading.current_thread():
            thread.join()


os.register_at_fork(before=_join_preloads)


def _run_quietly(hook) -> None:
    try:
        hook()
    except BaseException:  # noqa: BLE001 - reported where the loader is made (a warm-up's failure: where it is used)
        pass


def resolve_loader(name: str, data: str, device: torch.device | str) -> str:
    """`auto`: of the loaders that read `data`'s format, the first by their `auto_order` on this device type whose
    library is installed (else the first regardless: making it says what is missing). So: ffcv for a .beton; on
    CUDA DALI with GPU decoding when it is installed, else tvjpeg (torchvision's nvJPEG decoding, which every
    install has); on a CPU torch (PIL), or for a shard folder, which PIL's loader cannot read, DALI (else tvjpeg).
    Why a CPU does not pick DALI or tvjpeg for a tree: benchmarks/README.md ("Timings the code quotes")."""
    if name != "auto":
        return name
    kind, where = detect(data), torch.device(device).type
    readers = sorted((s for s in SPECS.values() if kind in s.reads), key=lambda s: s.auto_order[where])
    installed = (s for s in readers if s.library is None or _installed(s.library))
    return next(installed, readers[0]).name


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a missing parent package, such as `nvidia` on a CPU-only
    install, makes find_spec raise rather than answer)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _spec(name: str) -> LoaderSpec:
    if name not in SPECS:  # "auto" is resolved before a loader is made (resolve_loader)
        raise UserError(f"--loader {name}: unknown loader; choose one of {', '.join(LOADER_NAMES)}")
    return SPECS[name]


def open_source(
    name: str, data: str, class_map: list[str] | None = None, cache: str | None = None, show_progress: bool = True
) -> Source:
    """`data` opened as loader `name` reads it (rded_fast.formats.open: the index, and where the images' bytes are);
    a format the loader cannot read is refused, naming the loaders that can."""
    spec = _spec(name)
    kind = detect(data)
    if kind not in spec.reads:
        if spec.reads == (BETON,):  # anything but a .beton: the .beton reader says what is missing
            kind = BETON
        else:
            readers = ", ".join(n for n, s in SPECS.items() if kind in s.reads)
            raise UserError(
                f"--data {data}: a {kind} source, which --loader {name} cannot read; use --loader {readers} (or auto)"
            )
    return open_format(data, class_map, cache, show_progress, kind=kind)


def check_options(options: Mapping[str, Any]) -> None:
    """Refuse an unknown loader option, or a value its LoaderOption's check refuses, naming its flag."""
    known = {option.dest: option for option in LOADER_OPTIONS}
    for key, value in options.items():
        if key not in known:
            raise UserError(f"loader option {key!r}: unknown; choose one of {', '.join(known) or 'none'}")
        why = known[key].check(value)
        if why is not None:
            raise UserError(f"{known[key].flag} {value}: {why}")


def make_loader(
    name: str,
    source: Source,
    plan: CropPlan,
    crop_size: int,
    *,
    batch_size: int = 64,
    workers: int = 4,
    device: str = "cpu",
    prefetch: int | None = None,
    reuse_buffers: bool = False,
    options: Mapping[str, Any] | None = None,
) -> CropLoader:
    """Build the loader `name` over `plan` on `source` (`open_source`); it cuts the planned boxes into
    [B, K, 3, crop_size, crop_size] uint8.

    `device` is where scoring runs: a loader that can decode there (DALI: "mixed" on CUDA; tvjpeg: always)
    does so. `prefetch`: batches kept in flight (None: `default_prefetch(device)`). With `reuse_buffers` the torch
    and ffcv loaders hand out batches in output buffers made once and rotated (pinned when CUDA is present): a
    batch stays valid until `prefetch + 1` more batches have been taken, so a consumer copies what it keeps (device
    copies queued before taking the next batch are safe). `options`: loader-only options (`LOADER_OPTIONS`; this
    loader's defaults fill in the rest, the others' are ignored)."""
    spec = _spec(name)
    if name in _PRELOADS:
        _PRELOADS[name].join()  # its library imported (or failed: then imported again below, and the error said)
    given = dict(options or {})
    check_options(given)
    own = {option.dest: given.get(option.dest, option.default) for option in spec.options}
    prefetch = default_prefetch(device) if prefetch is None else int(prefetch)
    return spec.build(
        source, plan, crop_size, batch_size=batch_size, workers=workers, device=device, prefetch=prefetch,
        reuse_buffers=reuse_buffers, **own,
    )  # fmt: skip


__all__ = [
    "CropBatch",
    "CropLoader",
    "LOADER_CHOICES",
    "LOADER_NAMES",
    "LOADER_OPTIONS",
    "LoaderOption",
    "LoaderSpec",
    "SPECS",
    "check_options",
    "default_prefetch",
    "make_loader",
    "open_source",
    "preload",
    "resolve_loader",
]
