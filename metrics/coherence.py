"""Coherence of a synthetic cohort with a real one: fidelity, validity, diversity, structure.

``coherence(synthetic, real)`` returns a flat dict. Notation: S = synthetic, R = real (the
reference); a *visit occurrence* of code c = a visit that lists c (a code listed twice in one
visit counts once; duplicates are measured by ``duplicate_rate``); V_X = number of visits of
cohort X. Both cohorts are in one code system, ``code_system`` (``"icd9cm"``, the default, or
``"icd10cm"``; its module ``icd`` = ``code_systems.code_system(code_system)``, :mod:`.icd9` or
:mod:`.icd10`). Every code is first normalised to its dotless form (``icd.normalize``, applied
by ``incidence.cohort_visits``: ``"401.9"`` and ``"4019"``, or ``"E11.9"`` and ``"E119"``, are
one code, in every figure here and in ``privacy``), then compared as a string; a code outside
the system's tables (ICD-9-CM v32, ICD-10-CM FY2021) is kept as given (normalised) and counted
by ``unknown_code_rate`` (``unknown_codes`` summarises them).

Fidelity
- ``code_js``: Jensen-Shannon divergence, base 2, no smoothing, between the code distributions
  p_X(c) = visit occurrences of c / all visit occurrences of X (over the union of codes):
  JS = 1/2 KL(p_S || m) + 1/2 KL(p_R || m), m = (p_S + p_R) / 2, 0 log 0 = 0. In [0, 1]:
  0 iff identical distributions, 1 iff disjoint supports.
- ``category_js``: the same on category distributions, p_X(k) = sum of p_X(c) over the codes c
  of category k (``icd.category``: ICD-9-CM the first 3 characters, 4 for E codes; ICD-10-CM
  the first 3). Never above ``code_js``.
- ``top_k_overlap`` = |T_S ∩ T_R| / k' and ``top_k_jaccard`` = |T_S ∩ T_R| / |T_S ∪ T_R|, where T_X
  = the k' most frequent codes of X by visit occurrences (ties: smaller code string first; T_S
  only holds codes S uses), k' = min(``top_k``, distinct codes of R).
- HALO-style R² (Theodorou et al. 2023), each = 1 - sum_i (r_i - s_i)² / sum_i (r_i - mean(r))²,
  the coefficient of determination of the synthetic values s_i as predictions of the real r_i,
  over the union i of keys present in R or S (absent = 0), as HALO computes it (scikit-learn's
  ``r2_score(real, synthetic)``; a constant r gives 1 if s == r else 0; no key gives NaN):
  ``r2_code_prevalence``: key = code, value = visit occurrences / V_X;
  ``r2_pair_prevalence``: key = unordered pair of distinct codes, value = visits holding both / V_X;
  ``r2_consecutive_prevalence``: key = ordered pair (c, c') (c = c' allowed), value = number of
  consecutive visit pairs (t, t+1) of one patient with c in t and c' in t+1 / number of such
  visit pairs in X.
- ``cooccurrence_score``: mean, over the within-visit pair occurrences of
  S (each unordered pair of distinct codes in each visit), of the number of R visits holding that
  pair; it grows with the size of R, so compare it only between cohorts scored against one R.
  ``cooccurrence_seen_share``: share of those pair occurrences held by at least one R visit.

Validity (``age`` = years at first admission, applied to every visit of the patient; NaN when a
cohort has no ``age``/``sex``)
- ``cms_invalid_code_rate``: share of S visit occurrences whose code breaks a CMS Medicare Code
  Editor age/sex edit of the code system for its patient (``icd.check(code, age, sex)`` is not
  None);
  ``cms_invalid_patient_rate``: share of S patients with at least one such code;
  ``cms_invalid_patient_rate_real``: the same for R (real data is not edit-clean either).
- ``unknown_code_rate``: share of S visit occurrences whose (normalised) code is not a diagnosis
  code of the system's tables (``icd.is_valid``).
- ``duplicate_rate``: share of listed S codes that repeat a code already listed in the same visit.

Diversity
- ``distinct_codes`` / ``distinct_codes_real``: codes used at least once.
- ``code_coverage``: share of the codes of R that S uses; ``code_coverage_frequent``: the same
  over the codes with at least ``min_real_count`` visit occurrences in R.
- ``top_code`` and ``top_code_share``: the code held by the most S patients and the share of S
  patients holding it (``top_code_share_real``: the same for R; mode collapse drives it up).
- ``distinct_patient_share``: distinct S patients / S patients, patients compared as their
  ordered sequence of visit code sets (code order inside a visit ignored).

Structure and demographics
- ``visits_per_patient_mean`` / ``_real``, ``codes_per_visit_mean`` / ``_real`` (distinct codes),
  and for both distributions ``*_wasserstein`` (1-Wasserstein distance between the empirical
  distributions, in visits resp. codes) and ``*_tv`` (total variation distance,
  1/2 sum_n |P_S(n) - P_R(n)|, in [0, 1]).
- ``age_wasserstein`` (years), ``female_share`` / ``female_share_real``.

Procedures and medications (``schema.MODALITY_FIELDS``; each only when both S and R carry it,
``modality_visits``; a cohort without them gives none of these keys, the dict above unchanged)
- The modality's codes: procedures normalised in the procedure system of ``code_system``
  (``procedures.FOR_DIAGNOSES``: ICD-9-CM v32 volume 3 with ICD-9-CM, ICD-10-PCS with ICD-10-CM;
  ``"36.05"`` is ``"3605"``), medications compared as given (``"<NAME>//<FORMULARY>"``); a
  visit occurrence is a visit listing the code, over all visits (a visit without procedures
  counts in V_X).
- Per modality m (``procedures``, ``medications``), as the diagnosis figures of the same name on
  the modality's codes: ``m_code_js``, ``m_category_js`` (categories: the procedure system's,
  the drug name), ``m_top_k`` / ``m_top_k_overlap``, ``m_r2_code_prevalence``,
  ``m_r2_pair_prevalence`` (unordered pairs of two codes of m in one visit), ``m_duplicate_rate``,
  ``m_distinct_codes`` (``_real``), ``m_codes_per_visit_mean`` (``_real``) and
  ``m_codes_per_visit_tv`` (0 codes included).
- Validity: ``m_unknown_code_rate``: share of S visit occurrences of m that are invalid
  (procedures: not a node of the procedure tables, ``is_valid``; medications: not a well-formed,
  normalised ``"<NAME>//<FORMULARY>"``, ``medications.is_valid``). Procedures only:
  ``procedures_cms_invalid_code_rate`` / ``_patient_rate`` (``_patient_rate_real``): as the
  diagnoses' CMS figures, with the Medicare Code Editor's procedure sex edits (it has no
  procedure age edits).
- Across modalities: ``r2_pair_diagnosis_procedure`` and ``r2_pair_diagnosis_medication``: the
  HALO R² of the within-visit pair prevalence, key = (diagnosis category, category of the other
  modality: procedure category, drug name), value = visits holding a code of both / V_X. At
  category level because the question is which kinds of conditions go with which kinds of
  procedures and drugs: the choice of code inside a category is scored by the per-modality
  figures; formulary codes are hospital products (strengths, packages) of one drug; and at code
  level most cross pairs of a cohort of a few thousand patients are seen once, so the R² would
  mostly measure sampling noise.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.stats import wasserstein_distance

from promptehr_hf.datasets_scripts import code_systems
from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.datasets_scripts import medications as meds
from promptehr_hf.datasets_scripts import procedures as procs
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM
from promptehr_hf.datasets_scripts.schema import MODALITY_FIELDS

# The cross-modality pair R² of each modality (with the diagnoses).
CROSS_KEYS = {"procedures": "r2_pair_diagnosis_procedure", "medications": "r2_pair_diagnosis_medication"}


class Cohort:
    """A cohort as arrays: ``visits`` (list per patient), ``X`` csr [n_visits, len(vocab)] 0/1,
    ``offsets`` int [n_patients + 1] (visit rows of each patient), ``age`` float [n_patients] and
    ``sex`` str [n_patients] (None when the input has no such column), ``n_listed`` (codes listed,
    duplicates included). Codes are normalised in ``code_system``."""

    def __init__(self, data: Any, vocab: list[str], name: str, code_system: str = DEFAULT_CODE_SYSTEM):
        self.name = name
        self.visits = inc.cohort_visits(data, code_system=code_system)
        self.X, _ = inc.visit_matrix(self.visits, vocab)
        self.offsets = inc.visit_offsets(self.visits)
        self.n_listed = int(sum(len(v) for p in self.visits for v in p))
        try:
            self.age = np.asarray(inc.cohort_column(data, "age"), dtype=np.float64)
            self.sex = np.asarray(inc.cohort_column(data, "sex"), dtype=object)
        except (KeyError, TypeError):  # a plain list of visit lists: no demographics
            self.age = self.sex = None
            return
        bad = np.flatnonzero(~np.isin(self.sex, ("F", "M")) | ~(self.age >= 0) | ~(self.age < 125))
        if bad.size:
            row = int(bad[0])
            raise ValueError(f"{name} cohort, patient row {row}: need age in [0, 125) and sex 'F' or 'M', "
                             f"got age={float(self.age[row])!r}, sex={self.sex[row]!r}")

    @property
    def n_patients(self) -> int:
        return len(self.visits)

    @property
    def n_visits(self) -> int:
        return self.X.shape[0]

    def patients(self) -> sp.csr_matrix:
        """Patient-by-code 0/1 incidence [n_patients, n_codes]."""
        return inc.collapse(inc.patient_rows(self.offsets), self.X)

    def keys(self, rows=None) -> list[tuple]:
        """Identity of each patient (of ``rows``): the ordered tuple of its visit code sets."""
        rows = range(self.n_patients) if rows is None else rows
        return [tuple(map(frozenset, self.visits[i])) for i in rows]

    def hashes(self) -> np.ndarray:
        """uint64 [n_patients]: equal ``keys`` give equal hashes (random 64-bit code weights
        summed per visit, mixed with the visit's position, summed per patient). Used to find
        candidate duplicates fast; candidates are then compared exactly with ``keys``."""
        w = np.random.default_rng(0).integers(0, 2**63, size=self.X.shape[1], dtype=np.uint64)
        with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
            zero = np.zeros(1, dtype=np.uint64)
            cs = np.concatenate([zero, np.cumsum(w[self.X.indices], dtype=np.uint64)])
            h = cs[self.X.indptr[1:]] - cs[self.X.indptr[:-1]]
            pos = np.arange(self.n_visits) - np.repeat(self.offsets[:-1], np.diff(self.offsets))
            h = (h ^ (pos.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)) \
                * np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
            cs = np.concatenate([zero, np.cumsum(h, dtype=np.uint64)])
            return cs[self.offsets[1:]] - cs[self.offsets[:-1]]

    def found_in(self, other: "Cohort") -> np.ndarray:
        """bool [n_patients]: the patient is identical (``keys``) to some patient of ``other``."""
        mine, theirs = self.hashes(), other.hashes()
        out = np.zeros(self.n_patients, dtype=bool)
        cand = np.flatnonzero(np.isin(mine, theirs))
        if cand.size:
            known = set(other.keys(np.flatnonzero(np.isin(theirs, mine[cand]))))
            out[cand] = [k in known for k in self.keys(cand)]
        return out

    def n_distinct(self) -> int:
        """Number of distinct patients (``keys``)."""
        _, inverse, counts = np.unique(self.hashes(), return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse] > 1)  # equal hashes: compare exactly
        return int((counts == 1).sum()) + len(set(self.keys(shared)))


def cohorts(named: dict[str, Any], code_system: str = DEFAULT_CODE_SYSTEM) -> tuple[dict[str, Cohort], list[str]]:
    """Read several cohorts of one code system over one shared vocabulary (the sorted union of
    their codes): ``({name: Cohort}, vocab)``."""
    vocab = inc.build_vocab(*named.values(), code_system=code_system)
    return {name: Cohort(data, vocab, name, code_system) for name, data in named.items()}, vocab


def unknown_codes(cohort: Any, n_examples: int = 5, code_system: str = DEFAULT_CODE_SYSTEM) -> dict[str, Any]:
    """Codes of ``cohort`` (normalised) that are not diagnosis codes of ``code_system``'s tables
    (``is_valid``): ``{"n_listed": codes listed, "n_unknown": listed codes outside the
    tables, "n_distinct_unknown": distinct such codes, "examples": the ``n_examples`` most listed
    of them (ties: smaller string first)}``."""
    is_valid = code_systems.code_system(code_system).is_valid
    counts: dict[str, int] = {}
    n_listed = 0
    for patient in inc.cohort_visits(cohort, code_system=code_system):
        for visit in patient:
            n_listed += len(visit)
            for code in visit:
                counts[code] = counts.get(code, 0) + 1
    unknown = {c: n for c, n in counts.items() if not is_valid(c)}
    examples = sorted(unknown, key=lambda c: (-unknown[c], c))[:n_examples]
    return {"n_listed": n_listed, "n_unknown": sum(unknown.values()), "n_distinct_unknown": len(unknown),
            "examples": examples}


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Base-2 Jensen-Shannon divergence of two count (or probability) vectors, no smoothing."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    js = 0.0
    for x in (p, q):
        nz = x > 0
        js += 0.5 * float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))
    return float(min(max(js, 0.0), 1.0))


def r2_halo(real, synthetic) -> float:
    """HALO's R² of ``synthetic`` against ``real`` over the union of their nonzero keys.

    ``real``/``synthetic``: nonnegative arrays or sparse matrices of one shape (absent key = 0).
    1 - SS_res / SS_tot with SS_res = sum (r - s)², SS_tot = sum (r - mean r)², both over the n
    keys where r or s is nonzero; SS_tot = 0 gives 1.0 if SS_res = 0 else 0.0; n = 0 gives NaN."""
    R, S = sp.csr_matrix(real, dtype=np.float64), sp.csr_matrix(synthetic, dtype=np.float64)
    R.eliminate_zeros()
    S.eliminate_zeros()
    union = abs(R) + abs(S)  # nonnegative, so no cancellation: its pattern is the union
    n = union.count_nonzero()
    if n == 0:
        return float("nan")
    ss_res = float(((R - S).power(2)).sum())
    mean = R.sum() / n
    ss_tot = float(((R.data - mean) ** 2).sum() + (n - R.nnz) * mean**2)
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot


def _top_k(counts: np.ndarray, k: int) -> set[int]:
    order = np.argsort(-counts, kind="stable")  # vocab is sorted: ties by code string
    order = order[counts[order] > 0]
    return set(order[:k].tolist())


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    n = int(max(a.max(initial=0), b.max(initial=0))) + 1
    pa = np.bincount(a, minlength=n) / max(len(a), 1)
    pb = np.bincount(b, minlength=n) / max(len(b), 1)
    return float(0.5 * np.abs(pa - pb).sum())


def _wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    return float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")


def _cms_invalid(c: Cohort, vocab: list[str], icd, X: sp.csr_matrix | None = None
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """(invalid flag per visit occurrence in ``X.data`` order, patient row of each occurrence),
    or None without demographics. ``X``: a visit-by-code incidence over ``vocab`` with the visit
    rows of ``c`` (default ``c.X``; a modality's for its codes). Only codes that carry an edit are
    checked, once per distinct (code, age, sex), with ``icd.violations`` (the vectorised
    ``icd.check``; ``icd`` the code system's module or a ``procedures.ProcedureCodes``)."""
    if c.age is None or c.sex is None:
        return None
    X = c.X if X is None else X
    visit_of = np.repeat(np.arange(c.n_visits), np.diff(X.indptr))
    patient_of = np.repeat(np.arange(c.n_patients), np.diff(c.offsets))[visit_of]
    bad = np.zeros(X.nnz, dtype=bool)
    has_edit = np.array([icd.edit_of(code) is not None for code in vocab], dtype=bool)
    at = np.flatnonzero(has_edit[X.indices])
    if at.size:
        owner = patient_of[at]
        is_male = (c.sex[owner] == "M").astype(np.float64)
        triples, inverse = np.unique(np.stack([X.indices[at], c.age[owner], is_male], axis=1),
                                     axis=0, return_inverse=True)
        codes = [vocab[j] for j in triples[:, 0].astype(np.int64)]
        sexes = np.where(triples[:, 2] == 1, "M", "F")
        broken = icd.violations(codes, triples[:, 1], sexes) != ""
        bad[at] = broken[inverse.ravel()]
    return bad, patient_of


def safe_category(code: str, code_system: str = DEFAULT_CODE_SYSTEM) -> str:
    """The code's category in ``code_system``; a code too malformed to have one is its own."""
    # A malformed synthetic code must not crash the report.
    try:
        return code_systems.code_system(code_system).category(code)
    except ValueError:
        return code


def _rates(flags, n_patients: int) -> tuple[float, float]:
    """(share of occurrences, share of patients) flagged; NaN without demographics."""
    if flags is None:
        return float("nan"), float("nan")
    bad, owner = flags
    return (float(bad.mean()) if bad.size else float("nan"),
            len(np.unique(owner[bad])) / n_patients if n_patients else float("nan"))


class Modality(NamedTuple):
    """How the metrics read one optional code list per visit (``schema.MODALITY_FIELDS``).

    name: the patient field (``"procedures"``, ``"medications"``); normalize: code -> the form
    codes are compared in (TypeError for a non-string);
    category: code -> category (ValueError for a malformed code); is_valid: the validity check;
    edits: the system with CMS edits (``edit_of`` / ``violations``), or None."""

    name: str
    normalize: Callable[[str], str]
    category: Callable[[str], str]
    is_valid: Callable[[Any], bool]
    edits: Any


def _as_given(code: str) -> str:
    if not isinstance(code, str):
        raise TypeError(f"codes must be strings, got {code!r} ({type(code).__name__})")
    return code


def modality(name: str, code_system: str = DEFAULT_CODE_SYSTEM) -> Modality:
    """The :class:`Modality` of a field beside diagnoses in ``code_system``: ``"procedures"`` (the
    procedure system of the diagnoses', ``procedures.FOR_DIAGNOSES``, with its CMS sex edits) or
    ``"medications"`` (``"<NAME>//<FORMULARY>"`` codes compared as given, valid when well-formed,
    no edits). ValueError for another name."""
    if name == "procedures":
        system = procs.procedure_system(procs.FOR_DIAGNOSES[code_system])
        return Modality(name, system.normalize, system.category, system.is_valid, system)
    if name == "medications":
        return Modality(name, _as_given, meds.category, meds.is_valid, None)
    raise ValueError(f"unknown modality {name!r}; expected one of {', '.join(map(repr, MODALITY_FIELDS))}")


def modality_visits(cohort: Any, name: str) -> list[list[list[str]]] | None:
    """The per-visit code lists of the optional field ``name`` of every patient, or None when the
    cohort does not carry it (no such column, or null for every patient). A patient whose value is
    null, in a cohort that carries the field, has an empty list per visit. ValueError when the
    field's column and the visits differ in length or a patient's list is not parallel to its
    visits."""
    if isinstance(cohort, (list, tuple)) and len(cohort) and isinstance(cohort[0], dict):
        values = [p.get(name) for p in cohort]
    else:
        try:
            values = inc.cohort_column(cohort, name)
        except (KeyError, TypeError):  # no such column, or a plain list of visit lists
            return None
    if all(v is None for v in values):
        return None
    visits = inc.cohort_column(cohort, "visits")
    if len(values) != len(visits):
        raise ValueError(f"{name}: {len(values)} patients for {len(visits)} patients of visits")
    out = []
    for row, (value, patient) in enumerate(zip(values, visits)):
        if value is None:
            out.append([[] for _ in patient])
            continue
        if isinstance(value, str) or len(value) != len(patient) or any(isinstance(v, str) for v in value):
            raise ValueError(f"patient row {row}: {name} must be one list of codes per visit ({len(patient)} "
                             f"visits), got {value!r:.80}")
        out.append(value)
    return out


def modality_matrices(named: dict[str, list[list[list[str]]]], mod: Modality
                      ) -> tuple[dict[str, tuple[sp.csr_matrix, int]], list[str]]:
    """Visit-by-code 0/1 incidence of one modality for several cohorts over their shared
    vocabulary (the sorted union of their normalised codes): ``({name: (X, n_listed)}, vocab)``,
    ``X`` csr int32 [visits of the cohort, len(vocab)], ``n_listed`` its codes listed (duplicates
    included). ``named``: per cohort, ``modality_visits``."""
    flat = {name: list(chain.from_iterable(visits)) for name, visits in named.items()}
    codes = set()
    for visits in flat.values():
        codes.update(chain.from_iterable(visits))
    canonical = {c: mod.normalize(c) for c in codes}
    vocab = sorted(set(canonical.values()))
    index = {c: i for i, c in enumerate(vocab)}
    index = {c: index[n] for c, n in canonical.items()}
    out = {}
    for name, visits in flat.items():
        listed = list(chain.from_iterable(visits))
        lengths = np.fromiter(map(len, visits), dtype=np.int64, count=len(visits))
        rows = np.repeat(np.arange(len(visits)), lengths)
        cols = np.fromiter(map(index.__getitem__, listed), dtype=np.int64, count=len(listed))
        X = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(len(visits), len(vocab)))
        X.data[:] = 1  # duplicates were summed by the constructor
        out[name] = (X, len(listed))
    return out, vocab


def safe_modality_category(mod: Modality, code: str) -> str:
    """The code's category in the modality; a code too malformed to have one is its own."""
    # A malformed synthetic code must not crash the report.
    try:
        return mod.category(code)
    except ValueError:
        return code


def _pair_r2(XR: sp.csr_matrix, YR: sp.csr_matrix, XS: sp.csr_matrix, YS: sp.csr_matrix) -> float:
    """HALO R² of the within-visit prevalence of the pairs (column of X, column of Y), real vs
    synthetic: visits holding both / visits of the cohort."""
    def prevalence(X, Y):
        return sp.csr_matrix(sp.csr_matrix(X, dtype=np.int64).T @ Y) / max(X.shape[0], 1)
    return r2_halo(prevalence(XR, YR), prevalence(XS, YS))


def _modality_figures(S: Cohort, R: Cohort, syn: list, real: list, mod: Modality, top_k: int
                      ) -> tuple[dict[str, Any], tuple[sp.csr_matrix, sp.csr_matrix]]:
    """The per-modality figures of the module docstring, keys ``<modality>_<figure>``, and the
    category-level incidences ``(S, R)`` of the modality for the cross-modality pairs."""
    matrices, vocab = modality_matrices({"synthetic": syn, "real": real}, mod)
    (xs, listed_s), (xr, _) = matrices["synthetic"], matrices["real"]
    p = f"{mod.name}_"
    out: dict[str, Any] = {}
    cnt_s = np.asarray(xs.sum(axis=0)).ravel()
    cnt_r = np.asarray(xr.sum(axis=0)).ravel()
    M, _ = inc.group_columns(vocab, partial(safe_modality_category, mod))
    out[p + "code_js"] = js_divergence(cnt_s, cnt_r)
    out[p + "category_js"] = js_divergence(M.T @ cnt_s, M.T @ cnt_r)
    k = min(top_k, int((cnt_r > 0).sum()))
    out[p + "top_k"] = k
    out[p + "top_k_overlap"] = len(_top_k(cnt_s, k) & _top_k(cnt_r, k)) / k if k else float("nan")
    out[p + "r2_code_prevalence"] = r2_halo(cnt_r / max(R.n_visits, 1), cnt_s / max(S.n_visits, 1))
    out[p + "r2_pair_prevalence"] = r2_halo(sp.triu(inc.cooccurrence(xr), k=1) / max(R.n_visits, 1),
                                            sp.triu(inc.cooccurrence(xs), k=1) / max(S.n_visits, 1))
    known = np.array([mod.is_valid(code) for code in vocab], dtype=bool)
    out[p + "unknown_code_rate"] = float((~known[xs.indices]).mean()) if xs.nnz else float("nan")
    out[p + "duplicate_rate"] = (listed_s - xs.nnz) / listed_s if listed_s else float("nan")
    if mod.edits is not None:
        out[p + "cms_invalid_code_rate"], out[p + "cms_invalid_patient_rate"] = _rates(
            _cms_invalid(S, vocab, mod.edits, xs), S.n_patients)
        out[p + "cms_invalid_patient_rate_real"] = _rates(_cms_invalid(R, vocab, mod.edits, xr), R.n_patients)[1]
    out[p + "distinct_codes"] = int((cnt_s > 0).sum())
    out[p + "distinct_codes_real"] = int((cnt_r > 0).sum())
    a, b = np.diff(xs.indptr).astype(np.int64), np.diff(xr.indptr).astype(np.int64)
    out[p + "codes_per_visit_mean"] = float(a.mean()) if a.size else float("nan")
    out[p + "codes_per_visit_mean_real"] = float(b.mean()) if b.size else float("nan")
    out[p + "codes_per_visit_tv"] = _tv(a, b)
    return out, (inc.collapse(xs, M), inc.collapse(xr, M))


def modality_coherence(S: Cohort, R: Cohort, synthetic: Any, real: Any, vocab: list[str], *, top_k: int = 100,
                       code_system: str = DEFAULT_CODE_SYSTEM) -> dict[str, Any]:
    """The per-modality and cross-modality figures of the module docstring for every modality
    both ``synthetic`` and ``real`` carry (``modality_visits``); {} when there is none. ``S`` /
    ``R``: the cohorts' diagnosis :class:`Cohort` over ``vocab``."""
    out: dict[str, Any] = {}
    diagnoses = None
    for name in MODALITY_FIELDS:
        syn, ref = modality_visits(synthetic, name), modality_visits(real, name)
        if syn is None or ref is None:
            continue
        figures, (cs, cr) = _modality_figures(S, R, syn, ref, modality(name, code_system), top_k)
        if diagnoses is None:
            M, _ = inc.group_columns(vocab, partial(safe_category, code_system=code_system))
            diagnoses = inc.collapse(S.X, M), inc.collapse(R.X, M)
        figures[CROSS_KEYS[name]] = _pair_r2(diagnoses[1], cr, diagnoses[0], cs)
        out |= figures
    return out


def coherence(synthetic: Any, real: Any, *, top_k: int = 100, min_real_count: int = 10,
              code_system: str = DEFAULT_CODE_SYSTEM) -> dict[str, Any]:
    """All metrics of the module docstring, synthetic vs real.

    Args:
        synthetic, real: cohorts (patient dicts, a ``datasets.Dataset`` or a dict of columns with
            ``visits``, ``age``, ``sex``; see ``incidence.cohort_column``).
        top_k: k of the top-k overlap. min_real_count: threshold of ``code_coverage_frequent``.
        code_system: ``"icd9cm"`` or ``"icd10cm"``, the cohorts' codes: their normalisation,
            categories, validity and CMS edits. ValueError for another name.
    Returns:
        dict of floats (and ``top_code``: str, counts: int), keys as documented above.
    """
    icd = code_systems.code_system(code_system)
    cs, vocab = cohorts({"synthetic": synthetic, "real": real}, code_system)
    S, R = cs["synthetic"], cs["real"]
    out: dict[str, Any] = {"n_synthetic_patients": S.n_patients, "n_real_patients": R.n_patients}

    # Code and category distributions.
    cnt_s = np.asarray(S.X.sum(axis=0)).ravel()
    cnt_r = np.asarray(R.X.sum(axis=0)).ravel()
    M, _ = inc.group_columns(vocab, partial(safe_category, code_system=code_system))
    out["code_js"] = js_divergence(cnt_s, cnt_r)
    out["category_js"] = js_divergence(M.T @ cnt_s, M.T @ cnt_r)
    k = min(top_k, int((cnt_r > 0).sum()))
    top_s, top_r = _top_k(cnt_s, k), _top_k(cnt_r, k)
    out["top_k"] = k
    out["top_k_overlap"] = len(top_s & top_r) / k if k else float("nan")
    out["top_k_jaccard"] = len(top_s & top_r) / len(top_s | top_r) if k else float("nan")

    # HALO R²: per-visit prevalence of codes, within-visit pairs, consecutive-visit pairs.
    out["r2_code_prevalence"] = r2_halo(cnt_r / max(R.n_visits, 1), cnt_s / max(S.n_visits, 1))
    pair_s = sp.triu(inc.cooccurrence(S.X), k=1, format="csr")
    cooc_r = inc.cooccurrence(R.X)
    pair_r = sp.triu(cooc_r, k=1, format="csr")
    out["r2_pair_prevalence"] = r2_halo(pair_r / max(R.n_visits, 1), pair_s / max(S.n_visits, 1))
    trans = []
    for c in (R, S):
        n_pairs = c.n_visits - int((np.diff(c.offsets) > 0).sum())
        trans.append(inc.transitions(c.X, c.offsets) / max(n_pairs, 1))
    out["r2_consecutive_prevalence"] = r2_halo(*trans)

    # Co-occurrence of generated within-visit pairs in the real visits.
    n_pairs_s = pair_s.sum()
    if n_pairs_s:
        out["cooccurrence_score"] = float(pair_s.multiply(cooc_r).sum() / n_pairs_s)
        out["cooccurrence_seen_share"] = float(pair_s.multiply(cooc_r > 0).sum() / n_pairs_s)
    else:
        out["cooccurrence_score"] = out["cooccurrence_seen_share"] = float("nan")

    # Validity.
    out["cms_invalid_code_rate"], out["cms_invalid_patient_rate"] = _rates(_cms_invalid(S, vocab, icd), S.n_patients)
    out["cms_invalid_patient_rate_real"] = _rates(_cms_invalid(R, vocab, icd), R.n_patients)[1]
    known = np.array([icd.is_valid(code) for code in vocab], dtype=bool)
    out["unknown_code_rate"] = float((~known[S.X.indices]).mean()) if S.X.nnz else float("nan")
    out["duplicate_rate"] = (S.n_listed - S.X.nnz) / S.n_listed if S.n_listed else float("nan")

    # Diversity.
    used_s, used_r = cnt_s > 0, cnt_r > 0
    frequent = cnt_r >= min_real_count
    out["distinct_codes"] = int(used_s.sum())
    out["distinct_codes_real"] = int(used_r.sum())
    out["code_coverage"] = float((used_s & used_r).sum() / used_r.sum()) if used_r.any() else float("nan")
    out["code_coverage_frequent"] = (float((used_s & frequent).sum() / frequent.sum()) if frequent.any()
                                     else float("nan"))
    pat_s = np.asarray(S.patients().sum(axis=0)).ravel()
    pat_r = np.asarray(R.patients().sum(axis=0)).ravel()
    out["top_code"] = vocab[int(pat_s.argmax())] if pat_s.any() else None
    out["top_code_share"] = float(pat_s.max(initial=0) / max(S.n_patients, 1))
    out["top_code_share_real"] = float(pat_r.max(initial=0) / max(R.n_patients, 1))
    out["distinct_patient_share"] = S.n_distinct() / S.n_patients if S.n_patients else float("nan")

    # Structure and demographics.
    for name, fn in (("visits_per_patient", lambda c: np.diff(c.offsets)),
                     ("codes_per_visit", lambda c: np.diff(c.X.indptr))):
        a, b = fn(S).astype(np.int64), fn(R).astype(np.int64)
        out[f"{name}_mean"] = float(a.mean()) if a.size else float("nan")
        out[f"{name}_mean_real"] = float(b.mean()) if b.size else float("nan")
        out[f"{name}_wasserstein"] = _wasserstein(a, b)
        out[f"{name}_tv"] = _tv(a, b)
    demographics = S.age is not None and R.age is not None
    out["age_wasserstein"] = _wasserstein(S.age, R.age) if demographics else float("nan")
    for key, c in (("female_share", S), ("female_share_real", R)):
        out[key] = float(np.mean(c.sex == "F")) if c.sex is not None and c.n_patients else float("nan")
    return out | modality_coherence(S, R, synthetic, real, vocab, top_k=top_k, code_system=code_system)
