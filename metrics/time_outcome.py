"""Time and outcome of a synthetic cohort against a real one: gaps, stays, ages at admission,
30-day readmission, in-hospital mortality (overall and by diagnosis category), and the
consistency of the time fields.

A cohort *has times* when its patients carry the optional fields of the patient schema
(``has_times``: some patient has a ``stay_days`` or ``gap_days`` list):

- ``stay_days``: per visit, length of stay in days;
- ``gap_days``: per visit, days from the previous visit's discharge to this admission (0.0 for
  the first visit);
- ``hospital_death``: the patient died during the last visit (None or absent reads False);
- ``death_days``: days from the last discharge to a death outside hospital (None, or NaN: no
  known death, or a death in hospital).

``time_outcome(synthetic, real)`` returns ``{}`` unless both cohorts have times (a report then
shows no time figure at all). Notation as in ``coherence``: S = synthetic, R = real (the
reference); keys ending ``_real`` are R's own value. The per-visit figures read the visits of
*aligned* patients only, those whose ``stay_days`` and ``gap_days`` both have one entry per
visit (the others are counted as violations); the outcome figures read every patient.

Elapsed time and age: visit k of a patient is admitted ``e_k = sum_{j<k} stay_j + sum_{j<=k}
gap_j`` days after the first admission (the gap of visit k lies before its admission; gap_0 =
0), and its age at admission is ``age + e_k / 365.25`` (``age``: years at the first admission).
A non-finite stay or gap leaves e undefined (NaN) from that visit on.

Distributions (1-Wasserstein distance, in the unit of the values, and the two-sample
Kolmogorov-Smirnov statistic ``sup_x |F_S(x) - F_R(x)|`` of the empirical CDFs; over the finite
values; NaN when a side has none):
- ``gap_days_*``: gaps of the visits after the first (``_mean``, ``_median`` and their ``_real``);
- ``stay_days_*``: lengths of stay of all visits (``_mean``, ``_mean_real``);
- ``admission_age_*``: age at each admission, years (``_mean``, ``_mean_real``);
- ``death_days_wasserstein``: days from the last discharge to a death outside hospital.

Outcomes
- ``readmission_30d_rate`` / ``_real``: share of discharges followed by an admission of the same
  patient within 30 days (next visit's gap <= 30). A discharge = a visit of an aligned patient,
  except the last visit of a patient who died in hospital (a last visit of a survivor is a
  discharge with no readmission: the data end there for both cohorts alike).
- ``hospital_mortality_patient_rate`` / ``_real``: share of patients (with at least one visit)
  who died in hospital; ``hospital_mortality_admission_rate`` / ``_real``: in-hospital deaths /
  admissions (a death is at the last visit, so each patient adds at most one).
- ``out_of_hospital_death_rate`` / ``_real``: share of patients (with a visit) with a finite
  ``death_days``.
- Mortality by diagnosis category (``mortality_by_category``): the ``top_categories`` categories
  (``icd.category`` of the code system, as ``coherence.safe_category``) held by the most R
  visits (ties: smaller category string first); per category, the in-hospital death rate of the
  visits holding it (visits whose patient died in hospital at that visit / visits holding it),
  in R and in S. ``mortality_by_category_r2``: the plain coefficient of determination of the S
  rates as predictions of the R rates, ``1 - sum (r - s)² / sum (r - mean r)²``, over the
  ``mortality_by_category_n`` of those categories that S holds at all (a rate needs a visit;
  a constant r gives 1 if s == r else 0; none gives NaN). Plain rather than ``coherence.r2_halo``:
  the keys are a fixed set of categories and a rate of 0 is a value (no death among its visits),
  not an absent key, so no key may drop out because both rates are 0.

Consistency violations of S (``violations_<name>``, counts of patients or of visits as said;
``time_violation_patient_rate``: share of S patients with at least one, ``_real``: the same
for R, which need not be clean either):
- ``times_missing`` (patients): ``stay_days`` or ``gap_days`` is None in a cohort with times;
- ``length_mismatch`` (patients): a ``stay_days`` or ``gap_days`` list whose length differs from
  the number of visits;
- ``nonfinite_time`` (visits): a NaN or infinite stay or gap;
- ``negative_stay``, ``negative_gap`` (visits): a value below 0;
- ``first_gap_nonzero`` (patients): the first visit's gap is finite but not 0;
- ``death_and_death_days`` (patients): ``hospital_death`` with ``death_days`` set (a death both
  in and after hospital; a death before the last visit cannot be written in these fields);
- ``bad_death_days`` (patients): ``death_days`` below 0 or infinite (NaN reads as None: pandas
  writes a missing float so);
- ``death_without_visit`` (patients): ``hospital_death`` on a patient with no visit;
- ``age_over_cap`` (patients): age at the first admission above ``schema.AGE_CAP`` (90), i.e.
  some admission older than 90 + e_k / 365.25 years;
- ``age_implausible`` (visits): an age at admission of ``MAX_AGE`` (125) years or more, times
  adding up past a lifespan.

Everything is vectorised over the visits flattened once (``Times``).
"""

