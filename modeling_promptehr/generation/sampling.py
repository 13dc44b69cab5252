"""Stratified draws for a generated cohort: each patient's draw keeps its own distribution, and the
cohort's totals sit near their expectation instead of wandering by the sampling noise of
independent draws.

- :func:`stratified_uniform`: one uniform in each of ``n`` equal strata of [0, 1), in random order.
- :func:`stratified_choice`: ``n`` draws from one discrete distribution through those uniforms: a
  value of probability ``p`` is drawn ``n p`` times, give or take two.
- :func:`stratified_within`: those uniforms inside each group of rows (values drawn inside bins).
- :func:`systematic_classes`: one class per row of a probability matrix whose rows differ: class
  by class, systematic sampling along the rows in random order, so each row gets class ``k`` with
  exactly its probability and each class's total is within one of its expectation given the rows
  still open.

Shipped with the checkpoint in ``custom_generate/``: imports only numpy.
"""

from __future__ import annotations

import numpy as np


def stratified_uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] uniforms, one in each stratum [j / n, (j + 1) / n), in random order: each is U(0, 1)
    on its own (its stratum is a uniform pick), together they leave no stratum empty."""
    return (rng.permutation(n) + rng.random(n)) / max(n, 1)


def stratified_choice(values: np.ndarray, probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n] draws of ``values`` with probabilities ``probs`` (inverse CDF of :func:`stratified_uniform`):
    each draw has the distribution ``probs``; a value of probability ``p`` is drawn ``n p`` times,
    give or take two (the strata its interval cuts at either end)."""
    cum = np.cumsum(np.asarray(probs, dtype=np.float64))
    pick = np.searchsorted(cum, stratified_uniform(rng, n) * cum[-1], side="right")
    return np.asarray(values)[np.minimum(pick, len(cum) - 1)]


def systematic_classes(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class per row of ``probs`` ([n, K], rows summing to 1) -> [n] int.

    Class ``k`` is decided for the rows not yet given a class, in one random order of the rows: row
    ``i`` takes it with ``q_i = p_ik / (1 - p_i0 - ... - p_i,k-1)``, by systematic sampling (the
    row owns the interval of length ``q_i`` after the rows before it; it is taken when one of the
    points ``U, U + 1, U + 2, ...`` falls in it, ``U ~ U(0, 1)`` once per class). A row is taken
    with probability ``q_i`` exactly, so it ends in class ``k`` with probability ``p_ik``, and the
    rows taken number ``sum(q)`` rounded up or down. The last class takes the rows left."""
    probs = np.asarray(probs, dtype=np.float64)
    n, k_classes = probs.shape
    out = np.full(n, k_classes - 1, dtype=np.int64)
    rows = rng.permutation(n)
    rest = probs.sum(axis=1)
    for k in range(k_classes - 1):
        if not len(rows):
            break
        p = probs[rows, k]
        q = np.clip(np.divide(p, rest[rows], out=np.zeros_like(p), where=rest[rows] > 0), 0.0, 1.0)
        end = np.cumsum(q) - rng.random()
        taken = np.floor(end) > np.floor(end - q)
        out[rows[taken]] = k
        rest[rows] -= p
        rows = rows[~taken]
    return out


def stratified_within(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n] uniforms stratified inside each group of ``groups`` ([n] int): the rows of a group get
    :func:`stratified_uniform` of the group's size."""
    groups = np.asarray(groups, dtype=np.int64)
    n = len(groups)
    order = np.lexsort((rng.random(n), groups))  # each group's rows, in random order
    sorted_groups = groups[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    size = np.diff(np.r_[first, n])
    rank = np.arange(n) - np.repeat(first, size)
    u = np.empty(n)
    u[order] = (rank + rng.random(n)) / np.repeat(size, size)
    return u


__all__ = ["stratified_choice", "stratified_uniform", "stratified_within", "systematic_classes"]
