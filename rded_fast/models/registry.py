"""The one model table: every observer/student name maps to a `ModelEntry`, filled by `register`.

Fixed names (ConvNets, the modified ResNets, every torchvision classifier) are registered once at
import; sources with open-ended names (`timm:NAME`, `MODULE:FACTORY`) register a resolver for their
prefix with `register_source`, which makes an entry on demand. `build`, students and `rded-fast
models` all read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from rded_fast.errors import UserError

# (num_classes, input_size) -> a randomly initialised nn.Module with `num_classes` outputs
Builder = Callable[[int, int], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One buildable model: its name as users type it, where it comes from, and how to build it.

        `fetch_weights(tag)` turns a weights name that is not a file (torchvision's IMAGENET1K_V1, timm's
        pretrained tag) into a state dict and the entry those weights belong to; None when the source has
        no named weights. `student_head_1000`: students get a 1000-way head sliced to the classes, as the
        RDED reference builds ResNets (ConvNets are built with exactly `num_classes`). `origin`: facts for
        the manifest (e.g. a factory's file hash). `convention`: the input normalisation (`mean`, `std`, RGB in
    [0, 1]) and size the model's weights expect, when they differ from RDED's ImageNet default or are known.
    """

    name: str
    source: str
    family: str
    builder: Builder
    fetch_weights: Callable[[str], tuple[dict, "ModelEntry"]] | None = None
    student_head_1000: bool = True
    origin: dict = field(default_factory=dict)
    convention: dict = field(default_factory=dict)  # input mean/std/size the weights expect, when known
    input_multiple: int = 1  # the input side must be a multiple of this (ConvNet-D: 2^D, its D poolings)


_MODELS: dict[str, ModelEntry] = {}
# prefix -> (resolver(rest of the name) -> entry, lister() -> entries or None when unavailable, help line)
_SOURCES: dict[str, tuple[Callable[[str], ModelEntry], Callable[[], list[ModelEntry] | None], str]] = {}


def register(
    name: str,
    source: str = "user",
    family: str | None = None,
    student_head_1000: bool = True,
    fetch_weights: Callable[[str], tuple[dict, ModelEntry]] | None = None,
    input_multiple: int = 1,
) -> Callable[[Builder], Builder]:
    """Decorator: add the builder `fn(num_classes, input_size) -> nn.Module` to the table under `name`
    (`family` defaults to `name`); it is then usable as --observer/--student/--teacher NAME."""

    def add(fn: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelEntry(
            name, source, family or name, fn, fetch_weights, student_head_1000, input_multiple=input_multiple
        )
        return fn

    return add


def register_source(
    prefix: str, resolve: Callable[[str], ModelEntry], lister: Callable[[], list[ModelEntry] | None], usage: str
) -> None:
    """Add a source of open-ended names written `PREFIX:REST` (`prefix` "*" = any `MODULE:ATTR`)."""
    _SOURCES[prefix] = (resolve, lister, usage)


def is_factory_name(name: str) -> bool:
    """Whether `name` is read as `MODULE:FACTORY` (not a registered name, nor `PREFIX:REST` of another source)."""
    return name not in _MODELS and ":" in name and name.split(":", 1)[0] not in _SOURCES and "*" in _SOURCES


def get_entry(name: str) -> ModelEntry:
    """The entry for `name`: a registered name, `timm:NAME`, or `MODULE:FACTORY`."""
    if name in _MODELS:
        return _MODELS[name]
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix in _SOURCES:
            return _SOURCES[prefix][0](rest)
        if "*" in _SOURCES:
            return _SOURCES["*"][0](name)
    raise UserError(
        f"model {name}: unknown model; run `rded-fast models` for the list (timm models as timm:NAME, your own as MODULE:FACTORY)"
    )


def list_entries(source: str | None = None) -> list[ModelEntry]:
    """Registered entries, then those of listable sources (timm when installed), optionally of one source."""
    entries = list(_MODELS.values())
    for prefix, (_, lister, _) in _SOURCES.items():
        if source in (None, prefix):
            entries += lister() or []
    return [e for e in entries if source is None or e.source == source]


def source_usages() -> dict[str, str]:
    """prefix -> one line on how to name models of that source."""
    return {prefix: usage for prefix, (_, _, usage) in _SOURCES.items()}


def model_names() -> list[str]:
    """Every fixed registered name (sources with open-ended names are not expanded)."""
    return list(_MODELS)


def list_models(source: str | None = None) -> list[str]:
    """Names users can pass as --observer/--student/--teacher (timm's included when installed)."""
    return [e.name for e in list_entries(source)]


def model_families(source: str | None = None, family: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(source, family, names) per family, sources in registration order, families sorted; optionally filtered."""
    groups: dict[tuple[str, str], list[str]] = {}
    for e in list_entries(source):
        if family is None or e.family == family:
            groups.setdefault((e.source, e.family), []).append(e.name)
    sources = list(dict.fromkeys(s for s, _ in groups))
    return [(s, f, groups[s, f]) for s, f in sorted(groups, key=lambda k: (sources.index(k[0]), k[1]))]