from __future__ import annotations

from functools import partial
from itertools import chain
from typing import Any

import numpy as np
from scipy.stats import wasserstein_distance

from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM
from promptehr_hf.datasets_scripts.schema import AGE_CAP
from promptehr_hf.metrics.coherence import safe_category

TIME_FIELDS = ("stay_days", "gap_days", "hospital_death", "death_days")
DAYS_PER_YEAR = 365.25
READMISSION_DAYS = 30.0
MAX_AGE = 125.0  # coherence.Cohort refuses a first-admission age at or above it
VIOLATIONS = ("times_missing", "length_mismatch", "nonfinite_time", "negative_stay", "negative_gap",
              "first_gap_nonzero", "death_and_death_days", "bad_death_days", "death_without_visit",
              "age_over_cap", "age_implausible")


def optional_column(cohort: Any, name: str) -> list | None:
    """One optional field of every patient, or None when the cohort has no such field (a patient
    dict without the key reads None)."""
    if isinstance(cohort, (list, tuple)) and len(cohort) and isinstance(cohort[0], dict):
        values = [p.get(name) for p in cohort]
        return values if any(v is not None for v in values) else None
    try:
        return inc.cohort_column(cohort, name)
    except (KeyError, TypeError):
        return None


def _present(values: list | None) -> bool:
    return values is not None and any(not _is_none(v) for v in values)


def _is_none(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))  # pandas writes a missing float as NaN


def has_times(cohort: Any) -> bool:
    """Whether some patient of ``cohort`` has a ``stay_days`` or ``gap_days`` list."""
    return _present(optional_column(cohort, "stay_days")) or _present(optional_column(cohort, "gap_days"))


def _lengths(values: list) -> np.ndarray:
    """Length of each list, -1 for None."""
    return np.fromiter((-1 if _is_none(v) else len(v) for v in values), dtype=np.int64, count=len(values))


