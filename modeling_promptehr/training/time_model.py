"""Fit the :class:`~promptehr_hf.modeling_promptehr.generation.times.VisitTimeModel` on a training
cohort that carries times (``stay_days``, ``gap_days``, ``hospital_death``, ``death_days``).

Each head is scikit-learn's multinomial ``LogisticRegression`` (L2, lbfgs) on the sparse features
of :class:`~promptehr_hf.modeling_promptehr.generation.times.VisitFeatures`; the weights are
copied into the time model, which generation applies with numpy alone. Bins are quantiles of the
training values; the outer edges are the 0.5% and 99.5% quantiles (values beyond them fall in the
outer bins), so no single patient's extreme stay or gap is written into the checkpoint. Inside
each bin the model keeps :data:`WITHIN_BIN_LEVELS` + 1 quantiles of the training values that fell
there (outer values clipped to the outer edges; the first and last quantile are the bin's edges),
which generation interpolates; a bin with fewer than :data:`MIN_WITHIN_BIN_VALUES` values keeps the
uniform draw (on the log1p scale for gaps and days to death). Above the upper outer edge the model
keeps two aggregates, the share of the last bin's values beyond it and their mean excess, drawn as
an exponential tail; with fewer than :data:`MIN_WITHIN_BIN_VALUES` values beyond it, none (the
values stay clipped). Without the tail, the clipped 0.5% of stays alone put the synthetic stays
0.13 days (Wasserstein) from the training ones on the simulated cohort.

:func:`calibrate_time_model` then shifts each head's intercepts so that its expected class shares
over the trained generator's own patients are the training shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression

from ..generation.times import HEADS, INDEX_BUCKETS, LOG_HEADS, BinaryRows, VisitFeatures, VisitTimeModel, has_times

DEFAULT_BINS = {"stay": 16, "gap": 16, "after": 12}
OUTER_QUANTILE = 0.005
ABSENT_CLASS_BIAS = -30.0  # a bin no training row fell into is never drawn
DEFAULT_C = 1.0
WITHIN_BIN_LEVELS = 16  # K: a bin's values as K + 1 quantiles, drawn piecewise linearly between them
# Fewer values in a bin make quantiles that are single patients' values, no better than uniform.
MIN_WITHIN_BIN_VALUES = 4 * WITHIN_BIN_LEVELS


# Calibration: the fixed-point iteration on the heads' shifts stops when every class's expected
# share is within this log-ratio of its training share, or after CALIBRATION_ITERATIONS rounds.
CALIBRATION_TOLERANCE = 1e-6
CALIBRATION_ITERATIONS = 500


def quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Distinct quantile edges of ``values`` (at most ``n_bins`` bins), outer edges at the 0.5% and
    99.5% quantiles."""
    qs = np.quantile(values, np.linspace(OUTER_QUANTILE, 1 - OUTER_QUANTILE, n_bins + 1))
    edges = np.unique(qs)
    return edges if len(edges) >= 2 else np.array([edges[0], edges[0] + 1.0])


def bin_of(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each value (outer values in the outer bins)."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def within_bin_quantiles(values: np.ndarray, edges: np.ndarray, levels: int = WITHIN_BIN_LEVELS,
                          log: bool = False) -> np.ndarray:
    """[bins, ``levels`` + 1] quantiles (at 0, 1/levels, ..., 1) of the ``values`` in each bin of
    ``edges``, values beyond the outer edges clipped to them; the first and last column are the
    bin's edges. A bin with fewer than :data:`MIN_WITHIN_BIN_VALUES` values gets evenly spaced
    points (in log1p space if ``log``), which the sampler's interpolation turns into the uniform
    draw inside the bin."""
    clipped = np.clip(values, edges[0], edges[-1])
    bins = bin_of(clipped, edges)
    lo, hi = edges[:-1], edges[1:]
    if log:
        table = np.expm1(np.linspace(np.log1p(lo), np.log1p(hi), levels + 1, axis=1))
    else:
        table = np.linspace(lo, hi, levels + 1, axis=1)
    for b in np.flatnonzero(np.bincount(bins, minlength=len(lo)) >= MIN_WITHIN_BIN_VALUES):
        table[b] = np.quantile(clipped[bins == b], np.linspace(0.0, 1.0, levels + 1))
    table[:, 0], table[:, -1] = lo, hi
    return table


