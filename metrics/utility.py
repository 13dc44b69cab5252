"""Utility of a synthetic cohort: train on synthetic, test on real (TSTR).

``utility(synthetic, real_train, real_test)`` fits the same simple model once on the real
training patients and once on the synthetic ones, for each prediction task below, and tests both
on the held-out real patients (``real_test``). A synthetic cohort is useful to the extent that
what a model learns from it holds on real patients: the synthetic-trained figures should come
close to the real-trained ones (the ratio synthetic / real close to 1).

Notation: S = synthetic, T = real training, H = real held-out (test) cohort. Codes are
normalised in ``code_system`` (as in ``coherence``) and read at category level
(``coherence.safe_category``: ICD-9-CM the first 3 characters, 4 for E codes; ICD-10-CM the
first 3).

Model (the same for every task and training cohort): scikit-learn ``LogisticRegression`` with
its default L2 penalty, ``C`` = 1.0 (fixed, not tuned), solver ``liblinear`` (which also penalises the
intercept), ``max_iter`` 1000, on sparse 0/1 features; scored by its ``decision_function``.
Features of a visit: the multi-hot vector of its categories over the categories seen in S, T or
H (one shared column space), one-hot age band of the patient's ``age`` (years at the first
admission; bands ``AGE_BANDS``: [0, 1), [1, 18), [18, 40), [40, 50), [50, 60), [60, 70),
[70, 80), 80 and over) and a 0/1 column for sex M.

Tasks (``TASKS``; one binary problem each, rows built the same way in S, T and H):

- ``mortality``: in-hospital death of an admission from its codes: one row per patient with a
  visit, the features of the last visit, label ``hospital_death``. Only when the training cohort
  and H both carry the outcome (``has_outcome``: some patient has times or a non-null
  ``hospital_death``); otherwise skipped, with the reason.
- ``next_admission_<k>``: for each of the ``n_next`` (20) categories k most common among the T
  visits that follow another visit of their patient (the visits t+1 below, i.e. the labels; not
  all visits, whose top categories include newborn codes that no later visit holds; ties:
  smaller category string first): one row per pair of consecutive visits (t, t+1) of a patient
  (patients with 2+ visits), the features of visit t, label "visit t+1 holds k".
- ``phenotype_<k>``: for each of the ``n_phenotype`` (25) categories k of the chronic list of
  the code system (``CHRONIC[code_system]``) held by the most T visits (held by at least one):
  one row per visit, the features of the visit with category k removed (its codes, i.e. its
  column, zeroed), label "the visit holds k" (HALO-style phenotyping, Theodorou et al. 2023).

A task whose H labels have one class only is skipped (no AUROC on H); a training cohort whose
labels have one class only gets no model for that task (that side is skipped, the reason said;
e.g. a synthetic cohort that never produces the category).

Figures, on H, per task and per training cohort (``real``: trained on T; ``synthetic``: on S):
- ``auroc``: area under the ROC curve, ties counted half (= scikit-learn ``roc_auc_score``);
- ``auprc``: average precision, sum over the distinct score thresholds of (recall step) x
  precision (= scikit-learn ``average_precision_score``);
- ``auroc_ratio``, ``auprc_ratio``: synthetic / real;
- 95% confidence intervals (``*_ci``: the 2.5th and 97.5th percentiles) from ``n_bootstrap``
  resamples of the H *patients* with replacement (a patient's rows, visits or visit pairs, enter
  together, weighted by how often the patient is drawn); one resample set serves every task,
  both training cohorts and the ratios (paired), and the per-group means. A resample where a
  side has one class gives NaN and is left out of the percentiles. The intervals measure the
  test sample only: the training cohort and the fit are held fixed, so a model trained on noise
  can land away from 0.5 with an interval that excludes it.

Groups (``mortality``, ``next_admission``, ``phenotype``): ``<group>_auroc`` / ``_auprc`` is
the mean over the group's tasks where both sides have a figure (``<group>_tasks`` of them;
``<group>_skipped``: the group's tasks skipped, in whole or on a side), ``_real`` the same mean of
the real-trained figures, ``_ratio`` synthetic mean / real mean, ``_ci_low`` / ``_ci_high`` the
bootstrap percentiles of the mean (``_real_ci_low`` ...).

The chronic lists (``CHRONIC_ICD9``, ``CHRONIC_ICD10``) are chosen by hand, for this module:
3-character categories of conditions that last (HIV, diabetes, lipid disorders, chronic heart,
lung, liver and kidney disease, hypertension, arrhythmia, dementia and other chronic
neurological and mental disorders, substance dependence, chronic musculoskeletal conditions and
a few common cancers), in the spirit of the chronic phenotypes of the MIMIC-III benchmark
(Harutyunyan et al. 2019, whose phenotypes are CCS groups) and of HCUP's Chronic Condition
Indicator, but neither of them: one category per line below, with its condition. The ICD-10-CM
list names the categories of the same conditions.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from promptehr_hf.datasets_scripts import code_systems
from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM
from promptehr_hf.metrics.coherence import safe_category
from promptehr_hf.metrics.time_outcome import _is_none, _present, has_times, optional_column

TASKS = ("mortality", "next_admission", "phenotype")  # the task groups
AGE_BANDS = (1.0, 18.0, 40.0, 50.0, 60.0, 70.0, 80.0)  # band edges, years: 8 bands
C_DEFAULT = 1.0
SOLVER = "liblinear"
MAX_ITER = 1000

CHRONIC_ICD9 = {
    "042": "HIV disease",
    "162": "malignant neoplasm of trachea, bronchus and lung",
    "153": "malignant neoplasm of colon",
    "174": "malignant neoplasm of female breast",
    "185": "malignant neoplasm of prostate",
    "203": "multiple myeloma and immunoproliferative neoplasms",
    "204": "lymphoid leukemia",
    "205": "myeloid leukemia",
    "202": "other malignant neoplasms of lymphoid and histiocytic tissue (lymphoma)",
    "244": "acquired hypothyroidism",
    "250": "diabetes mellitus",
    "272": "disorders of lipoid metabolism",
    "274": "gout",
    "278": "overweight, obesity",
    "282": "hereditary hemolytic anemias (sickle cell, thalassemia)",
    "290": "dementias",
    "294": "persistent mental disorders due to conditions classified elsewhere (dementia)",
    "295": "schizophrenic disorders",
    "296": "episodic mood disorders (bipolar disorder, major depression)",
    "300": "anxiety, dissociative and somatoform disorders",
    "303": "alcohol dependence syndrome",
    "304": "drug dependence",
    "305": "nondependent abuse of drugs (tobacco use disorder 305.1)",
    "311": "depressive disorder, not elsewhere classified",
    "327": "organic sleep disorders (sleep apnea)",
    "331": "other cerebral degenerations (Alzheimer's disease)",
    "332": "Parkinson's disease",
    "340": "multiple sclerosis",
    "345": "epilepsy and recurrent seizures",
    "365": "glaucoma",
    "401": "essential hypertension",
    "403": "hypertensive chronic kidney disease",
    "404": "hypertensive heart and chronic kidney disease",
    "412": "old myocardial infarction",
    "414": "other forms of chronic ischemic heart disease",
    "416": "chronic pulmonary heart disease (pulmonary hypertension)",
    "424": "other diseases of endocardium (valve disease)",
    "425": "cardiomyopathy",
    "427": "cardiac dysrhythmias (atrial fibrillation)",
    "428": "heart failure",
    "440": "atherosclerosis",
    "491": "chronic bronchitis",
    "492": "emphysema",
    "493": "asthma",
    "496": "chronic airway obstruction, not elsewhere classified (COPD)",
    "530": "diseases of esophagus (reflux esophagitis 530.81)",
    "555": "regional enteritis (Crohn's disease)",
    "556": "ulcerative colitis",
    "571": "chronic liver disease and cirrhosis",
    "585": "chronic kidney disease",
    "600": "hyperplasia of prostate",
    "710": "diffuse diseases of connective tissue (lupus)",
    "714": "rheumatoid arthritis and other inflammatory polyarthropathies",
    "715": "osteoarthrosis and allied disorders",
    "733": "other disorders of bone and cartilage (osteoporosis)",
}
CHRONIC_ICD10 = {
    "B20": "HIV disease",
    "C34": "malignant neoplasm of bronchus and lung",
    "C18": "malignant neoplasm of colon",
    "C50": "malignant neoplasm of breast",
    "C61": "malignant neoplasm of prostate",
    "C90": "multiple myeloma and malignant plasma cell neoplasms",
    "C91": "lymphoid leukemia",
    "C92": "myeloid leukemia",
    "C83": "non-follicular lymphoma",
    "C85": "other and unspecified non-Hodgkin lymphoma",
    "E03": "other hypothyroidism",
    "E10": "type 1 diabetes mellitus",
    "E11": "type 2 diabetes mellitus",
    "E78": "disorders of lipoprotein metabolism",
    "M10": "gout",
    "M1A": "chronic gout",
    "E66": "overweight and obesity",
    "D57": "sickle-cell disorders",
    "F01": "vascular dementia",
    "F03": "unspecified dementia",
    "F20": "schizophrenia",
    "F31": "bipolar disorder",
    "F32": "depressive episode",
    "F33": "major depressive disorder, recurrent",
    "F41": "other anxiety disorders",
    "F10": "alcohol related disorders",
    "F11": "opioid related disorders",
    "F17": "nicotine dependence",
    "G47": "sleep disorders (sleep apnea)",
    "G30": "Alzheimer's disease",
    "G20": "Parkinson's disease",
    "G35": "multiple sclerosis",
    "G40": "epilepsy and recurrent seizures",
    "H40": "glaucoma",
    "I10": "essential (primary) hypertension",
    "I12": "hypertensive chronic kidney disease",
    "I13": "hypertensive heart and chronic kidney disease",
    "I25": "chronic ischemic heart disease (old myocardial infarction I25.2)",
    "I27": "other pulmonary heart diseases (pulmonary hypertension)",
    "I34": "nonrheumatic mitral valve disorders",
    "I35": "nonrheumatic aortic valve disorders",
    "I42": "cardiomyopathy",
    "I48": "atrial fibrillation and flutter",
    "I50": "heart failure",
    "I70": "atherosclerosis",
    "J42": "unspecified chronic bronchitis",
    "J43": "emphysema",
    "J45": "asthma",
    "J44": "other chronic obstructive pulmonary disease",
    "K21": "gastro-esophageal reflux disease",
    "K50": "Crohn's disease",
    "K51": "ulcerative colitis",
    "K70": "alcoholic liver disease",
    "K74": "fibrosis and cirrhosis of liver",
    "N18": "chronic kidney disease",
    "N40": "benign prostatic hyperplasia",
    "M32": "systemic lupus erythematosus",
    "M05": "rheumatoid arthritis with rheumatoid factor",
    "M06": "other rheumatoid arthritis",
    "M16": "osteoarthritis of hip",
    "M17": "osteoarthritis of knee",
    "M81": "osteoporosis without current pathological fracture",
}
CHRONIC = {"icd9cm": CHRONIC_ICD9, "icd10cm": CHRONIC_ICD10}


# ----------------------------------------------------------------------------- design matrices
def has_outcome(cohort: Any) -> bool:
    """Whether the cohort carries the in-hospital outcome: it has times (``has_times``) or some
    patient has a non-null ``hospital_death``."""
    return has_times(cohort) or _present(optional_column(cohort, "hospital_death"))


class _Design:
    """A cohort as the tasks read it: ``C`` csr 0/1 [n_visits, n_categories] (shared columns),
    ``F`` csr float [n_visits, n_features] (categories, age band, sex M), ``visit_patient``
    [n_visits], ``last`` (the last visit of each patient with a visit), ``death`` bool (of those
    patients) or None, ``prev`` (visits with a successor of the same patient; the successor is
    ``prev + 1``)."""

    def __init__(self, name: str, cohort: Any, code_system: str):
        self.name = name
        self.visits = inc.cohort_visits(cohort, code_system=code_system)
        self.X, self.vocab = inc.visit_matrix(self.visits, code_system=code_system)
        self.offsets = inc.visit_offsets(self.visits)
        try:
            self.age = np.asarray(inc.cohort_column(cohort, "age"), dtype=np.float64)
            sex = np.asarray(inc.cohort_column(cohort, "sex"), dtype=object)
        except (KeyError, TypeError):
            raise ValueError(f"the {name} cohort needs the columns visits, age and sex") from None
        self.male = sex == "M"
        bad = np.flatnonzero(~np.isin(sex, ("F", "M")) | ~(self.age >= 0))
        if bad.size:
            row = int(bad[0])
            raise ValueError(f"{name} cohort, patient row {row}: need age >= 0 and sex 'F' or 'M', "
                             f"got age={float(self.age[row])!r}, sex={sex[row]!r}")
        self.n_patients = len(self.visits)
        counts = np.diff(self.offsets)
        self.visit_patient = np.repeat(np.arange(self.n_patients), counts)
        with_visit = np.flatnonzero(counts > 0)
        self.last = self.offsets[1:][with_visit] - 1
        self.last_patient = with_visit
        self.death = None
        if has_outcome(cohort):
            dead = optional_column(cohort, "hospital_death") or [None] * self.n_patients
            died = np.fromiter((False if _is_none(d) else bool(d) for d in dead), dtype=bool, count=self.n_patients)
            self.death = died[with_visit]
        is_last = np.zeros(self.X.shape[0], dtype=bool)
        is_last[self.last] = True
        self.prev = np.flatnonzero(~is_last)

    def build(self, categories: dict[str, int], category_of: dict[str, str]) -> None:
        """``C`` and ``F`` over the shared category columns ``categories``."""
        n_cat = len(categories)
        cols = np.fromiter((categories[category_of[c]] for c in self.vocab), dtype=np.int64, count=len(self.vocab))
        M = sp.csr_matrix((np.ones(len(self.vocab), np.int32), (np.arange(len(self.vocab)), cols)),
                          shape=(len(self.vocab), n_cat))
        self.C = inc.collapse(self.X, M)
        V = self.C.shape[0]
        band = np.digitize(self.age, AGE_BANDS)[self.visit_patient]
        male = self.male[self.visit_patient]
        rows = np.concatenate([np.arange(V), np.flatnonzero(male)])
        cols = np.concatenate([band, np.full(int(male.sum()), len(AGE_BANDS) + 1)])
        D = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(V, len(AGE_BANDS) + 2))
        self.F = sp.hstack([sp.csr_matrix(self.C, dtype=np.float64), D], format="csr")


def _shared_categories(designs: list[_Design], code_system: str) -> tuple[list[str], dict[str, int], dict[str, str]]:
    codes = sorted(set().union(*(d.vocab for d in designs)))
    category_of = {c: safe_category(c, code_system) for c in codes}
    categories = sorted(set(category_of.values()))
    index = {k: i for i, k in enumerate(categories)}
    for d in designs:
        d.build(index, category_of)
    return categories, index, category_of


# ----------------------------------------------------------------------------- AUROC / AUPRC
def weighted_auc(score: np.ndarray, y: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC (ties half) and average precision of ``score`` for labels ``y`` (bool [n]) under
    each row of row weights ``W`` [B, n] (counts of a bootstrap resample; ones = the plain
    figure): ``(auroc [B], auprc [B])``, NaN where a row weighs no positive or no negative.
    One sort of the scores serves every row: the weights are summed per distinct score."""
    n = len(score)
    levels, inv = np.unique(-np.asarray(score, dtype=np.float64), return_inverse=True)  # descending scores
    S = sp.csr_matrix((np.ones(n), (np.arange(n), inv.ravel())), shape=(n, len(levels)))
    y = np.asarray(y, dtype=bool)
    pos = np.asarray((S[y].T @ W[:, y].T).T)  # [B, U]: positive weight at each score level
    neg = np.asarray((S[~y].T @ W[:, ~y].T).T)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    P, N = tp[:, -1], fp[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc = (pos * (N[:, None] - fp + 0.5 * neg)).sum(axis=1) / (P * N)
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        auprc = (pos * precision).sum(axis=1) / P
    bad = (P <= 0) | (N <= 0)
    auroc[bad] = np.nan
    auprc[bad] = np.nan
    return auroc, auprc


def _ci(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if not values.size:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


# ----------------------------------------------------------------------------- tasks
class _Task:
    """One binary task: its name, group, target category (None for mortality), the target's
    title, and the feature column removed from every row (phenotype: the target's) or None.
    ``_rows`` gives its rows and labels in a cohort."""

    def __init__(self, name: str, group: str, target: str | None, title: str | None, drop: int | None):
        self.name, self.group, self.target, self.title, self.drop = name, group, target, title, drop


def _rows(task: _Task, d: _Design, k: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(feature rows, labels, test patient of each row), or the reason the cohort has none."""
    if task.group == "mortality":
        if d.death is None:
            return f"the {d.name} cohort carries no in-hospital outcome (no times, no hospital_death)"
        return d.last, d.death, d.last_patient
    if task.group == "next_admission":
        y = (d.C[d.prev + 1][:, k].toarray().ravel() > 0) if d.prev.size else np.zeros(0, bool)
        return d.prev, y, d.visit_patient[d.prev]
    rows = np.arange(d.C.shape[0])
    return rows, d.C[:, k].toarray().ravel() > 0, d.visit_patient


def _features(d: _Design, rows: np.ndarray, drop: int | None) -> sp.csr_matrix:
    F = d.F[rows]
    if drop is not None:
        keep = np.ones(F.shape[1])
        keep[drop] = 0.0
        F = sp.csr_matrix(F @ sp.diags(keep))
        F.eliminate_zeros()
    return F


def _fit_scores(F_train, y_train, F_test, C: float) -> tuple[np.ndarray, bool]:
    model = LogisticRegression(C=C, solver=SOLVER, max_iter=MAX_ITER)  # the default penalty: L2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(F_train, y_train)
    converged = bool(np.all(np.asarray(model.n_iter_) < MAX_ITER))
    return model.decision_function(F_test), converged


def _class_reason(y: np.ndarray, what: str) -> str | None:
    if not len(y):
        return f"{what}: no rows"
    if y.all() or not y.any():
        return f"{what}: one class only (all {int(bool(y[0]))})"
    return None


def _one_value(x: np.ndarray) -> float:
    return float(x[0]) if np.isfinite(x[0]) else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if np.isfinite(a) and np.isfinite(b) and b != 0 else float("nan")


# ----------------------------------------------------------------------------- the metric
def utility_rows(synthetic: dict[str, Any], real_train: Any, real_test: Any, *,
                 code_system: str = DEFAULT_CODE_SYSTEM, tasks: tuple[str, ...] = TASKS, n_bootstrap: int = 200,
                 seed: int = 0, n_next: int = 20, n_phenotype: int = 25, C: float = C_DEFAULT) -> dict[str, dict]:
    """``utility`` for several synthetic cohorts at once (``{name: cohort}``), the real-trained
    models fitted once: ``{name: utility result}`` (their ``real`` figures are the same)."""
    t0 = time.perf_counter()
    icd = code_systems.code_system(code_system)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task group(s) {sorted(unknown)}; expected some of {TASKS}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if "real" in synthetic:
        raise ValueError("a synthetic cohort may not be named 'real' (the real-trained side)")
    train = _Design("real_train", real_train, code_system)
    test = _Design("real_test", real_test, code_system)
    syn = {name: _Design(name, cohort, code_system) for name, cohort in synthetic.items()}
    for d in (train, test, *syn.values()):
        if not d.n_patients:
            raise ValueError(f"the {d.name} cohort has no patients")
    categories, index, _ = _shared_categories([train, test, *syn.values()], code_system)

    # Targets, from the real training visits (ties: smaller category string first).
    held = np.asarray(train.C.sum(axis=0)).ravel()
    order = np.argsort(-held, kind="stable")
    defined: list[_Task] = []
    if "mortality" in tasks:
        defined.append(_Task("mortality", "mortality", None, "in-hospital death at the last admission", None))
    if "next_admission" in tasks:
        following = np.asarray(train.C[train.prev + 1].sum(axis=0)).ravel()
        after = np.argsort(-following, kind="stable")
        for k in after[following[after] > 0][:n_next]:
            defined.append(_Task(f"next_admission_{categories[k]}", "next_admission", categories[k],
                                 _title(icd, categories[k]), None))
    if "phenotype" in tasks:
        chronic = CHRONIC.get(code_system, {})
        ks = [k for k in order if held[k] > 0 and categories[k] in chronic][:n_phenotype]
        for k in ks:
            defined.append(_Task(f"phenotype_{categories[k]}", "phenotype", categories[k],
                                 chronic[categories[k]], int(k)))

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, test.n_patients, size=(n_bootstrap, test.n_patients))
    W_patient = np.ones((n_bootstrap + 1, test.n_patients))  # row 0: the plain figure
    W_patient[1:] = np.bincount((draws + test.n_patients * np.arange(n_bootstrap)[:, None]).ravel(),
                                minlength=n_bootstrap * test.n_patients).reshape(n_bootstrap, test.n_patients)
    del draws
    weights: dict[str, np.ndarray] = {}  # per group: [B + 1, rows] (the rows of a group are shared)

    results = {name: {"tasks": {}, "skipped": {}} for name in syn}
    curves = {name: {} for name in syn}  # task -> (auroc [B+1], auprc [B+1]) per side
    n_fits, not_converged = 0, 0
    for task in defined:
        k = index.get(task.target) if task.target is not None else None
        got = _rows(task, test, k)
        entry: dict[str, Any] = {"group": task.group, "target": task.target, "title": task.title}
        if isinstance(got, str):
            reason = got
        else:
            rows_test, y_test, patient_test = got
            reason = _class_reason(y_test, "real_test labels")
        if reason is not None:
            for name in syn:
                results[name]["tasks"][task.name] = {**entry, "status": "skipped", "reason": reason}
                results[name]["skipped"][task.name] = reason
            continue
        if task.group not in weights:
            weights[task.group] = W_patient[:, patient_test]
        W = weights[task.group]
        F_test = _features(test, rows_test, task.drop)
        entry |= {"n_test": int(len(y_test)), "test_positive_rate": float(y_test.mean())}
        sides: dict[str, Any] = {}
        for side, d in (("real", train), *syn.items()):
            got = _rows(task, d, k)
            reason = got if isinstance(got, str) else _class_reason(got[1], f"{d.name} labels")
            if reason is not None:
                sides[side] = {"skipped": reason, "n_train": 0 if isinstance(got, str) else int(len(got[1]))}
                continue
            rows, y, _ = got
            scores, ok = _fit_scores(_features(d, rows, task.drop), y, F_test, C)
            n_fits += 1
            not_converged += not ok
            auroc, auprc = weighted_auc(scores, y_test, W)
            sides[side] = {"n_train": int(len(y)), "train_positive_rate": float(y.mean()),
                           "auroc": _one_value(auroc), "auroc_ci": _ci(auroc[1:]),
                           "auprc": _one_value(auprc), "auprc_ci": _ci(auprc[1:]), "_curves": (auroc, auprc)}
        for name in syn:
            real, mine = sides["real"], sides[name]
            out = {**entry, "status": "ok", "reason": None,
                   "real": {k_: v for k_, v in real.items() if k_ != "_curves"},
                   "synthetic": {k_: v for k_, v in mine.items() if k_ != "_curves"}}
            skipped = [f"{s}: {sides[s]['skipped']}" for s in ("real", name) if "skipped" in sides[s]]
            if skipped:
                out["status"], out["reason"] = "skipped", "; ".join(skipped)
                results[name]["skipped"][task.name] = out["reason"]
            else:
                for metric, i in (("auroc", 0), ("auprc", 1)):
                    a, b = mine["_curves"][i], real["_curves"][i]
                    with np.errstate(divide="ignore", invalid="ignore"):
                        out[f"{metric}_ratio"] = _ratio(float(a[0]), float(b[0]))
                        out[f"{metric}_ratio_ci"] = _ci(a[1:] / b[1:])
                curves[name][task.name] = (task.group, mine["_curves"], real["_curves"])
            results[name]["tasks"][task.name] = out

    meta = {"code_system": code_system, "model": f"LogisticRegression(L2, C={C}, solver='{SOLVER}', "
            f"max_iter={MAX_ITER})", "features": f"{len(categories)} categories (multi-hot), "
            f"{len(AGE_BANDS) + 1} age bands (years at first admission), sex M",
            "n_bootstrap": n_bootstrap, "seed": seed, "bootstrap": "test patients resampled with replacement",
            "n_real_train": train.n_patients, "n_real_test": test.n_patients,
            "fits": n_fits, "fits_not_converged": not_converged}
    for name, d in syn.items():
        res = results[name]
        res |= _summary(res["tasks"], curves[name], tasks)
        res["meta"] = {**meta, "n_synthetic": d.n_patients, "seconds": round(time.perf_counter() - t0, 2)}
    return results


def _title(icd, category: str) -> str | None:
    try:
        return icd.title(category)
    except (KeyError, ValueError):
        return None


def _summary(entries: dict[str, dict], curves: dict[str, tuple], groups: tuple[str, ...]) -> dict[str, Any]:
    """The per-group flat figures (module docstring)."""
    out: dict[str, Any] = {}
    for group in groups:
        members = [c for c in curves.values() if c[0] == group]
        out[f"{group}_tasks"] = len(members)
        out[f"{group}_skipped"] = sum(1 for e in entries.values() if e["group"] == group and e["reason"] is not None)
        for i, metric in enumerate(("auroc", "auprc")):
            if members:
                mine = np.mean([c[1][i] for c in members], axis=0)  # [B + 1], mean over the tasks
                real = np.mean([c[2][i] for c in members], axis=0)
            else:
                mine = real = np.full(1, np.nan)
            out[f"{group}_{metric}"], out[f"{group}_{metric}_real"] = _one_value(mine), _one_value(real)
            out[f"{group}_{metric}_ratio"] = _ratio(out[f"{group}_{metric}"], out[f"{group}_{metric}_real"])
            (out[f"{group}_{metric}_ci_low"], out[f"{group}_{metric}_ci_high"]) = _ci(mine[1:])
            (out[f"{group}_{metric}_real_ci_low"], out[f"{group}_{metric}_real_ci_high"]) = _ci(real[1:])
    return out


def utility(synthetic: Any, real_train: Any, real_test: Any, *, code_system: str = DEFAULT_CODE_SYSTEM,
            tasks: tuple[str, ...] = TASKS, n_bootstrap: int = 200, seed: int = 0, n_next: int = 20,
            n_phenotype: int = 25, C: float = C_DEFAULT) -> dict[str, Any]:
    """Train on synthetic, test on real (module docstring).

    Args:
        synthetic, real_train, real_test: cohorts (patient dicts, a ``datasets.Dataset`` or a
            dict of columns with ``visits``, ``age``, ``sex`` and, for the mortality task,
            ``hospital_death``).
        code_system: ``"icd9cm"`` or ``"icd10cm"``: normalisation, categories, chronic list.
        tasks: the task groups to run, some of ``TASKS``.
        n_bootstrap: resamples of the test patients for the confidence intervals (0: none, NaN CIs).
        seed: the resampling seed.
        n_next, n_phenotype: how many next-admission and phenotype targets.
        C: the inverse L2 strength of every model.
    Returns:
        ``{<group>_auroc, _auprc, ..._real, ..._ratio, ..._ci_low, ..._ci_high, <group>_tasks,
        <group>_skipped (per group), "tasks": {task: {...}}, "skipped": {task: reason}, "meta"}``.
    """
    return utility_rows({"synthetic": synthetic}, real_train, real_test, code_system=code_system, tasks=tasks,
                        n_bootstrap=n_bootstrap, seed=seed, n_next=n_next, n_phenotype=n_phenotype,
                        C=C)["synthetic"]


def flat_figures(result: dict[str, Any], side: str = "synthetic") -> dict[str, float]:
    """The per-group figures of a ``utility`` result as a report row: ``utility_<key>`` for
    ``side`` "synthetic" (the synthetic-trained figures and ratios) or "real" (the real-trained
    ones, under the same keys, without ratios)."""
    out = {}
    for key, value in result.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if side == "real":
            if "_real" in key:
                out["utility_" + key.replace("_real", "")] = value
            elif key.endswith(("_tasks", "_skipped")):
                out["utility_" + key] = value
        elif "_real" not in key:
            out["utility_" + key] = value
    return out


__all__ = ["AGE_BANDS", "CHRONIC", "CHRONIC_ICD10", "CHRONIC_ICD9", "TASKS", "flat_figures", "has_outcome",
           "utility", "utility_rows", "weighted_auc"]
