"""Any observer: timm models, MODULE:FACTORY callables, torchvision weights from the local hub cache,
head rows picked by class (WNIDs, class maps), per-observer normalisation, the registry and the public API.
Nothing here downloads: every weight file is made locally from a random initialisation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rded_fast.errors import UserError
from rded_fast.models import build, choose_head_rows, imagenet_wnids, list_models, model_families
from rded_fast.score import Scorer, normalize_uint8

try:
    import timm
except ImportError:  # the [timm] extra is optional: only the timm tests are skipped
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm not installed (pip install 'rded-fast[timm]')")
ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n02102040", "n03000684"]  # tench, English springer, chain saw: rows 0, 217, 491


def _save_timm(tmp_path: Path, name: str, layout: str, size: int | None = None, classes: int = 1000) -> Path:
    """Random-init timm weights saved as timm's train.py does (`state_dict` + `module.`/`_orig_mod.` prefixes)."""
    torch.manual_seed(0)
    kw = {"img_size": size} if size else {}
    sd = timm.create_model(name, pretrained=False, num_classes=classes, **kw).state_dict()
    if layout == "timm":
        obj = {"epoch": 3, "arch": name, "state_dict": {"module." + k: v for k, v in sd.items()}}
    elif layout == "compiled":
        obj = {"model": {"_orig_mod." + k: v for k, v in sd.items()}}
    else:
        obj = sd
    path = tmp_path / f"{name}_{layout}.pth"
    torch.save(obj, path)
    return path


@needs_timm
@pytest.mark.parametrize("layout", ["timm", "compiled", "bare"])
def test_timm_resnet18_local_weights_sliced_head(tmp_path, layout):
    path = _save_timm(tmp_path, "resnet18", layout)
    sd = torch.load(path, weights_only=True)
    sd = sd.get("state_dict") or sd.get("model") or sd
    fc = next(v for k, v in sd.items() if k.endswith("fc.weight"))
    built = build("timm:resnet18", 3, str(path), 64)
    assert built.head_size == 1000 and built.model.fc.out_features == 3 and built.source == "timm"
    assert torch.equal(built.model.fc.weight, fc[:3]) and built.family == "resnet"
    assert len(built.weights_sha256) == 64 and built.head_rows == [0, 1, 2]


@needs_timm
def test_timm_other_family_own_normalisation_and_fixed_input_size(tmp_path):
    """test_vit: a ViT (fixed input size, built at the run's 32 px) trained with mean = std = 0.5."""
    path = _save_timm(tmp_path, "test_vit", "timm", size=32, classes=5)
    built = build("timm:test_vit", 5, str(path), 32)
    assert built.mean == (0.5, 0.5, 0.5) and built.std == (0.5, 0.5, 0.5) and built.family == "vision_transformer"
    assert built.convention["input_size"] == 160 and built.convention["fixed_input_size"]
    crops = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    scores, _ = Scorer(built.model, 32, mean=built.mean, std=built.std, channels_last=False)(crops, labels)
    with torch.no_grad():
        own = torch.nn.functional.cross_entropy(built.model((crops.float() / 255 - 0.5) / 0.5), labels, reduction="none")
        imagenet = torch.nn.functional.cross_entropy(built.model(normalize_uint8(crops)), labels, reduction="none")
    assert torch.allclose(scores, own, atol=1e-5) and not torch.allclose(scores, imagenet, atol=1e-3)


