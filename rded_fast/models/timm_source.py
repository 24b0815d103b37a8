"""`timm:NAME` models (the optional `rded-fast[timm]` extra): built by `timm.create_model`, never downloading
unless a pretrained tag is asked for by `--weights TAG`.

NAME may carry a pretrained tag (`timm:resnet18.a1_in1k`); the tag chooses timm's `pretrained_cfg`,
whose mean, std and input size become the model's input convention (the scorer normalises with them).
Models with a fixed input size (ViT, Swin, ...) are built for the run's input size when they allow it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn

from rded_fast.errors import UserError
from rded_fast.models.hub import reachable
from rded_fast.models.registry import ModelEntry, register_source

INSTALL = "pip install 'rded-fast[timm]' (or pip install timm)"


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise UserError(f"timm:NAME models need timm: {INSTALL}") from exc
    return timm


def _convention(cfg) -> dict:
    conv = {
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "input_size": int(cfg.input_size[-1]),
        "fixed_input_size": bool(cfg.fixed_input_size),
    }
    if cfg.label_offset:
        conv["label_offset"] = int(cfg.label_offset)
    return conv


def _build(name: str, fixed: bool, native: int, num_classes: int, input_size: int) -> nn.Module:
    timm = _timm()
    if fixed and input_size != native:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=input_size)
        except TypeError:  # fixed-size models without an img_size argument: built at their own size
            pass
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[None]:
    """Hugging Face's hub in offline mode (its local cache only) while its endpoint does not answer one short probe:
    without network, huggingface_hub otherwise retries each file for ~30 s before failing."""
    try:
        from huggingface_hub import constants
    except ImportError:  # timm then reads only its own URLs (torch hub)
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or not reachable(constants.ENDPOINT)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _pretrained(name: str, tag: str) -> tuple[dict, ModelEntry]:
    """timm's pretrained weights `tag` of `name` (downloaded by timm, or read from its cache)."""
    timm = _timm()
    arch = timm.models.get_arch_name(name)
    full = f"{arch}.{tag}"
    entry = resolve(full)
    try:
        with offline_unless_reachable():
            model = timm.create_model(full, pretrained=True)
    except Exception as exc:
        raise UserError(
            f"--weights {tag}: timm could not load the pretrained weights of {full} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); on a machine without network, save them "
            "elsewhere with timm.create_model(..., pretrained=True) and torch.save(model.state_dict(), FILE), "
            "then pass --weights FILE"
        ) from exc
    return {k: v for k, v in model.state_dict().items()}, entry


def resolve(name: str) -> ModelEntry:
    """The entry of `timm:NAME`."""
    timm = _timm()
    arch = timm.models.get_arch_name(name)
    if not timm.is_model(arch):
        raise UserError(
            f"model timm:{name}: timm {timm.__version__} has no model {arch!r}; `rded-fast models --source timm` lists them"
        )
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    except RuntimeError as exc:
        raise UserError(f"model timm:{name}: {exc} Tags: timm.list_pretrained('{arch}*')") from exc
    entrypoint = timm.models.model_entrypoint(arch)
    family = entrypoint.__module__.rsplit(".", 1)[-1]
    convention = _convention(cfg) if cfg is not None else {}
    builder = functools.partial(_build, name, bool(convention.get("fixed_input_size")), convention.get("input_size", 224))
    return ModelEntry(f"timm:{name}", "timm", family, builder, functools.partial(_pretrained, name), convention=convention)


def _list() -> list[ModelEntry] | None:
    try:
        import timm
    except ImportError:
        return None
    return [resolve(name) for name in timm.list_models()]


register_source(
    "timm",
    resolve,
    _list,
    "timm:NAME (e.g. timm:resnet18, timm:convnext_atto.d2_in1k); --weights a file or a timm pretrained tag",
)