class Times:
    """A cohort's times as flat arrays. Per patient [n]: ``n_visits``, ``aligned`` (both lists
    have one entry per visit), ``missing``, ``mismatch``, ``age`` (NaN without the column),
    ``hospital_death`` bool, ``death_days`` (NaN: None). Per visit [V], patient after patient:
    ``patient``, ``first``, ``last``, ``stay`` and ``gap`` (NaN for visits of patients not
    aligned), ``elapsed`` (days from the first admission to this one), ``age_at`` (years) and
    ``death_visit`` (the patient died in hospital at this visit)."""

    def __init__(self, cohort: Any):
        visits = inc.cohort_column(cohort, "visits")
        n = len(visits)
        self.n_visits = np.fromiter(map(len, visits), dtype=np.int64, count=n)
        stays = optional_column(cohort, "stay_days") or [None] * n
        gaps = optional_column(cohort, "gap_days") or [None] * n
        n_stay, n_gap = _lengths(stays), _lengths(gaps)
        self.missing = (n_stay < 0) | (n_gap < 0)
        self.mismatch = ~self.missing & ((n_stay != self.n_visits) | (n_gap != self.n_visits))
        self.aligned = ~self.missing & ~self.mismatch
        keep = np.flatnonzero(self.aligned)
        offsets = np.concatenate([[0], np.cumsum(self.n_visits)])
        V = int(offsets[-1])
        self.patient = np.repeat(np.arange(n), self.n_visits)
        position = np.arange(V) - offsets[:-1][self.patient]
        self.first = position == 0
        self.last = position == self.n_visits[self.patient] - 1
        on = self.aligned[self.patient]
        self.stay = np.full(V, np.nan)
        self.gap = np.full(V, np.nan)
        self.stay[on] = _floats(chain.from_iterable(stays[i] for i in keep), int(on.sum()))
        self.gap[on] = _floats(chain.from_iterable(gaps[i] for i in keep), int(on.sum()))

        dead = optional_column(cohort, "hospital_death") or [None] * n
        self.hospital_death = np.fromiter((False if _is_none(d) else bool(d) for d in dead), dtype=bool, count=n)
        days = optional_column(cohort, "death_days") or [None] * n
        self.death_days = np.fromiter((np.nan if _is_none(d) else float(d) for d in days), dtype=np.float64,
                                      count=n)
        self.death_days_set = np.fromiter((not _is_none(d) for d in days), dtype=bool, count=n)
        try:
            self.age = np.asarray(inc.cohort_column(cohort, "age"), dtype=np.float64)
        except (KeyError, TypeError):
            self.age = np.full(n, np.nan)
        self.death_visit = self.last & self.hospital_death[self.patient]

        # Elapsed days to each admission: a running sum over the flat visits, less the sum before
        # the patient's first visit and less the visit's own stay; a non-finite step poisons the rest
        # of its patient only.
        step = self.stay + self.gap
        finite = np.isfinite(step)
        total = np.concatenate([[0.0], np.cumsum(np.where(finite, step, 0.0))])
        broken = np.concatenate([[0], np.cumsum(~finite)])
        start = offsets[:-1][self.patient]
        at = np.arange(V)
        self.elapsed = total[at + 1] - total[start] - self.stay
        self.elapsed[broken[at + 1] - broken[start] > 0] = np.nan
        self.age_at = self.age[self.patient] + self.elapsed / DAYS_PER_YEAR

    @property
    def n_patients(self) -> int:
        return len(self.n_visits)

    def gaps(self) -> np.ndarray:
        """Finite gaps of the visits after the first."""
        g = self.gap[~self.first]
        return g[np.isfinite(g)]

    def stays(self) -> np.ndarray:
        return self.stay[np.isfinite(self.stay)]

    def admission_ages(self) -> np.ndarray:
        return self.age_at[np.isfinite(self.age_at)]

    def post_discharge_deaths(self) -> np.ndarray:
        return self.death_days[np.isfinite(self.death_days)]

    def readmission_rate(self, days: float = READMISSION_DAYS) -> float:
        discharge = self.aligned[self.patient] & ~self.death_visit
        next_gap = np.concatenate([self.gap[1:], [np.nan]])
        readmitted = discharge & ~self.last & (next_gap <= days)
        return _share(readmitted.sum(), discharge.sum())

    def mortality(self) -> tuple[float, float]:
        """(in-hospital deaths per patient with a visit, per admission)."""
        with_visit = self.n_visits > 0
        return (_share((self.hospital_death & with_visit).sum(), with_visit.sum()),
                _share(self.death_visit.sum(), len(self.death_visit)))

    def out_of_hospital_death_rate(self) -> float:
        with_visit = self.n_visits > 0
        return _share((np.isfinite(self.death_days) & with_visit).sum(), with_visit.sum())

    def violations(self) -> dict[str, int]:
        """Counts of ``VIOLATIONS`` (module docstring) and ``patients``: patients with any."""
        V = len(self.stay)
        nonfinite = self.aligned[self.patient] & ~(np.isfinite(self.stay) & np.isfinite(self.gap))
        first_gap = self.first & np.isfinite(self.gap) & (self.gap != 0)
        visit_flags = {
            "nonfinite_time": nonfinite, "negative_stay": self.stay < 0, "negative_gap": self.gap < 0,
            "age_implausible": self.age_at >= MAX_AGE,
        }
        patient_flags = {
            "times_missing": self.missing, "length_mismatch": self.mismatch,
            "first_gap_nonzero": np.bincount(self.patient[first_gap], minlength=self.n_patients) > 0,
            "death_and_death_days": self.hospital_death & self.death_days_set,
            "bad_death_days": self.death_days_set & ~(np.isfinite(self.death_days) & (self.death_days >= 0)),
            "death_without_visit": self.hospital_death & (self.n_visits == 0),
            "age_over_cap": self.age > AGE_CAP,
        }
        out = {name: int(flag.sum()) for name, flag in (visit_flags | patient_flags).items()}
        any_visit = np.zeros(V, dtype=bool)
        for flag in visit_flags.values():
            any_visit |= flag
        anyone = np.bincount(self.patient[any_visit], minlength=self.n_patients) > 0
        for flag in patient_flags.values():
            anyone |= flag
        out["patients"] = int(anyone.sum())
        return {name: out[name] for name in (*VIOLATIONS, "patients")}


def _floats(values, count: int) -> np.ndarray:
    return np.fromiter((np.nan if v is None else v for v in values), dtype=np.float64, count=count)


def _share(num, den) -> float:
    return float(num) / float(den) if den else float("nan")