@needs_timm
def test_timm_pretrained_tag_offline_is_one_line(jpeg_tree, tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rded_fast.cli",
            "distill",
            "--data",
            str(jpeg_tree),
            "--out",
            str(tmp_path / "o"),
            "--observer",
            "timm:resnet18",
            "--weights",
            "a1_in1k",
            "--input-size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--quiet",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--weights a1_in1k: timm could not load the pretrained weights of resnet18.a1_in1k" in r.stderr
    assert "--weights FILE" in r.stderr and not (tmp_path / "o").exists()


@needs_timm
def test_timm_errors(tmp_path):
    with pytest.raises(UserError, match="timm .* has no model 'resnet19'"):
        build("timm:resnet19", 3)
    with pytest.raises(UserError, match="Invalid pretrained tag"):
        build("timm:resnet18.no_such_tag", 3)
    small = _save_timm(tmp_path, "resnet18", "bare", classes=2)
    with pytest.raises(UserError, match="head has 2 outputs but the dataset has 3 classes"):
        build("timm:resnet18", 3, str(small), 64)
    with pytest.raises(UserError, match="does not fit timm:resnet34"):
        build("timm:resnet34", 3, str(small), 64)


def test_factory_observers(tmp_path):
    built = build("tests.observer_factories:tiny_observer", 4, None, 32)
    assert built.source == "factory" and built.model[-1].out_features == 4
    assert built.origin["factory"] == "tests.observer_factories:tiny_observer"
    assert built.origin["file"].endswith("observer_factories.py") and len(built.origin["file_sha256"]) == 64
    # weights with a larger head: rebuilt at the checkpoint's size (num_classes=), then sliced
    torch.manual_seed(0)
    sd = build("tests.observer_factories:tiny_observer", 10, None, 32).model.state_dict()
    torch.save({"model": sd}, tmp_path / "f.pth")
    built = build("tests.observer_factories:tiny_observer", 4, str(tmp_path / "f.pth"), 32)
    assert built.head_size == 10 and torch.equal(built.model[-1].weight, sd["4.weight"][:4])
    # no num_classes argument and no Linear layer: output columns are selected
    x = torch.rand(2, 3, 16, 16)
    conv = build(
        "tests.observer_factories:fixed_conv_head", 3, None, 16, classes=["a", "b", "c"], class_map=["z", "c", "b", "a", "y"]
    )
    assert conv.head_size == 5 and conv.head_rows == [3, 2, 1] and conv.head_rule == "class-map"
    assert torch.equal(conv.model(x), conv.model.model(x)[:, [3, 2, 1]])
    # a factory in a file, named by its path
    path = Path(__file__).with_name("observer_factories.py")
    by_file = build(f"{path}:tiny_observer", 4, None, 32)
    assert by_file.origin["file_sha256"] == built.origin["file_sha256"] and by_file.family == "observer_factories"
    with pytest.raises(UserError, match="no such file"):
        build(f"{tmp_path}/missing.py:tiny_observer", 4, None, 32)
    # a Linear that is not the output: the forward pass decides the size
    assert build("tests.observer_factories:linear_not_head", 3, None, 16).head_size == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_pkg_xyz.models:build", "cannot import module 'no_such_pkg_xyz.models'"),
        ("tests.observer_factories:missing", "has no attribute 'missing'"),
        ("tests.observer_factories:NOT_CALLABLE", "is a int, not a callable"),
        ("tests.observer_factories:not_a_module", "returned dict, not a torch nn.Module"),
        ("tests.observer_factories:raises", "the factory raised RuntimeError: no GPU here"),
        ("tests.observer_factories:two_outputs", "head has 2 outputs but the dataset has 3 classes"),
    ],
)
def test_factory_errors(spec, message):
    with pytest.raises(UserError, match=message):
        build(spec, 3, None, 16)


def test_torchvision_weights_from_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # use TORCH_HOME even if set_dir was called

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(UserError, match=f"resnet18-f37072fd.pth is not in the torch hub cache .* put it at {cached}"):
        build("resnet18", 3, "IMAGENET1K_V1", 64)
    torch.manual_seed(1)
    sd = build("resnet18", 1000, None, 64).model.state_dict()
    cached.parent.mkdir(parents=True)
    torch.save(sd, cached)
    built = build("resnet18", 3, "IMAGENET1K_V1", 64)
    assert built.head_size == 1000 and torch.equal(built.model.conv1.weight, sd["conv1.weight"])
    assert built.convention == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_head_rows_by_wnid_and_class_map(tmp_path):
    table = imagenet_wnids()
    assert len(table) == 1000 and table[0] == "n01440764" and list(table) == sorted(table)
    assert choose_head_rows(WNIDS, 1000) == ([0, 217, 491], "imagenet-wnid")
    assert choose_head_rows(WNIDS, 10) == ([0, 1, 2], "first-rows")  # a 10-way ImageNette head: its own order
    assert choose_head_rows(["b", "a"], 5, ["x", "a", "b"]) == ([2, 1], "class-map")
    with pytest.raises(UserError, match="does not name the class folder 'c'"):
        choose_head_rows(["a", "c"], 5, ["a", "b"])
    with pytest.raises(UserError, match="lists 3 classes but the observer head has 2"):
        choose_head_rows(["a"], 2, ["a", "b", "c"])
    torch.manual_seed(0)
    full = build("resnet18_modified", 1000, None, 32).model
    torch.save(full.state_dict(), tmp_path / "in1k.pth")
    sub = build("resnet18_modified", 3, str(tmp_path / "in1k.pth"), 32, classes=WNIDS)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(sub.model(x), full(x)[:, [0, 217, 491]], atol=1e-6)


