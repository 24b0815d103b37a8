"""Select: best crop per source image, then the best n = ipc * factor^2 images per class (RDED.md 1.6).

A source image gives at most one patch. Only when a class has fewer usable images than n are the
remaining ranks filled with the next-best crops of images already used (the reference would crash);
`fallback` counts those ranks. A class with fewer usable crops than n gets no selection: the selectors
return the reason (a string) instead, and the run skips that class and records why.
"""

from __future__ import annotations

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
    row's scores; `rded_fast.kmeans.cosine_similarity`). Cells are in score order, best first. With at most n
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
