"""The loaders' table: every `*_loader` module declares its LoaderSpec, and what rded_fast.loaders exports is derived
from the specs, without importing any loader's backend library."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from rded_fast.errors import UserError
from rded_fast.loaders import LOADER_CHOICES, LOADER_NAMES, LOADER_OPTIONS, SPECS, check_options

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_is_read_from_the_loaders_own_modules():
    assert LOADER_NAMES == ("torch", "dali", "ffcv", "tvjpeg")  # the reference loader first, then by name
    assert LOADER_CHOICES == ("auto", *LOADER_NAMES)
    for name, spec in SPECS.items():
        assert spec.build.__module__ == f"rded_fast.loaders.{name}_loader"  # one library file per loader
    assert [(o.flag, o.dest, o.default) for o in LOADER_OPTIONS] == [("--hw-decoder-load", "hw_decoder_load", 1.0)]
    assert SPECS["dali"].options == LOADER_OPTIONS


@pytest.mark.parametrize(
    "options, message",
    [
        ({"hw_decoder_load": math.nan}, "--hw-decoder-load nan: must be a finite number"),
        ({"hw_decoder_load": 2.0}, "--hw-decoder-load 2.0: must be in 0..1"),
        ({"hw_decoder_load": "1"}, "--hw-decoder-load 1: must be a number"),
        ({"hw_decoder_loads": 1.0}, "loader option 'hw_decoder_loads': unknown; choose one of hw_decoder_load"),
    ],
)
def test_a_bad_loader_option_is_refused_naming_its_flag(options, message):
    with pytest.raises(UserError, match="^" + message.replace(".", r"\.").replace("(", r"\(") + "$"):
        check_options(options)


def test_good_loader_options_pass():
    for value in (0.0, 0.5, 1, None):  # None: DALI's own split
        check_options({"hw_decoder_load": value})
    check_options({})


def test_listing_the_loaders_imports_no_backend_library():
    """DALI's import takes 1-3 s and ffcv's 3.5-5 s (and either may be missing): listing the loaders, checking their
    options and resolving `auto` import neither; only a loader's preload or its making does."""
    code = (
        "import sys; from rded_fast.loaders import LOADER_OPTIONS, check_options, resolve_loader;"
        "check_options({'hw_decoder_load': 1.0}); resolve_loader('auto', '.', 'cpu');"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'nvidia', 'ffcv', 'numba'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def test_a_loader_made_while_its_preload_still_imports_waits_for_it(tmp_path, jpeg_tree):
    """The preload thread imports ffcv (seconds) while the main thread makes the loader soon after (as a distill with
    --skip-observer-check does): two threads importing one package whose modules import each other saw it
    half-initialised ("cannot import name ... partially initialized module", on a 2-core CPU when the maker came
    0.05-0.1 s after the preload); the maker now waits for the preload. Several delays, as the window moves."""
    from rded_fast.converters.beton import convert

    beton = tmp_path / "train.beton"
    convert(str(jpeg_tree), str(beton), workers=1, show_progress=False)
    for delay in (0.0, 0.05, 0.1, 0.2):
        code = (
            "import time; from rded_fast.loaders import make_loader, open_source, preload;"
            "from rded_fast.plan import make_center_plan;"
            f"preload('ffcv'); source = open_source('ffcv', {str(beton)!r}, show_progress=False);"
            f"plan = make_center_plan(source.index, 0, 2); time.sleep({delay});"
            "loader = make_loader('ffcv', source, plan, 16, workers=1);"
            "print(sum(int(b.ok.sum()) for b in loader), len(plan))"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"delay {delay}: {proc.stderr[-3000:]}"
        decoded, planned = proc.stdout.split()
        assert decoded == planned != "0"


def test_a_fork_while_a_preload_runs_waits_for_it(tmp_path, jpeg_tree):
    """A distill refused early leaves its loader's preload running (ffcv: numba compiling); a convert in the same
    Python session then forks its workers, which copied the compile lock held by that thread and hung for ever. A
    fork now waits for the preloads (os.register_at_fork)."""
    code = (
        "from rded_fast.loaders import preload; preload('ffcv');"
        "from rded_fast.converters.beton import convert;"
        f"print(convert({str(jpeg_tree)!r}, {str(tmp_path / 'x.beton')!r}, workers=2, show_progress=False)['written'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 0


def test_auto_answers_where_the_nvidia_package_is_absent(monkeypatch, jpeg_tree):
    """A CPU-only or conda torch has no `nvidia` package at all, and asking for `nvidia.dali` then raises instead of
    answering: `--loader auto` must pick a loader that is installed."""
    from rded_fast.loaders import resolve_loader

    for name in [m for m in sys.modules if m.startswith("nvidia.")]:  # DALI imported by an earlier test
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia", None)  # what an import of the absent package finds
    assert resolve_loader("auto", str(jpeg_tree), "cuda") == "tvjpeg"
    assert resolve_loader("auto", str(jpeg_tree), "cpu") == "torch"
