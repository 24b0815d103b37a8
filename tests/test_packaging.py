"""What `pip install` puts in site-packages: only `rded_fast` (with the command, converters and benchmarks inside)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "cli.py"):  # built from a copy: no build/ left in the checkout
        shutil.copy2(ROOT / name, source / name)
    for name in ("rded_fast", "converters", "benchmarks"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("rded_fast-*.whl")
    return built


def test_wheel_claims_only_the_package_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"rded_fast", wheel.name.split("-py")[0] + ".dist-info"}
    for module in ("rded_fast/cli.py", "rded_fast/converters/shards.py", "rded_fast/benchmarks/stages.py"):
        assert module in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rded-fast = rded_fast.cli:run" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_runs_the_command_away_from_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import rded_fast, rded_fast.converters, rded_fast.benchmarks.stages, importlib.util as u;"
        "print(rded_fast.__path__[0]); print([u.find_spec(n) for n in ('cli', 'converters', 'benchmarks')])"
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    where, found = run.stdout.splitlines()
    assert Path(where) == site / "rded_fast" and found == "[None, None, None]"
    help_run = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(site)!r}); from rded_fast.cli import main; sys.exit(main(['--help']))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert help_run.returncode == 0 and "usage: rded-fast" in help_run.stdout
