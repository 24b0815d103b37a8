"""Select: which crops of a class become its n = ipc * factor^2 cells; the table of selection rules (`SELECTORS`).

RDED's rule (`select_class`, RDED.md 1.6): best crop per source image, then the best n images. A source image gives
at most one patch. Only when a class has fewer usable images than n are the
remaining ranks filled with the next-best crops of images already used (the reference would crash);
`fallback` counts those ranks. A class with fewer usable crops than n gets no selection: the selectors
return the reason (a string) instead, and the run skips that class and records why.

Every rule is a `Selector` in `SELECTORS`: its name (`--select`), what it needs from the run (the observer's scores,
its features, whole images instead of crops) and one function `ClassInputs -> ClassSelection | str`. distill, its
checks and the command line read the table, so a new rule is one entry here (and its function).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from rded_fast.kmeans import kmeans
from rded_fast.plan import class_generator


@dataclass(frozen=True)
class ClassSelection:
    """The n selected cells of one class in rank order (best first): rows, crop indices, scores.

    `rows` are whatever row numbers the caller ranked (`distill` passes class-local rows: positions within
    the class's contiguous block of the plan)."""

    label: int
    rows: np.ndarray  # [n] int64 rows as given to the selector (class-local in distill)
    crops: np.ndarray  # [n] int64 crop index within the row
    scores: np.ndarray  # [n] float32 cross-entropy (nan for random selection)
    fallback: int = 0
    groups: np.ndarray | None = None  # [n] int64 group of each cell (covering selection only)
    group_sizes: np.ndarray | None = None  # [n] int64 candidates in that group


@dataclass(frozen=True)
class ClassInputs:
    """What a selection rule is given for one class: its m planned images (class-local rows) and, for the rules that
    need them, the observer's scores and the similarity of the rows' features."""

    label: int
    name: str
    ok: np.ndarray  # [m] bool: the row's image was decoded
    num_crop: int  # K crops per row
    n: int  # cells wanted (ipc * factor^2)
    seed: int
    scores: np.ndarray | None = None  # [m, K] float, inf where the row is unusable (rules with `scores`)
    similarity: np.ndarray | None = None  # [m, m] cosine similarity of each row's best crop's features (`features`)
    fix: str = ""  # how to get more usable crops, named in the reason a class gets no selection


MORE_CROPS = "lower --ipc or --factor, or raise --num-crop"  # the fix when a class has too few usable crops


def select_class(
    scores: np.ndarray, rows: np.ndarray, label: int, n: int, class_name: str = "", fix: str = MORE_CROPS
) -> ClassSelection | str:
    """Rank one class's crops. `scores` [m, K] float (inf = image not decodable), `rows` [m] the row number of
    each score row. Returns the selection, or why there is none (fewer than n usable crops) and `fix`."""
    scores = np.asarray(scores, dtype=np.float64)
    best_crop = np.argmin(scores, axis=1)
    best = scores[np.arange(len(scores)), best_crop]
    usable = np.isfinite(best)
    order = np.argsort(best, kind="stable")[: min(n, int(usable.sum()))]
    sel_idx, sel_crop = list(order), list(best_crop[order])
    fallback = 0
    if len(sel_idx) < n:
        rest = scores.copy()
        rest[np.arange(len(scores)), best_crop] = np.inf
        flat = np.argsort(rest, axis=None, kind="stable")
        flat = flat[np.isfinite(rest.reshape(-1)[flat])][: n - len(sel_idx)]
        fallback = len(flat)
        sel_idx += list(flat // scores.shape[1])
        sel_crop += list(flat % scores.shape[1])
    if len(sel_idx) < n:
        return f"class {class_name or label} has only {len(sel_idx)} usable crops but needs {n} (ipc * factor^2); {fix}"
    sel_idx = np.asarray(sel_idx, dtype=np.int64)
    sel_crop = np.asarray(sel_crop, dtype=np.int64)
    return ClassSelection(label, rows[sel_idx], sel_crop, scores[sel_idx, sel_crop].astype(np.float32), fallback)


def select_random(ok: np.ndarray, label: int, num_crop: int, n: int, seed: int, class_name: str = "") -> ClassSelection | str:
    """The random baseline for one class: a seeded random order of its decodable images (class-local rows)
    and a random crop of each. Same shapes and stitching as RDED's selection, so the only difference is
    the observer's ranking. Returns the selection, or why there is none (fewer than n usable images)."""
    rng = class_generator(seed, label, purpose=2)
    rows = np.flatnonzero(ok)
    if len(rows) < n:
        return f"class {class_name or label} has only {len(rows)} usable images but needs {n} (ipc * factor^2)"
    chosen = rows[rng.permutation(len(rows))[:n]]
    crops = rng.integers(0, num_crop, size=n)
    return ClassSelection(int(label), chosen, crops, np.full(n, np.nan, np.float32))


def select_covering(
    scores: np.ndarray,
    similarity: np.ndarray,
    rows: np.ndarray,
    label: int,
    n: int,
    seed: int,
    class_name: str = "",
    fix: str = MORE_CROPS,
) -> ClassSelection | str:
    """RDED's realism score, spread over the class: each usable image is a candidate with its best crop (RDED's
    first step), the candidates are split into n groups by seeded k-means on their observer features, and each
    group gives its best-scored candidate. So the n cells are the most realistic crops of n different regions of
    the class instead of the n most realistic overall (which the selection diagnostic found to be near-duplicate
    prototypes). `similarity` [m, m]: the cosine similarity of the rows' best crops' features (argmin of each
    row's scores; distill computes it on the scoring device). Cells are in score order, best first. With at most n
    usable images there is nothing to choose and the result is RDED's (`select_class`), each cell its own group."""
    scores = np.asarray(scores, dtype=np.float64)
    best_crop = np.argmin(scores, axis=1)
    best = scores[np.arange(len(scores)), best_crop]
    usable = np.flatnonzero(np.isfinite(best))
    if len(usable) <= n:
        sel = select_class(scores, rows, label, n, class_name, fix)
        return sel if isinstance(sel, str) else replace(sel, groups=np.arange(n), group_sizes=np.ones(n, np.int64))
    sim = np.asarray(similarity, dtype=np.float64)
    if len(usable) < len(sim):
        sim = sim[np.ix_(usable, usable)]
    groups = kmeans(sim, n, class_generator(seed, label, purpose=3))
    by_score = np.argsort(best[usable], kind="stable")  # candidates, best first
    first = np.unique(groups[by_score], return_index=True)[1]  # each group's best candidate, in by_score positions
    picked = by_score[np.sort(first)]  # one per group, best first
    chosen = usable[picked]
    return ClassSelection(
        label,
        rows[chosen],
        best_crop[chosen].astype(np.int64),
        best[chosen].astype(np.float32),
        groups=groups[picked],
        group_sizes=np.bincount(groups, minlength=n)[groups[picked]],
    )


@dataclass(frozen=True)
class Selector:
    """One `--select` rule: `scores`: the observer scores the crops (and the observer check runs); `features`: the
    scorer also gives each crop's features (the observer split at its head); `whole_images`: one whole image (its
    centred square) per output image at the input size, instead of cells of crops; `select`: the rule itself."""

    name: str
    select: Callable[[ClassInputs], ClassSelection | str]
    scores: bool = False
    features: bool = False
    whole_images: bool = False


def _rded(c: ClassInputs) -> ClassSelection | str:
    return select_class(c.scores, np.arange(len(c.scores)), c.label, c.n, c.name, c.fix)


def _cover(c: ClassInputs) -> ClassSelection | str:
    return select_covering(c.scores, c.similarity, np.arange(len(c.scores)), c.label, c.n, c.seed, c.name, c.fix)


def _random(c: ClassInputs) -> ClassSelection | str:
    return select_random(c.ok, c.label, c.num_crop, c.n, c.seed, c.name)


SELECTORS = {
    s.name: s
    for s in (
        Selector("rded", _rded, scores=True),
        Selector("rded-cover", _cover, scores=True, features=True),
        Selector("random-crops", _random),
        Selector("random-images", _random, whole_images=True),
    )
}  # what each rule does, for users: the --select help (cli.py) and docs/GUIDE.md
ALIASES = {"random": "random-crops"}  # other spellings `--select` accepts
SELECTIONS = (*SELECTORS, *ALIASES)  # every `--select` value


def selector(name: str) -> Selector:
    """The rule `--select name` names (an alias resolved); a KeyError for an unknown name (validate refuses it first)."""
    return SELECTORS[ALIASES.get(name, name)]
