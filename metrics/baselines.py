"""The independent-marginal baseline: the reference a generator must beat on structure.

``IndependentMarginalSampler.fit(train).sample(n, seed)`` draws patients whose every part is
drawn independently from the training marginals:

- (age, sex): jointly, copied from a training patient drawn uniformly;
- number of visits: from the training visits-per-patient distribution;
- size of each visit: from the training distribution of distinct codes per visit (capped at the
  number of distinct training codes);
- codes of a visit: drawn without replacement, each draw proportional to the code's training
  visit occurrences among the codes not yet in the visit (draws with replacement, repeats
  discarded: the same law). No duplicates inside a visit.

When the training cohort has times (``time_outcome.has_times``), each patient also gets them,
independently of its codes, visits and demographics (the independent baseline of the time and
outcome metrics):

- ``stay_days``: each visit's stay drawn from the training stays (finite values, all visits);
- ``gap_days``: 0.0 for the first visit, each later visit's gap drawn from the training gaps of
  visits after the first (finite values; 0.0 when there is none);
- (``hospital_death``, ``death_days``): jointly, copied from a training patient with a visit
  drawn uniformly (``hospital_death`` is False for a drawn patient with no visit).

Without times the patients and their draws are exactly those of a sampler without them (the
time draws come after the diagnoses and demographics).

When the training cohort carries procedures and/or medications (``coherence.modality_visits``),
each patient gets them too, each modality drawn on its own like the diagnoses, independently of
them and of each other: per visit a size from the training distribution of distinct codes of
that modality per visit (0 included: visits without procedures), then codes without
replacement in proportion to their training visit occurrences (codes normalised as the metrics
read them, ``coherence.modality``). So the baseline's within-modality marginals are right and its
cross-modality pairs (diagnosis x procedure, diagnosis x medication) are independent: their
pair R² is the independent reference. These draws come after all others, in the order of
``schema.MODALITY_FIELDS``, so a cohort without them is sampled exactly as before.

It matches code frequencies by construction but has no co-occurrence structure (and ignores
the CMS age/sex edits), so a useful model must beat it clearly on the pair metrics; its
outcomes are tied to no diagnosis, so its mortality-by-category R² is about 0 or below.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM
from promptehr_hf.datasets_scripts.schema import MODALITY_FIELDS
from promptehr_hf.metrics.coherence import modality, modality_matrices, modality_visits
from promptehr_hf.metrics.time_outcome import Times, has_times


class IndependentMarginalSampler:
    """Fitted marginals: ``codes`` [K] with ``code_cdf`` [K], visit sizes, visits per patient,
    (age, sex) pairs; with times, ``stays``, ``gaps`` (of later visits) and the per-patient
    ``hospital_death`` [m] and ``death_days`` [m] (NaN: None) pairs (``stays`` None: no times);
    ``modalities``: ``{field: (codes, code_cdf, visit_sizes)}`` for each of procedures and
    medications the training cohort carries (``modalities`` given as ``{field: (codes,
    code_counts, visit_sizes)}``)."""

    def __init__(self, codes, code_counts, visit_sizes, visits_per_patient, ages, sexes, *, stays=None,
                 gaps=None, hospital_death=None, death_days=None, modalities=None):
        self.codes, self.code_cdf, self.visit_sizes = _marginals(codes, code_counts, visit_sizes)
        self.modalities = {name: _marginals(*fitted) for name, fitted in (modalities or {}).items()}
        self.visits_per_patient = np.asarray(visits_per_patient, dtype=np.int64)
        self.ages = np.asarray(ages, dtype=np.float64)
        self.sexes = np.asarray(sexes, dtype=object)
        self.stays = None if stays is None else np.asarray(stays, dtype=np.float64)
        self.gaps = np.asarray([] if gaps is None else gaps, dtype=np.float64)
        self.hospital_death = np.asarray([False] if hospital_death is None else hospital_death, dtype=bool)
        self.death_days = np.asarray([np.nan] if death_days is None else death_days, dtype=np.float64)

    @classmethod
    def fit(cls, train: Any, code_system: str = DEFAULT_CODE_SYSTEM) -> "IndependentMarginalSampler":
        """Marginals of a training cohort (patient dicts, a ``datasets.Dataset`` or columns), its
        codes normalised in ``code_system``; also those of its procedures and medications when it
        carries them (``coherence.modality_visits``)."""
        visits = inc.cohort_visits(train, code_system=code_system)
        X, vocab = inc.visit_matrix(visits)
        if X.nnz == 0:
            raise ValueError("IndependentMarginalSampler.fit: the training cohort has no codes")
        keep = np.flatnonzero(np.asarray(X.sum(axis=0)).ravel())
        times = {}
        if has_times(train):
            t = Times(train)
            if t.stays().size:
                with_visit = t.n_visits > 0
                times = {"stays": t.stays(), "gaps": t.gaps(), "hospital_death": t.hospital_death[with_visit],
                         "death_days": t.death_days[with_visit]}
        modalities = {}
        for name in MODALITY_FIELDS:
            lists = modality_visits(train, name)
            if lists is not None:
                matrices, codes = modality_matrices({name: lists}, modality(name, code_system))
                Y = matrices[name][0]
                modalities[name] = (codes, np.asarray(Y.sum(axis=0)).ravel(), np.diff(Y.indptr))
        return cls(
            codes=[vocab[i] for i in keep],
            code_counts=np.asarray(X.sum(axis=0)).ravel()[keep],
            visit_sizes=np.diff(X.indptr),
            visits_per_patient=np.diff(inc.visit_offsets(visits)),
            ages=inc.cohort_column(train, "age"),
            sexes=inc.cohort_column(train, "sex"),
            **times,
            modalities=modalities,
        )

    @staticmethod
    def _visit_codes(sizes: np.ndarray, code_cdf: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(visit index, code index) of every drawn code (codes drawn by ``code_cdf``), grouped by
        visit, in draw order."""
        K = len(code_cdf)
        got_v = np.empty(0, np.int64)
        got_c = np.empty(0, np.int64)
        active = np.flatnonzero(sizes > 0)
        while active.size:
            # Each round draws with replacement for the visits still short, then keeps the
            # first occurrence of each (visit, code) and the first `size` codes of each visit.
            have = np.bincount(got_v, minlength=len(sizes))
            m = 2 * (sizes[active] - have[active]) + 4
            new_v = np.repeat(active, m)
            new_c = np.minimum(np.searchsorted(code_cdf, rng.random(len(new_v)), side="right"), K - 1)
            v, c = np.r_[got_v, new_v], np.r_[got_c, new_c]
            _, first = np.unique(v * K + c, return_index=True)
            first.sort()  # back to draw order
            v, c = v[first], c[first]
            order = np.argsort(v, kind="stable")
            v, c = v[order], c[order]
            start = np.searchsorted(v, v, side="left")
            keep = np.arange(len(v)) - start < sizes[v]
            got_v, got_c = v[keep], c[keep]
            have = np.bincount(got_v, minlength=len(sizes))
            active = np.flatnonzero(have < sizes)
        return got_v, got_c

    def sample(self, n: int, seed: int = 0, first_subject_id: int = 1) -> list[dict]:
        """n patients in the package schema; deterministic for a seed."""
        rng = np.random.default_rng(seed)
        who = rng.integers(len(self.ages), size=n)
        n_visits = rng.choice(self.visits_per_patient, size=n)
        sizes = rng.choice(self.visit_sizes, size=int(n_visits.sum()))
        visits = _draw_lists(sizes, self.codes, self.code_cdf, rng)
        first = np.r_[0, np.cumsum(n_visits)]
        patients = [{"subject_id": first_subject_id + i, "age": float(self.ages[who[i]]),
                     "sex": str(self.sexes[who[i]]), "visits": visits[first[i]:first[i + 1]]} for i in range(n)]
        if self.stays is not None:
            self._add_times(patients, n_visits, first, rng)
        for name, (codes, code_cdf, visit_sizes) in self.modalities.items():
            lists = _draw_lists(rng.choice(visit_sizes, size=len(sizes)), codes, code_cdf, rng)
            for i, p in enumerate(patients):
                p[name] = lists[first[i]:first[i + 1]]
        return patients

    def _add_times(self, patients: list[dict], n_visits: np.ndarray, first: np.ndarray,
                   rng: np.random.Generator) -> None:
        """Draw the time fields of ``patients`` (class docstring), after every other draw."""
        V = int(first[-1])
        stays = rng.choice(self.stays, size=V).tolist()
        gaps = rng.choice(self.gaps, size=V) if self.gaps.size else np.zeros(V)
        gaps[first[:-1][n_visits > 0]] = 0.0
        gaps = gaps.tolist()
        outcome = rng.integers(len(self.hospital_death), size=len(patients))
        dead = self.hospital_death[outcome] & (n_visits > 0)
        days = self.death_days[outcome]
        for i, p in enumerate(patients):
            p["stay_days"] = stays[first[i]:first[i + 1]]
            p["gap_days"] = gaps[first[i]:first[i + 1]]
            p["hospital_death"] = bool(dead[i])
            p["death_days"] = None if np.isnan(days[i]) else float(days[i])


def _marginals(codes, code_counts, visit_sizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, cumulative draw probabilities, visit sizes capped at the number of codes)."""
    codes = np.asarray(codes, dtype=object)
    counts = np.asarray(code_counts, dtype=np.float64)
    cdf = np.cumsum(counts) / counts.sum() if counts.sum() else counts
    return codes, cdf, np.minimum(np.asarray(visit_sizes, dtype=np.int64), len(codes))


def _draw_lists(sizes: np.ndarray, codes: np.ndarray, code_cdf: np.ndarray, rng: np.random.Generator) -> list[list]:
    """One code list per visit of the given sizes (``IndependentMarginalSampler._visit_codes``)."""
    v, c = IndependentMarginalSampler._visit_codes(sizes, code_cdf, rng)
    drawn = codes[c].tolist()
    bounds = np.searchsorted(v, np.arange(len(sizes) + 1))
    return [drawn[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
