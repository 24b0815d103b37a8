"""Install rded-fast: the library `rded_fast`, the format writers `converters`, and the `rded-fast` command."""
from setuptools import find_packages, setup

setup(
    name="rded-fast",
    version="0.1.0",
    description="Fast, faithful RDED dataset distillation: decode, crop, score, select, stitch.",
    python_requires=">=3.10",
    packages=find_packages(include=["rded_fast", "rded_fast.*", "converters", "converters.*", "benchmarks"]),
    py_modules=["cli"],
    package_data={"rded_fast.models": ["imagenet_wnids.txt"]},
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
    },
    entry_points={"console_scripts": ["rded-fast=cli:main"]},
)
