"""The formats' home: one module per data format, told apart from the data, and no import circle in the library."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from rded_fast.converters.shards import convert as convert_shards
from rded_fast.errors import UserError
from rded_fast.formats import BETON, FOLDER, SHARDS, detect, open as open_source
from rded_fast.formats.folder import build_index
from rded_fast.formats.shards import SHARD_FOLDER
from rded_fast.loaders import open_source as loader_source, resolve_loader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, jpeg_tree) -> Path:
    out = tmp_path_factory.mktemp("formats") / "shards"
    convert_shards(str(jpeg_tree), str(out), workers=1, show_progress=False)
    return out


def test_detect_tells_the_formats_apart_from_the_data(tmp_path, jpeg_tree, shards):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"x")
    assert (detect(jpeg_tree), detect(shards), detect(beton)) == (FOLDER, SHARDS, BETON)
    assert detect(tmp_path / "missing.beton") == FOLDER  # a name alone is not a .beton; the listing says what is wrong


def test_a_shard_folder_opens_to_its_source_trees_index(jpeg_tree, shards):
    tree = build_index(jpeg_tree, show_progress=False)
    index = open_source(shards).index
    assert (index.classes, index.paths) == (tree.classes, tree.paths)
    assert (index.sizes == tree.sizes).all()
    assert SHARD_FOLDER.recognise(shards) and not SHARD_FOLDER.recognise(jpeg_tree)


def test_a_loader_is_refused_a_format_it_cannot_read(tmp_path, shards):
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"x")
    with pytest.raises(UserError, match=r"--loader torch cannot read; use --loader dali, tvjpeg"):
        loader_source("torch", str(shards))
    with pytest.raises(UserError, match=r"--loader dali cannot read; use --loader ffcv"):
        loader_source("dali", str(beton))


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="needs DALI")
def test_auto_reads_shards_on_a_cpu_with_dali(jpeg_tree, shards):
    assert resolve_loader("auto", str(shards), "cpu") == "dali"
    assert resolve_loader("auto", str(jpeg_tree), "cpu") == "torch"


def _imports(path: Path, package: str) -> set[str]:
    """Every rded_fast module `path` imports, at any depth of the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("rded_fast"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            found.add(f"{base}.{node.module}" if node.module else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rded_fast"))
    return found


def test_the_library_has_no_import_circle(root: Path = ROOT):
    modules = {}
    for path in (root / "rded_fast").rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        name = ".".join(parts)
        modules[name] = (path, name if rel.name == "__init__" else ".".join(parts[:-1]))
    graph = {m: {i for i in _imports(p, pkg) if i in modules and i != m} for m, (p, pkg) in modules.items()}
    # a package's own modules importing their package's __init__ is not a circle of files; the rest is
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_outputs_imports_no_format_and_no_loader():
    code = "import sys, rded_fast.outputs; print(sorted(m for m in sys.modules if m.startswith(('rded_fast.formats', 'rded_fast.loaders', 'rded_fast.index'))))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def _sidecar_parses(monkeypatch) -> list[str]:
    """Count every parse of a whole sidecar (a shard folder's dataset.json, a .beton's JSON), whoever parses it: each
    json.loads/json.load whose result names one of our converted formats and carries the source index."""
    import json

    from rded_fast.formats import beton, shards

    ours = {shards.FORMAT_NAME, beton.FORMAT_NAME}
    parsed: list[str] = []

    def counted(real):
        def parse(*args, **kwargs):
            data = real(*args, **kwargs)
            if isinstance(data, dict) and data.get("format") in ours and "index" in data:
                parsed.append(data["format"])
            return data

        return parse

    monkeypatch.setattr(json, "loads", counted(json.loads))
    monkeypatch.setattr(json, "load", counted(json.load))
    return parsed


@pytest.mark.parametrize("fmt", ["shards", "beton"])
def test_one_distill_parses_the_sidecar_once(fmt, fashion_tree, fashion_observer, tmp_path, monkeypatch):
    """The sidecar of a converted source is parsed once per distill (ImageNet-1K's: seconds of json.loads): the index
    and the byte table both come from that one read; neither the observer check's loader nor the classes' reopen it."""
    from rded_fast.converters import convert
    from rded_fast.distill import DistillConfig, distill

    data = tmp_path / ("fashion.beton" if fmt == "beton" else "shards")
    convert(fmt, str(fashion_tree), str(data), workers=2, show_progress=False)
    parsed = _sidecar_parses(monkeypatch)
    cfg = DistillConfig(
        data=str(data),
        out=str(tmp_path / "out"),
        observer="conv3",
        weights=str(fashion_observer),
        loader="ffcv" if fmt == "beton" else "dali",
        ipc=1,
        factor=1,
        mipc=10,
        num_crop=2,
        input_size=32,
        workers=2,
        device="cpu",
        amp="none",
        show_progress=False,
    )
    distill(cfg)
    print(f"\n{fmt}: the sidecar parsed {len(parsed)} time(s) in one distill")
    assert len(parsed) == 1


def test_one_name_per_format_and_the_earlier_spellings():
    """`convert --format` takes the formats' own names; `dali` and `ffcv` still name them (one alias table)."""
    from rded_fast.converters import convert
    from rded_fast.formats import ALIASES, WRITABLE

    assert WRITABLE == (SHARDS, BETON) == ("shards", "beton") and ALIASES == {"dali": SHARDS, "ffcv": BETON}
    for fmt in WRITABLE:
        assert importlib.util.find_spec(f"rded_fast.converters.{fmt}") is not None  # converters/<format>.py
    with pytest.raises(UserError, match=r"^--format png: choose one of shards, beton$"):
        convert("png", "data", "out")