def _wnid_tree(root: Path, names: list[str]) -> Path:
    from tests.conftest import write_synthetic_jpegs

    write_synthetic_jpegs(root, classes=len(names), per_class=4)
    for i, name in enumerate(names):
        (root / f"class_{i:02d}").rename(root / name)
    return root


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rded_fast.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@needs_timm
def test_distill_imagenet_subset_with_full_head_through_cli(tmp_path):
    """A timm ResNet-18 with a 1000-way head on three WNID folders: rows by WNID, recorded in the manifest."""
    data = _wnid_tree(tmp_path / "data", WNIDS)
    weights = _save_timm(tmp_path, "resnet18", "timm")
    out = tmp_path / "out"
    r = _cli(
        "distill",
        "--data",
        str(data),
        "--observer",
        "timm:resnet18",
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--ipc",
        "1",
        "--factor",
        "1",
        "--mipc",
        "4",
        "--num-crop",
        "2",
        "--input-size",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--skip-observer-check",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    observer = json.loads((out / "manifest.json").read_text())["observer"]
    assert observer["name"] == "timm:resnet18" and observer["source"] == "timm" and observer["head_size"] == 1000
    assert observer["head_rows"] == {"n01440764": 0, "n02102040": 217, "n03000684": 491}
    assert observer["head_rule"] == "imagenet-wnid" and observer["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert len(observer["weights_sha256"]) == 64
    # relabel and evaluate with the same observer as teacher (its recorded head rows) and a timm student
    common = [
        "--distilled",
        str(out),
        "--teacher",
        "timm:resnet18",
        "--teacher-weights",
        str(weights),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
    ]
    r = _cli("relabel", *common, "--out", str(tmp_path / "labels"))
    assert r.returncode == 0, r.stderr
    header = json.loads((tmp_path / "labels" / "header.json").read_text())
    assert header["teacher_head_rows"] == observer["head_rows"]
    r = _cli(
        "evaluate",
        *common,
        "--val",
        str(data),
        "--student",
        "timm:test_resnet",
        "--soft-labels",
        str(tmp_path / "labels"),
        "--json",
        str(tmp_path / "eval.json"),
    )
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["parameters"]["student"] == "timm:test_resnet" and 0.0 <= result["final_top1"] <= 1.0


@needs_timm
def test_teacher_rows_and_normalisation(tmp_path):
    """A teacher with its own normalisation sees the recipe's ImageNet-normalised batches converted to it,
    and a teacher that is the distilled set's observer uses the rows the manifest recorded."""
    from rded_fast.train.teacher import build_teacher

    path = _save_timm(tmp_path, "test_vit", "bare", size=32, classes=6)
    manifest = {"observer": {"name": "timm:test_vit", "head_rows": {"a": 4, "b": 1}}}
    teacher, built = build_teacher("timm:test_vit", str(path), ["a", "b"], 32, manifest, torch.device("cpu"))
    full = timm.create_model("test_vit", num_classes=6, img_size=32)
    full.load_state_dict(torch.load(path, weights_only=True))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = full.eval()((images.float() / 255 - 0.5) / 0.5)[:, [4, 1]]
        assert torch.allclose(teacher(normalize_uint8(images)), expected, atol=1e-4)
    assert built.head_rows == [4, 1] and built.head_rule == "given" and built.mean == (0.5, 0.5, 0.5)


def test_check_stops_wrong_class_order_with_class_map(fashion_tree, fashion_observer, tmp_path):
    """The trained 10-class Conv3 with two extra head rows in front: a map naming them first passes the
    check; the same map with the extras last (every class off by two rows) is refused."""
    from rded_fast.distill import DistillConfig, distill

    sd = torch.load(fashion_observer, weights_only=True)["model"]
    w, b = sd["classifier.weight"], sd["classifier.bias"]
    sd["classifier.weight"] = torch.cat([torch.zeros(2, w.shape[1]), w])
    sd["classifier.bias"] = torch.cat([torch.full((2,), -100.0), b])
    wide = tmp_path / "conv3_12.pth"
    torch.save({"model": sd}, wide)
    folders = sorted(p.name for p in Path(fashion_tree).iterdir() if p.is_dir())
    base = dict(
        data=str(fashion_tree),
        observer="conv3",
        weights=str(wide),
        ipc=1,
        factor=1,
        mipc=4,
        num_crop=2,
        input_size=32,
        workers=0,
        device="cpu",
        show_progress=False,
    )
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(["extra_a", "extra_b", *folders]) + "\n")
    bad.write_text("\n".join([*folders, "extra_a", "extra_b"]) + "\n")
    result = distill(DistillConfig(out=str(tmp_path / "good"), class_map=str(good), **base))
    assert result.observer_accuracy > 0.5
    manifest = json.loads(result.manifest.read_text())
    assert manifest["observer"]["head_rows"] == {c: i + 2 for i, c in enumerate(folders)}
    with pytest.raises(UserError, match="near chance"):
        distill(DistillConfig(out=str(tmp_path / "bad"), class_map=str(bad), **base))
    missing = tmp_path / "missing.txt"
    missing.write_text("\n".join(folders[1:]) + "\n")
    with pytest.raises(UserError, match=f"does not name the class folder '{folders[0]}'"):
        distill(DistillConfig(out=str(tmp_path / "m"), class_map=str(missing), **base))


@needs_timm
def test_registry_lists_sources_and_families(jpeg_tree, tmp_path, capsys):
    from rded_fast import cli

    families = {(s, f) for s, f, _ in model_families()}
    assert {
        ("conv", "convnet"),
        ("modified", "resnet"),
        ("torchvision", "mobilenetv2"),
        ("timm", "convnext"),
        ("timm", "efficientnet"),
    } <= families
    assert "timm:resnet18" in list_models("timm") and "resnet18" in list_models("torchvision")
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "torchvision  shufflenetv2" in out and "timm         convnext" in out and "MODULE:FACTORY" in out
    assert cli.main(["models", "--source", "timm", "--family", "resnet"]) == 0
    assert "timm:resnet18" in capsys.readouterr().out.split()
    assert (
        cli.main(
            [
                "distill",
                "--data",
                str(jpeg_tree),
                "--out",
                str(tmp_path / "o"),
                "--observer",
                "tests.observer_factories:missing",
                "--input-size",
                "32",
                "--workers",
                "0",
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has no attribute 'missing'" in err and not (tmp_path / "o").exists()


def test_public_api_names():
    import rded_fast
    import rded_fast.distill  # noqa: F401  (the submodule import must not hide the function)
    from rded_fast import DistillConfig, StudentConfig, build as api_build, distill, evaluate, relabel

    assert callable(distill) and rded_fast.distill is distill and api_build is build
    assert DistillConfig.__module__ == "rded_fast.config" and StudentConfig.__module__ == "rded_fast.train.student"
    assert evaluate.__doc__ and relabel.__doc__
    with pytest.raises(AttributeError):
        _ = rded_fast.no_such_name


def test_readme_python_api_example_runs(tmp_path):
    """The README's Python API blocks, run as written but smaller (fewer images and student epochs, for time)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2 and "distill(DistillConfig(" in blocks[0] and "@register(" in blocks[1]
    smaller = {"epochs=30": "epochs=1", "per_class=200": "per_class=60", "per_class=50": "per_class=10", "mipc=100": "mipc=20"}
    for old, new in smaller.items():
        assert old in blocks[0]
        blocks[0] = blocks[0].replace(old, new)
    script = (
        blocks[0]
        + blocks[1]
        + (
            "\nfrom rded_fast import build, list_models\n"
            "assert 'tiny_cnn' in list_models('user') and build('tiny_cnn', 3, None, 32).model[-1].out_features == 3\n"
            "print('README OK')\n"
        )
    )
    r = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "README OK" in r.stdout and "student top-1" in r.stdout
    assert len(list((tmp_path / "distilled").glob("*/*.png"))) == 100


def test_without_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(UserError, match=r"timm:NAME models need timm: pip install 'rded-fast\[timm\]'"):
        build("timm:resnet18", 3)
    assert not list_models("timm") and "resnet18" in list_models()
