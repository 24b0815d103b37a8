"""Seeded k-means: split points into k groups that cover them (each point near its group's centre).

k-means++ seeding from a numpy generator, then Lloyd's iterations in float64 until no point changes group. Every
group is kept non-empty (a group left empty takes the point farthest from its own centre among groups of two or
more), so k groups come back whenever there are at least k points. Same points and generator: same groups.
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 30


def _sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances (clipped at 0 against rounding)."""
    d = (x * x).sum(1)[:, None] - 2.0 * (x @ centres.T) + (centres * centres).sum(1)[None, :]
    return np.maximum(d, 0.0)


def seed_centres(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++: the first centre uniformly at random, each next one with probability proportional to the squared
    distance to the nearest centre so far (a uniform pick when every point sits on a centre)."""
    chosen = [int(rng.integers(len(x)))]
    nearest = _sq_dist(x, x[chosen])[:, 0]
    for _ in range(1, k):
        total = nearest.sum()
        p = nearest / total if total > 0 else np.full(len(x), 1.0 / len(x))
        chosen.append(int(rng.choice(len(x), p=p)))
        nearest = np.minimum(nearest, _sq_dist(x, x[chosen[-1:]])[:, 0])
    return x[chosen].copy()


def _fill_empty(assign: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Give each empty group the point farthest from its centre that is in a group of two or more."""
    for g in np.flatnonzero(np.bincount(assign, minlength=k) == 0):
        sizes = np.bincount(assign, minlength=k)
        own = dist[np.arange(len(assign)), assign]
        own[sizes[assign] < 2] = -1.0
        assign[int(np.argmax(own))] = g
    return assign


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, max_iterations: int = MAX_ITERATIONS) -> np.ndarray:
    """Group the rows of `x` [n, d] (n >= k >= 1) into k non-empty groups; returns each row's group [n] int64."""
    x = np.asarray(x, dtype=np.float64)
    if not 1 <= k <= len(x):
        raise ValueError(f"kmeans: k={k} groups need 1..{len(x)} points")
    centres = seed_centres(x, k, rng)
    assign = np.full(len(x), -1, dtype=np.int64)
    for _ in range(max_iterations):
        dist = _sq_dist(x, centres)
        new = _fill_empty(np.argmin(dist, axis=1), dist, k)
        if np.array_equal(new, assign):
            break
        assign = new
        members = np.zeros((len(x), k))
        members[np.arange(len(x)), assign] = 1.0
        centres = (members.T @ x) / members.sum(0)[:, None]
    return assign