def upper_tail(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``[share, mean]``: the share of the last bin's values above the outer edge and their mean
    excess over it; ``[0, 0]`` when fewer than :data:`MIN_WITHIN_BIN_VALUES` values lie beyond it
    (a tail of a few values would be single patients' values)."""
    above = values > edges[-1]
    if above.sum() < MIN_WITHIN_BIN_VALUES:
        return np.zeros(2)
    in_last = bin_of(values, edges) == len(edges) - 2
    return np.array([above.sum() / in_last.sum(), float((values[above] - edges[-1]).mean())])


def _csr(rows: BinaryRows) -> sp.csr_matrix:
    data = np.ones(len(rows.indices), dtype=np.float64)
    return sp.csr_matrix((data, rows.indices, rows.indptr), shape=(len(rows), rows.width))


def _fit_head(X: BinaryRows, y: np.ndarray, n_classes: int, C: float, seed: int,
              binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(weight [K, F], bias [K]) of a multinomial logistic regression over ``n_classes`` classes,
    or, ``binary``, of a logistic one (K = 1: the logit of class 1). A class absent from ``y``
    gets zero weight and a bias that never draws it; a head whose rows all share one class
    predicts it."""
    present = np.unique(y)
    width = X.width
    if len(present) == 1:
        if binary:
            return np.zeros((1, width), np.float32), np.array([30.0 if present[0] == 1 else -30.0], np.float32)
        bias = np.full(n_classes, ABSENT_CLASS_BIAS, np.float32)
        bias[present[0]] = 0.0
        return np.zeros((n_classes, width), np.float32), bias
    clf = LogisticRegression(C=C, max_iter=300, random_state=seed)
    clf.fit(_csr(X), y)
    if binary:
        return clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)
    weight = np.zeros((n_classes, width), np.float32)
    bias = np.full(n_classes, ABSENT_CLASS_BIAS, np.float32)
    if len(clf.classes_) == 2:  # sklearn fits two present classes as one logit
        weight[clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
        bias[clf.classes_[0]] = 0.0
    else:
        weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
    return weight, bias


def fit_time_model(patients: Sequence[dict], category_of: Callable[[str], str], *,
                   bins: dict[str, int] | None = None, C: float = DEFAULT_C, seed: int = 0) -> VisitTimeModel:
    """Fit the four heads on ``patients`` (every one with times; see ``generation.times.has_times``).

    Args:
        patients: [n] patient dicts with ``age``, ``sex``, ``visits`` and the four time fields.
        category_of: code -> category (the tokenizer's ``category_of``); the heads' columns are
            the categories seen here.
        bins: bins per head (``stay``, ``gap``, ``after``); default :data:`DEFAULT_BINS`.
        C: inverse L2 strength of every head.
    Raises:
        ValueError: a patient without times, or no patient.
    """
    patients = list(patients)
    if not has_times(patients):
        raise ValueError("fit_time_model needs patients with stay_days and gap_days (a cohort read with its times)")
    bins = {**DEFAULT_BINS, **(bins or {})}
    visits = [v for p in patients for v in p["visits"]]
    categories = sorted({category_of(code) for v in visits for code in v})
    feats = VisitFeatures(categories, category_of)
    n_visits = np.array([len(p["visits"]) for p in patients], dtype=np.int64)
    ages = np.array([float(p["age"]) for p in patients])
    sexes = [p["sex"] for p in patients]
    owner = np.repeat(np.arange(len(patients)), n_visits)
    start = np.r_[0, np.cumsum(n_visits)[:-1]]
    index = np.arange(len(owner)) - start[owner]
    v_sexes = [sexes[i] for i in owner]
    stays = np.array([s for p in patients for s in p["stay_days"]], dtype=np.float64)
    gaps = np.array([g for p in patients for g in p["gap_days"]], dtype=np.float64)
    if len(stays) != len(owner) or len(gaps) != len(owner):
        raise ValueError("fit_time_model: stay_days and gap_days must hold one value per visit")
    died = np.array([bool(p.get("hospital_death")) for p in patients])
    after = np.array([np.nan if p.get("death_days") is None else float(p["death_days"]) for p in patients])
    V = feats.visits(visits)

    edges, weights, biases = {}, {}, {}
    edges["stay"] = quantile_edges(stays, bins["stay"])
    X = feats.rows([V], ages[owner], v_sexes, index)
    weights["stay"], biases["stay"] = _fit_head(X, bin_of(stays, edges["stay"]), len(edges["stay"]) - 1, C, seed)

    later = np.flatnonzero(index > 0)
    if len(later):
        edges["gap"] = quantile_edges(gaps[later], bins["gap"])
        X = feats.rows([V.take(later - 1), V.take(later)], ages[owner[later]], [v_sexes[i] for i in later],
                       index[later])
        weights["gap"], biases["gap"] = _fit_head(X, bin_of(gaps[later], edges["gap"]), len(edges["gap"]) - 1,
                                                  C, seed)
    else:  # no readmission in the cohort: a head the sampler never calls
        edges["gap"] = np.array([0.0, 1.0])
        width = 2 * len(categories) + feats.n_bands + 1 + INDEX_BUCKETS
        weights["gap"], biases["gap"] = np.zeros((1, width), np.float32), np.zeros(1, np.float32)

    last = start + n_visits - 1
    X_last = feats.rows([V.take(last)], ages, sexes, n_visits - 1)
    weights["death"], biases["death"] = _fit_head(X_last, died.astype(np.int64), 2, C, seed, binary=True)

    alive = ~died
    known = alive & ~np.isnan(after)
    edges["after"] = quantile_edges(after[known], bins["after"]) if known.any() else np.array([0.0, 1.0])
    none = len(edges["after"]) - 1
    y = np.full(len(patients), none, dtype=np.int64)
    y[known] = bin_of(after[known], edges["after"])
    rows = np.flatnonzero(alive)
    weights["after"], biases["after"] = _fit_head(X_last.take(rows), y[rows], none + 1, C, seed)
    quantiles = {"stay": within_bin_quantiles(stays, edges["stay"])}
    tails = {"stay": upper_tail(stays, edges["stay"])}
    if len(later):
        quantiles["gap"] = within_bin_quantiles(gaps[later], edges["gap"], log="gap" in LOG_HEADS)
        tails["gap"] = upper_tail(gaps[later], edges["gap"])
    if known.any():
        quantiles["after"] = within_bin_quantiles(after[known], edges["after"], log="after" in LOG_HEADS)
        tails["after"] = upper_tail(after[known], edges["after"])
    return VisitTimeModel(categories, {h: weights[h] for h in HEADS}, {h: biases[h] for h in HEADS}, edges,
                          quantiles, tails=tails)


def class_shares(patients: Sequence[dict], time_model: VisitTimeModel) -> dict[str, np.ndarray]:
    """Each head's class shares in ``patients`` (with times), in the model's bins: ``stay`` over all
    visits, ``gap`` over the visits after a first, ``death`` ([alive, died]) over patients,
    ``after`` (the bins, then no known death) over the patients who left hospital alive."""
    stays = np.array([s for p in patients for s in p["stay_days"]], dtype=np.float64)
    gaps = np.array([g for p in patients for g in p["gap_days"][1:]], dtype=np.float64)
    died = np.array([bool(p.get("hospital_death")) for p in patients])
    after = np.array([np.nan if p.get("death_days") is None else float(p["death_days"])
                      for p, d in zip(patients, died) if not d])
    none = len(time_model.edges["after"]) - 1
    after_class = np.full(len(after), none)
    known = ~np.isnan(after)
    after_class[known] = bin_of(after[known], time_model.edges["after"])

    def shares(labels: np.ndarray, k: int) -> np.ndarray:
        return np.bincount(labels, minlength=k) / max(len(labels), 1)

    return {"stay": shares(bin_of(stays, time_model.edges["stay"]), len(time_model.edges["stay"]) - 1),
            "gap": shares(bin_of(gaps, time_model.edges["gap"]), len(time_model.edges["gap"]) - 1),
            "death": shares(died.astype(np.int64), 2), "after": shares(after_class, none + 1)}


def _fit_shift(probs_of: Callable[[np.ndarray], np.ndarray], target: np.ndarray, weights: np.ndarray | None,
               k: int) -> np.ndarray:
    """[k] logit shifts that make the (weighted) mean of ``probs_of(shift)`` equal ``target``: the
    fixed point of shift += log(target / mean); a class with no training share keeps no shift."""
    shift = np.zeros(k)
    held = target > 0
    for _ in range(CALIBRATION_ITERATIONS):
        mean = np.average(probs_of(shift), axis=0, weights=weights)
        step = np.zeros(k)
        step[held] = np.log(target[held]) - np.log(np.maximum(mean[held], 1e-300))
        shift += step - step[held].mean()  # softmax is blind to a common shift: keep them centred
        if np.abs(step[held] - step[held].mean()).max() < CALIBRATION_TOLERANCE:
            break
    return shift


def calibrate_time_model(time_model: VisitTimeModel, train_patients: Sequence[dict], generated: Sequence[dict],
                         category_of: Callable[[str], str]) -> VisitTimeModel:
    """The time model with each head's ``shift`` fitted so that, over the ``generated`` patients'
    codes (the trained generator's own, drawn without times), the head's expected class shares are
    the training patients' (stays over visits, gaps over readmissions, in-hospital death over
    patients, days to a later death over the patients predicted to leave alive).

    The heads were fitted on the training codes, where their expected shares are the training
    shares; a generator whose visits are slightly off (a category a little rarer than real) moves
    every rate the heads draw. The weights, and with them every dependence on the codes, are kept:
    only the intercepts move, by the same amount for every patient.
    """
    if not generated:
        raise ValueError("calibrate_time_model needs generated patients")
    target = class_shares(train_patients, time_model)
    rows = time_model.head_rows(generated, category_of)
    shifts = {}
    alive = None
    for head in HEADS:  # death before after: the after head's patients are weighted by P(alive)
        if rows[head] is None or not target[head].any():
            continue
        logits = np.log(np.maximum(time_model.probs(head, rows[head], calibrated=False), 1e-300))
        shift = _fit_shift(lambda d, z=logits: _softmax(z + d), target[head], alive if head == "after" else None,
                           logits.shape[1])
        if head == "death":  # the binary head's one logit moves by the pair's difference
            alive = _softmax(logits + shift)[:, 0]
            shift = np.array([shift[1] - shift[0]])
        shifts[head] = shift.astype(np.float32)
    return VisitTimeModel(time_model.categories, time_model.weights, time_model.biases, time_model.edges,
                          time_model.quantiles, shifts, time_model.tails)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