def _wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    return float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic, sup |F_a - F_b| (as ``scipy.stats.ks_2samp``);
    NaN when a sample is empty."""
    if not len(a) or not len(b):
        return float("nan")
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, side="right") / len(a)
                        - np.searchsorted(b, x, side="right") / len(b)).max())


def r2_plain(real: np.ndarray, synthetic: np.ndarray) -> float:
    """1 - sum (r - s)² / sum (r - mean r)² over the given keys; a constant r gives 1.0 if s == r
    else 0.0; no key gives NaN."""
    r, s = np.asarray(real, dtype=np.float64), np.asarray(synthetic, dtype=np.float64)
    if not r.size:
        return float("nan")
    ss_res = float(((r - s) ** 2).sum())
    ss_tot = float(((r - r.mean()) ** 2).sum())
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def mortality_by_category(synthetic: Any, real: Any, *, code_system: str = DEFAULT_CODE_SYSTEM,
                          top_categories: int = 50, times: tuple[Times, Times] | None = None) -> dict[str, Any]:
    """In-hospital death rate of the visits holding each of the ``top_categories`` most common
    real categories (module docstring): ``{"categories": list[str], "visits_real", "visits":
    int arrays, "rate_real", "rate": float arrays (``rate`` NaN where S has no such visit)}``.
    ``times``: the cohorts' ``Times`` (S, R) when already built."""
    ts, tr = times if times is not None else (Times(synthetic), Times(real))
    vocab = inc.build_vocab(synthetic, real, code_system=code_system)
    M, groups = inc.group_columns(vocab, partial(safe_category, code_system=code_system))
    counts, deaths = [], []
    for cohort, t in ((real, tr), (synthetic, ts)):
        X, _ = inc.visit_matrix(cohort, vocab, code_system=code_system)
        C = inc.collapse(X, M)
        counts.append(np.asarray(C.sum(axis=0)).ravel())
        deaths.append(np.asarray(C.T @ t.death_visit.astype(np.int64)).ravel())
    top = np.argsort(-counts[0], kind="stable")  # groups are sorted: ties by category string
    top = top[counts[0][top] > 0][:top_categories]
    with np.errstate(divide="ignore", invalid="ignore"):
        rate_real = deaths[0][top] / counts[0][top]
        rate = np.where(counts[1][top] > 0, deaths[1][top] / counts[1][top], np.nan)
    return {"categories": [groups[k] for k in top], "visits_real": counts[0][top], "visits": counts[1][top],
            "rate_real": rate_real, "rate": rate}


def time_outcome(synthetic: Any, real: Any, *, code_system: str = DEFAULT_CODE_SYSTEM,
                 top_categories: int = 50) -> dict[str, Any]:
    """All figures of the module docstring, synthetic vs real; ``{}`` unless both have times.

    Args:
        synthetic, real: cohorts (patient dicts, a ``datasets.Dataset`` or a dict of columns with
            ``visits``, ``age`` and the time fields; see ``incidence.cohort_column``).
        code_system: ``"icd9cm"`` or ``"icd10cm"``: the categories of mortality by category.
        top_categories: how many of the most common real categories it compares.
    Returns:
        a flat dict of floats and ints (``violations_*``, ``mortality_by_category_n``).
    """
    if not (has_times(synthetic) and has_times(real)):
        return {}
    S, R = Times(synthetic), Times(real)
    out: dict[str, Any] = {}
    for name, get in (("gap_days", Times.gaps), ("stay_days", Times.stays), ("admission_age", Times.admission_ages)):
        a, b = get(S), get(R)
        out[f"{name}_mean"], out[f"{name}_mean_real"] = _mean(a), _mean(b)
        if name == "gap_days":
            out["gap_days_median"] = float(np.median(a)) if a.size else float("nan")
            out["gap_days_median_real"] = float(np.median(b)) if b.size else float("nan")
        out[f"{name}_wasserstein"] = _wasserstein(a, b)
        out[f"{name}_ks"] = ks_statistic(a, b)
    out["death_days_wasserstein"] = _wasserstein(S.post_discharge_deaths(), R.post_discharge_deaths())

    out["readmission_30d_rate"], out["readmission_30d_rate_real"] = S.readmission_rate(), R.readmission_rate()
    (out["hospital_mortality_patient_rate"], out["hospital_mortality_admission_rate"]) = S.mortality()
    (out["hospital_mortality_patient_rate_real"], out["hospital_mortality_admission_rate_real"]) = R.mortality()
    out["out_of_hospital_death_rate"] = S.out_of_hospital_death_rate()
    out["out_of_hospital_death_rate_real"] = R.out_of_hospital_death_rate()
    by = mortality_by_category(synthetic, real, code_system=code_system, top_categories=top_categories,
                               times=(S, R))
    held = np.isfinite(by["rate"])
    out["mortality_by_category_r2"] = r2_plain(by["rate_real"][held], by["rate"][held])
    out["mortality_by_category_n"] = int(held.sum())

    found = S.violations()
    out |= {f"violations_{name}": found[name] for name in VIOLATIONS}
    out["time_violation_patient_rate"] = _share(found["patients"], S.n_patients)
    out["time_violation_patient_rate_real"] = _share(R.violations()["patients"], R.n_patients)
    return out


__all__ = ["TIME_FIELDS", "Times", "has_times", "ks_statistic", "mortality_by_category", "optional_column",
           "r2_plain", "time_outcome"]
