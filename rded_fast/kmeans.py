"""Seeded k-means on a similarity matrix: split points into k groups that cover them (each point near its
group's centre).

The points are given by their inner products S = X X^T (cosine similarities for L2-normalised features), so the
work per iteration is O(n^2 k) whatever the features' width, and S can be computed where the features are (the
scoring device). Squared distances follow from S alone: |x_i - x_j|^2 = S_ii + S_jj - 2 S_ij, and to the mean of
a group C: S_ii - 2 mean_{j in C} S_ij + mean_{j,l in C} S_jl. k-means++ seeding from a numpy generator, then
Lloyd's iterations in float64 until no point changes group. Every group is kept non-empty (a group left empty
takes the point farthest from its own centre among groups of two or more), so k groups come back whenever there
are at least k points. Same matrix and generator: same groups.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_ITERATIONS = 30


def seed_centres(sim: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k-means++: the first centre uniformly at random, each next one with probability proportional to the squared
    distance to the nearest centre so far (a uniform pick when every point sits on a centre). Returns point indices."""
    diag = np.diag(sim)
    chosen = [int(rng.integers(len(sim)))]
    nearest = np.maximum(diag + diag[chosen[0]] - 2 * sim[:, chosen[0]], 0.0)
    for _ in range(1, k):
        total = nearest.sum()
        p = nearest / total if total > 0 else np.full(len(sim), 1.0 / len(sim))
        chosen.append(int(rng.choice(len(sim), p=p)))
        nearest = np.minimum(nearest, np.maximum(diag + diag[chosen[-1]] - 2 * sim[:, chosen[-1]], 0.0))
    return chosen


def _fill_empty(assign: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """Give each empty group the point farthest from its centre that is in a group of two or more."""
    for g in np.flatnonzero(np.bincount(assign, minlength=k) == 0):
        sizes = np.bincount(assign, minlength=k)
        own = dist[np.arange(len(assign)), assign]
        own[sizes[assign] < 2] = -1.0
        assign[int(np.argmax(own))] = g
    return assign


def _to_means(sim: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """[n, k] squared distances from each point to the mean of each group of `assign` (every group non-empty).
    One [n, n] x [n, k] product gives each point's mean similarity to every group (O(n^2 k) multiply-adds), where
    summing by group in numpy (a reordered copy of S, then reduceat) cost more time per iteration. torch computes
    it, on the threads that score: numpy's BLAS starts threads of its own that keep spinning after each product and
    slowed the next scoring pass (both timed: benchmarks/README.md, "Timings the code quotes")."""
    n = len(sim)
    counts = np.bincount(assign, minlength=k).astype(np.float64)
    member = np.zeros((n, k))
    member[np.arange(n), assign] = 1.0 / counts[assign]
    to_mean = (torch.from_numpy(sim) @ torch.from_numpy(member)).numpy()  # [n, k]: mean of S_ij over j in each group
    within = np.bincount(assign, weights=to_mean[np.arange(n), assign], minlength=k) / counts
    return np.maximum(np.diag(sim)[:, None] - 2 * to_mean + within[None, :], 0.0)


def kmeans(sim: np.ndarray, k: int, rng: np.random.Generator, max_iterations: int = MAX_ITERATIONS) -> np.ndarray:
    """Group n points given by their similarity matrix `sim` [n, n] (n >= k >= 1) into k non-empty groups;
    returns each point's group [n] int64."""
    sim = np.require(sim, np.float64, ["C", "W"])  # writable and contiguous: torch shares it without a copy
    if not 1 <= k <= len(sim):
        raise ValueError(f"kmeans: k={k} groups need 1..{len(sim)} points")
    centres = seed_centres(sim, k, rng)
    diag = np.diag(sim)
    dist = np.maximum(diag[:, None] + diag[centres][None, :] - 2 * sim[:, centres], 0.0)
    assign = _fill_empty(np.argmin(dist, axis=1), dist, k)
    for _ in range(max_iterations):
        dist = _to_means(sim, assign, k)
        new = _fill_empty(np.argmin(dist, axis=1), dist, k)
        if np.array_equal(new, assign):
            break
        assign = new
    return assign
