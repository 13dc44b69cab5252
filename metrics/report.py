"""`promptehr evaluate`: score a synthetic cohort against real data; write metrics, a table, plots.

    promptehr evaluate --real PATH --synthetic PATH [--train PATH] --out DIR

PATH is any of: a Parquet file of patients (the package schema); a prepared folder
(`promptehr prepare`: ``{train,validation,test}.parquet``; ``--real`` reads its ``test`` split,
``--train`` its ``train`` split, change with ``--real-split`` / ``--train-split``); a folder
holding ``synthetic.parquet`` or exactly one Parquet file (``promptehr generate`` output); or a
MIMIC-III CSV folder (``DIAGNOSES_ICD.csv[.gz]`` ...; read with ``read_mimic3``) or MIMIC-IV one
(``hosp/diagnoses_icd.csv.gz`` ...; read with ``read_mimic4``, as ``promptehr prepare`` tells them
apart: ``cohort.folder_format``).

The cohorts are in one code system, ICD-9-CM (``icd9cm``) or ICD-10-CM (``icd10cm``), which sets
how codes are normalised, their categories, their validity and the CMS age/sex edits they are
checked against. ``--code-system`` names it; by default it is the one the inputs record (the
``code_system`` of a prepared folder's ``summary.json`` or of a ``promptehr generate`` folder's
``generation_stats.json``, ICD-10-CM for a MIMIC-IV folder; inputs recording different systems
are refused), else ICD-9-CM.

With ``--train``, every row is scored against the training
split, the data the generator learned from:
- ``synthetic``: the synthetic cohort (coherence, and privacy with ``--real`` as the held-out
  control);
- ``floor``: the held-out real cohort (``--real``, a random sample of the synthetic cohort's size
  when it is larger): real data of the same population, which no generator can beat;
- ``baseline``: ``IndependentMarginalSampler`` fitted on ``--train`` and sampled at the synthetic
  cohort's size: code frequencies right by construction, no co-occurrence structure.
Without ``--train`` the reference is ``--real``, with no floor and no privacy rows, and the
baseline is fitted on ``--real`` (in-sample, which flatters it).

Writes (as a whole: a temporary folder beside DIR, swapped in at the end; DIR must not be, lie
inside or contain an input, and an existing DIR is replaced only if it is empty or holds nothing
but an earlier report, listed by its ``.promptehr-manifest.json``) DIR/metrics.json
(``{"rows": {row: {metric: value}}, "meta": {...}}``, NaN as null), DIR/metrics.md (the table)
and the PNGs ``code_prevalence.png``, ``visits_per_patient.png``, ``codes_per_visit.png``,
``top_categories.png``, ``cooccurrence_heatmap.png``.

Times and outcomes: when the reference cohort has times (the optional fields ``stay_days``,
``gap_days``, ``hospital_death``, ``death_days``; ``time_outcome.has_times``), the cohorts carry
them (``read_cohort`` reads them from Parquet files and MIMIC folders), the baseline draws them
from their marginals, every row whose cohort has them gains the figures of
``metrics.time_outcome`` (scored against the same reference), the meta gains ``time_outcome``,
metrics.md a section "Time and outcome", and the plots ``gap_days.png``, ``stay_days.png`` and
``mortality_by_category.png``. Without times in the reference, all of it is exactly as without
the fields.
Procedures and medications: when the synthetic and the reference cohort both carry one of them
(the optional per-visit ``procedures`` / ``medications`` lists of the schema; ``read_cohort``
reads them from Parquet files and MIMIC folders), every row gains that modality's figures and its
within-visit pair R² with the diagnoses (``coherence``: ``<modality>_*``,
``r2_pair_diagnosis_procedure``, ``r2_pair_diagnosis_medication``; a modality only one of them
carries is dropped from every cohort before scoring); the baseline draws each modality
independently of the diagnoses, so its cross-modality R² is that of no association; the meta
gains ``modalities``, metrics.md the sections "Per modality" (the diagnoses beside each
modality) and "Across modalities", and the plots ``modality_pairs.png``. Privacy and utility
read the diagnoses only. When the synthetic cohort carries neither (a diagnosis-only
generator), the report is exactly the diagnosis-only one, whatever the real cohorts carry.
Codes may be dotted or dotless: every figure reads them normalised (``normalize`` of the code
system). Codes outside the system's tables (ICD-9-CM v32, ICD-10-CM FY2021) are scored as given,
with a warning per cohort that counts them and names the most listed. A cohort with no patient
is refused (exit code 2; ValueError in Python): there is nothing to score.
Python: ``evaluate_cohorts(synthetic, real, train=None, out_dir=None, code_system="icd9cm", ...)``.

Utility (train on synthetic, test on real; ``metrics.utility``): with ``--train`` (and unless
``--no-utility``; Python: ``utility=False``), the same logistic regressions are fitted on the
training split (the floor row's figures: "real-trained"), on the synthetic cohort (the synthetic
row) and on the baseline's sample (the baseline row), and tested on the held-out real cohort
(``--real``, all of it, not the floor's sample): in-hospital mortality (when the cohorts carry
``hospital_death``), next-admission categories and chronic phenotypes; AUROC and AUPRC per task
group with 95% bootstrap intervals over the test patients, and the synthetic / real ratios. The
rows gain ``utility_*``, metrics.json a top-level ``"utility"`` (per row: every task's figures,
the skipped tasks with their reasons, the settings), metrics.md a section "Utility (train on
synthetic, test on real)" and the plot ``utility.png`` (per-task AUROC, real-trained vs
synthetic- and baseline-trained; group means with their intervals). Without them, the report is
exactly as before.

Perplexity (``metrics.perplexity``): with ``--model DIR`` (a trained checkpoint), the model's
longitudinal and marginal perplexities (``lpl``, ``mpl``, as PromptEHR defines them) on a random
sample of ``--perplexity-patients`` (default 100) held-out real patients (``--real``); a model
conditioned on visit types needs the checkpoint's ``cohort_prior.json``. metrics.json gains a
top-level ``"perplexity"``, the meta a line naming the model, metrics.md a section "Perplexity".
Python: ``evaluate_cohorts(..., perplexity=metrics.perplexity.perplexity(model, tokenizer, real,
prior))``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from promptehr_hf.datasets_scripts import code_systems
from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.datasets_scripts.code_systems import CODE_SYSTEMS, DEFAULT_CODE_SYSTEM, LABELS
from promptehr_hf.datasets_scripts.cohort import folder_format
from promptehr_hf.datasets_scripts.mimic3 import Mimic3Error, find_tables, read_mimic3
from promptehr_hf.datasets_scripts.mimic4 import read_mimic4
from promptehr_hf.datasets_scripts.schema import MODALITY_FIELDS
from promptehr_hf.file_utils import check_output, replace_folder, write_json_atomic, write_text_atomic
from promptehr_hf.metrics.baselines import IndependentMarginalSampler
from promptehr_hf.metrics.coherence import coherence, modality_visits, unknown_codes
from promptehr_hf.metrics.perplexity import DEFAULT_PATIENTS, perplexity
from promptehr_hf.metrics.plots import write_plots
from promptehr_hf.metrics.privacy import privacy
from promptehr_hf.metrics.time_outcome import TIME_FIELDS, VIOLATIONS, has_times, optional_column, time_outcome
from promptehr_hf.metrics.utility import flat_figures, utility_rows
from promptehr_hf.modeling_promptehr.generation.command import load_model
from promptehr_hf.modeling_promptehr.generation.prior import PRIOR_FILE, CohortPrior

COLUMNS = ("visits", "age", "sex")
ROWS = ("synthetic", "floor", "baseline")
PLOTS = ("code_prevalence.png", "visits_per_patient.png", "codes_per_visit.png", "top_categories.png",
         "cooccurrence_heatmap.png")
TIME_PLOTS = ("gap_days.png", "stay_days.png", "mortality_by_category.png")  # when the reference has times
UTILITY_PLOTS = ("utility.png",)  # when the utility figures are computed (train given)
MODALITY_PLOTS = ("modality_pairs.png",)  # when procedures or medications are scored
# (key, label, better): better is "low", "high", "0.5", "0", "real" (close to the real value) or "".
TABLE = {
    "Fidelity": [
        ("code_js", "code JS divergence", "low"), ("category_js", "category JS divergence", "low"),
        ("top_k_overlap", "top-k code overlap", "high"), ("top_k_jaccard", "top-k Jaccard", "high"),
        ("r2_code_prevalence", "R² code prevalence per visit", "high"),
        ("r2_pair_prevalence", "R² within-visit pair prevalence", "high"),
        ("r2_consecutive_prevalence", "R² consecutive-visit pair prevalence", "high"),
        ("cooccurrence_score", "co-occurrence score (mean real count of pairs)", "high"),
        ("cooccurrence_seen_share", "share of pairs seen in real visits", "high"),
    ],
    "Validity": [
        ("cms_invalid_code_rate", "CMS age/sex conflicts, share of codes", "low"),
        ("cms_invalid_patient_rate", "CMS age/sex conflicts, share of patients", "real"),
        ("unknown_code_rate", "codes outside {system}", "low"),  # {system}: LABELS of the report's system
        ("duplicate_rate", "duplicate codes within a visit", "low"),
    ],
    "Diversity": [
        ("distinct_codes", "distinct codes", "real"), ("code_coverage", "coverage of real codes", "high"),
        ("code_coverage_frequent", "coverage of frequent real codes", "high"),
        ("top_code", "most common code", ""), ("top_code_share", "share of patients with it", "real"),
        ("distinct_patient_share", "distinct patients", "high"),
    ],
    "Structure": [
        ("visits_per_patient_mean", "visits per patient, mean", "real"),
        ("visits_per_patient_wasserstein", "visits per patient, Wasserstein", "low"),
        ("visits_per_patient_tv", "visits per patient, total variation", "low"),
        ("codes_per_visit_mean", "codes per visit, mean", "real"),
        ("codes_per_visit_wasserstein", "codes per visit, Wasserstein", "low"),
        ("codes_per_visit_tv", "codes per visit, total variation", "low"),
        ("age_wasserstein", "age, Wasserstein (years)", "low"), ("female_share", "female share", "real"),
    ],
    "Privacy": [
        ("exact_copy_rate", "exact copies of training patients", "real"),
        ("membership_inference_accuracy", "membership inference accuracy", "0.5"),
        ("membership_inference_auc", "membership inference AUC", "0.5"),
        ("nnaar", "NNAAR (AA holdout - AA train)", "0"),
        ("attribute_inference_f1", "attribute inference F1 (members)", "real"),
        ("attribute_inference_risk", "attribute inference F1, members - non-members", "0"),
        ("sex_inference_f1", "sex inference F1 (members)", "real"),
    ],
}
VIOLATION_LABELS = {  # metrics.time_outcome's VIOLATIONS, for the table
    "times_missing": "stay/gap lists missing (patients)",
    "length_mismatch": "stay/gap list length ≠ visits (patients)",
    "nonfinite_time": "NaN or infinite stay or gap (visits)",
    "negative_stay": "negative stay (visits)", "negative_gap": "negative gap (visits)",
    "first_gap_nonzero": "first gap not 0 (patients)",
    "death_and_death_days": "in-hospital death with death_days set (patients)",
    "bad_death_days": "death_days negative or infinite (patients)",
    "death_without_visit": "in-hospital death without a visit (patients)",
    "age_over_cap": "age at first admission over 90 (patients)",
    "age_implausible": "age at admission 125 or more (visits)",
}
# The section metrics.md adds when some row has these figures (metrics.time_outcome).
TIME_TABLE = {
    "Time and outcome": [
        ("gap_days_mean", "gap between visits, mean (days)", "real"),
        ("gap_days_median", "gap between visits, median (days)", "real"),
        ("gap_days_wasserstein", "gap, Wasserstein (days)", "low"), ("gap_days_ks", "gap, KS statistic", "low"),
        ("stay_days_mean", "length of stay, mean (days)", "real"),
        ("stay_days_wasserstein", "length of stay, Wasserstein (days)", "low"),
        ("stay_days_ks", "length of stay, KS statistic", "low"),
        ("admission_age_wasserstein", "age at admission, Wasserstein (years)", "low"),
        ("admission_age_ks", "age at admission, KS statistic", "low"),
        ("readmission_30d_rate", "30-day readmission rate", "real"),
        ("hospital_mortality_patient_rate", "in-hospital mortality, per patient", "real"),
        ("hospital_mortality_admission_rate", "in-hospital mortality, per admission", "real"),
        ("mortality_by_category_r2", "R² in-hospital mortality by category", "high"),
        ("mortality_by_category_n", "categories compared", ""),
        ("out_of_hospital_death_rate", "death after discharge, share of patients", "real"),
        ("death_days_wasserstein", "days to death after discharge, Wasserstein", "low"),
        ("time_violation_patient_rate", "time/outcome violations, share of patients", "low"),
        *((f"violations_{name}", f"violations: {VIOLATION_LABELS[name]}", "low") for name in VIOLATIONS),
    ],
}
# The section "Per modality" metrics.md adds when the synthetic row has procedure or medication
# figures: each figure for the diagnoses (its plain key) and each modality scored (<modality>_<key>).
MODALITY_TABLE = [
    ("code_js", "code JS divergence", "low"), ("category_js", "category JS divergence", "low"),
    ("top_k_overlap", "top-k code overlap", "high"),
    ("r2_code_prevalence", "R² code prevalence per visit", "high"),
    ("r2_pair_prevalence", "R² within-visit pair prevalence", "high"),
    ("unknown_code_rate", "invalid codes, share of codes", "low"),
    ("cms_invalid_code_rate", "CMS edit conflicts, share of codes", "low"),
    ("cms_invalid_patient_rate", "CMS edit conflicts, share of patients", "real"),
    ("duplicate_rate", "duplicate codes within a visit", "low"),
    ("distinct_codes", "distinct codes", "real"),
    ("codes_per_visit_mean", "codes per visit, mean", "real"),
    ("codes_per_visit_tv", "codes per visit, total variation", "low"),
]
CROSS_TABLE = [("r2_pair_diagnosis_procedure", "R² pair prevalence, diagnosis category × procedure category"),
               ("r2_pair_diagnosis_medication", "R² pair prevalence, diagnosis category × drug name")]
# Real-cohort values shown in the "real" column (coherence returns them as <key>_real).
REAL_KEYS = {"cms_invalid_patient_rate": "cms_invalid_patient_rate_real", "distinct_codes": "distinct_codes_real",
             "top_code_share": "top_code_share_real", "visits_per_patient_mean": "visits_per_patient_mean_real",
             "codes_per_visit_mean": "codes_per_visit_mean_real", "female_share": "female_share_real",
             "exact_copy_rate": "holdout_exact_copy_rate",
             "attribute_inference_f1": "attribute_inference_f1_holdout", "sex_inference_f1": "sex_inference_f1_holdout"}
# The section metrics.md adds when some row has the utility figures (metrics.utility); the floor
# column holds the real-trained figures. Cells show the 95% bootstrap interval where the row has it.
UTILITY_TABLE = {
    "Utility (train on synthetic, test on real)": [
        ("utility_mortality_auroc", "in-hospital mortality, AUROC", "floor"),
        ("utility_mortality_auprc", "in-hospital mortality, AUPRC", "floor"),
        ("utility_mortality_auroc_ratio", "in-hospital mortality, AUROC / real-trained", "1"),
        ("utility_next_admission_auroc", "next-admission categories, mean AUROC", "floor"),
        ("utility_next_admission_auprc", "next-admission categories, mean AUPRC", "floor"),
        ("utility_next_admission_auroc_ratio", "next-admission categories, AUROC / real-trained", "1"),
        ("utility_next_admission_tasks", "next-admission categories compared", ""),
        ("utility_phenotype_auroc", "chronic phenotypes, mean AUROC", "floor"),
        ("utility_phenotype_auprc", "chronic phenotypes, mean AUPRC", "floor"),
        ("utility_phenotype_auroc_ratio", "chronic phenotypes, AUROC / real-trained", "1"),
        ("utility_phenotype_tasks", "chronic phenotypes compared", ""),
    ],
}
REAL_KEYS |= {key: f"{key}_real" for key in (
    "gap_days_mean", "gap_days_median", "stay_days_mean", "readmission_30d_rate", "hospital_mortality_patient_rate",
    "hospital_mortality_admission_rate", "out_of_hospital_death_rate", "time_violation_patient_rate")}


# ----------------------------------------------------------------------------- reading cohorts
def as_columns(cohort: Any, times: bool = False, modalities: bool = False) -> dict[str, list]:
    """Any cohort form -> {"visits", "age", "sex"} lists; with ``times``, also the time fields
    (``TIME_FIELDS``) the cohort has, when it has times (``time_outcome.has_times``); with
    ``modalities``, also each of ``procedures`` / ``medications`` the cohort carries
    (``coherence.modality_visits``: a null patient there has an empty list per visit)."""
    try:
        columns = {name: inc.cohort_column(cohort, name) for name in COLUMNS}
    except KeyError as err:
        raise ValueError(f"a cohort needs the columns {COLUMNS}: {err}") from None
    if times and has_times(cohort):
        for name in TIME_FIELDS:
            values = optional_column(cohort, name)
            columns[name] = values if values is not None else [None] * len(columns["visits"])
    for name in MODALITY_FIELDS if modalities else ():
        values = modality_visits(cohort, name)
        if values is not None:
            columns[name] = values
    return columns


def _take(columns: dict[str, list], rows: np.ndarray) -> dict[str, list]:
    return {name: [values[i] for i in rows] for name, values in columns.items()}


def _is_mimic_folder(folder: Path) -> bool:
    try:
        find_tables(folder)
    except Mimic3Error:
        return False
    return True


def read_cohort(path: str | os.PathLike, split: str | None = None) -> dict[str, list]:
    """Columns {"visits", "age", "sex"} of the cohort at ``path`` (forms: module docstring), its
    time fields when it has times and its procedures / medications when it carries them
    (``as_columns(..., times=True, modalities=True)``)."""
    p = Path(path)
    if p.is_dir():
        parquet = sorted(p.glob("*.parquet"))
        if split and (p / f"{split}.parquet").exists():
            p = p / f"{split}.parquet"
        elif len(parquet) == 1:
            p = parquet[0]
        elif _is_mimic_folder(p):
            reader = read_mimic4 if folder_format(p) == "mimic4" else read_mimic3
            return as_columns(reader(p)[0], times=True, modalities=True)
        else:
            raise FileNotFoundError(
                f"{path}: expected a Parquet file, a prepared folder with {split or '<split>'}.parquet, a folder with "
                f"one Parquet file, or a MIMIC-III or MIMIC-IV CSV folder; found "
                f"{[f.name for f in parquet] or 'no Parquet file'}")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    schema_names = pq.read_schema(p).names
    missing = [c for c in COLUMNS if c not in schema_names]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing} (patient schema: subject_id, age, sex, visits)")
    present = [c for c in (*TIME_FIELDS, *MODALITY_FIELDS) if c in schema_names]
    return as_columns(pq.read_table(p, columns=[*COLUMNS, *present]).to_pydict(), times=True, modalities=True)


def recorded_code_system(path: str | os.PathLike) -> str | None:
    """The code system the cohort at ``path`` records: ``code_system`` of the ``summary.json``
    (``promptehr prepare``) or ``generation_stats.json`` (``promptehr generate``) in the folder (of
    a file: in its folder), else that of a MIMIC folder's format (MIMIC-IV: ``"icd10cm"``,
    MIMIC-III: ``"icd9cm"``); None when there is none of them."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    for name in ("summary.json", "generation_stats.json"):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8")).get("code_system")
        except (OSError, ValueError, AttributeError):  # missing, unreadable or not a JSON object
            continue
        if value is not None:
            return value
    if p.is_dir() and _is_mimic_folder(p):
        return "icd10cm" if folder_format(p) == "mimic4" else "icd9cm"
    return None


def warn_unknown_codes(name: str, cohort: Any, code_system: str = DEFAULT_CODE_SYSTEM) -> dict[str, Any]:
    """Warn (UserWarning) when ``cohort`` lists codes outside the tables of ``code_system``: how
    many listed codes, how many distinct, the most listed ones. Returns ``coherence.unknown_codes``."""
    found = unknown_codes(cohort, code_system=code_system)
    if found["n_unknown"]:
        warnings.warn(
            f"{name} cohort: {found['n_unknown']:,} of {found['n_listed']:,} listed codes "
            f"({found['n_distinct_unknown']:,} distinct) are not {LABELS[code_system]} diagnosis codes, e.g. "
            f"{', '.join(map(repr, found['examples']))}; they are scored as given (compared as strings, "
            "counted by unknown_code_rate)", UserWarning, stacklevel=3)
    return found


# ----------------------------------------------------------------------------- scoring
def evaluate_cohorts(synthetic: Any, real: Any, train: Any = None, *, out_dir: str | os.PathLike | None = None,
                     baseline: bool = True, plots: bool = True, seed: int = 0, top_k: int = 100,
                     n_attack: int = 2000, code_system: str = DEFAULT_CODE_SYSTEM, utility: bool = True,
                     perplexity: dict | None = None) -> dict:
    """Score ``synthetic`` (and the floor and baseline rows, see the module docstring) against
    ``real``. Cohorts: patient dicts, a ``datasets.Dataset`` or dicts of columns, all in
    ``code_system`` (``"icd9cm"`` or ``"icd10cm"``; a trained model's is its tokenizer's
    ``code_system``, a prepared cohort's the ``code_system`` of its summary).

    ``utility``: with ``train``, also the train-on-synthetic, test-on-real figures (module
    docstring; ``metrics.utility``).

    ``perplexity``: a result of ``metrics.perplexity.perplexity`` (a model on held-out real
    patients), reported as given.

    Returns ``{"rows": {"synthetic": {...}, "floor": {...} | None, "baseline": {...} | None},
    "meta": {...}}`` (and ``"utility"``: per row, the full ``metrics.utility`` result, when
    computed; and ``"perplexity"`` when given); with ``out_dir``, also writes metrics.json,
    metrics.md and the PNGs there.
    """
    code_systems.code_system(code_system)  # an unknown name fails before the work
    if out_dir is not None:
        check_output(Path(out_dir).resolve(), "evaluate")  # fail before the work, not after
    t0 = time.perf_counter()
    syn, ref = as_columns(synthetic, True, True), as_columns(real, True, True)
    tr = as_columns(train, True, True) if train is not None else None
    for name, columns in (("synthetic", syn), ("real", ref), ("train", tr)):
        if columns is not None and not len(columns["visits"]):
            raise ValueError(f"the {name} cohort has no patients: nothing to score")
    for name, columns in (("synthetic", syn), ("real", ref), ("train", tr)):
        if columns is not None:
            warn_unknown_codes(name, columns, code_system)
    # A modality is scored when the synthetic cohort and the reference both carry it; the others
    # are dropped everywhere, so a diagnosis-only synthetic cohort is scored exactly as before.
    reference = tr if tr is not None else ref
    for name in MODALITY_FIELDS:
        if name not in syn or name not in reference:
            for columns in (syn, ref, tr):
                if columns is not None:
                    columns.pop(name, None)
    n = len(syn["visits"])
    rng = np.random.default_rng(seed)
    candidates = {"synthetic": syn}
    if tr is not None and len(ref["visits"]):
        size = min(n, len(ref["visits"]))
        candidates["floor"] = _take(ref, np.sort(rng.choice(len(ref["visits"]), size=size, replace=False)))
    if baseline:
        sampler = IndependentMarginalSampler.fit(reference, code_system)
        candidates["baseline"] = as_columns(sampler.sample(n, seed=seed), True, True)
    timed = has_times(reference)

    rows: dict[str, dict | None] = {name: None for name in ROWS}
    for name, cand in candidates.items():
        rows[name] = coherence(cand, reference, top_k=top_k, code_system=code_system)
        if tr is not None and name != "floor":
            rows[name] |= privacy(cand, tr, ref, n_attack=n_attack, seed=seed, code_system=code_system)
        if timed:
            rows[name] |= time_outcome(cand, reference, code_system=code_system)  # {} when cand has no times
    useful = None
    if utility and tr is not None and len(ref["visits"]):
        useful = utility_rows({name: candidates[name] for name in ("synthetic", "baseline") if name in candidates},
                              tr, ref, code_system=code_system, seed=seed)
        for name, res in useful.items():
            rows[name] |= flat_figures(res)
        if rows["floor"] is not None:
            rows["floor"] |= flat_figures(useful["synthetic"], "real")
    meta = {
        "code_system": code_system,
        "reference": "train" if tr is not None else "real", "n_real": len(ref["visits"]), "n_synthetic": n,
        "n_train": len(tr["visits"]) if tr is not None else None,
        "floor": "held-out real patients (sampled to the synthetic size), scored against train" if "floor" in candidates
        else "not computed (needs train)",
        "baseline": ("IndependentMarginalSampler fitted on " + ("train" if tr is not None else "real (in-sample)"))
        if baseline else "not computed",
        "privacy": "train = train, holdout = real" if tr is not None else "not computed (needs train)",
        "seed": seed, "top_k": top_k, "n_attack": n_attack,
    }
    if timed:
        scored = [name for name in candidates if has_times(candidates[name])]
        meta["time_outcome"] = ("rows whose cohort has times, scored against the reference: "
                                + (", ".join(scored) or "none"))
    scored = [name for name in MODALITY_FIELDS if f"{name}_code_js" in rows["synthetic"]]
    if scored:
        meta["modalities"] = (", ".join(scored) + " scored per modality (both the synthetic and the reference "
                              "cohort carry them) and against the diagnoses (category x category pairs)")
    if useful is not None:
        meta["utility"] = ("logistic regressions trained on each row's cohort (floor: the train split), tested on "
                           "the real cohort: " + ", ".join(useful))
    if perplexity is not None:
        meta["perplexity"] = (f"lpl and mpl of the model on {perplexity['n_patients']:,} held-out real patients "
                              f"({perplexity['n_codes']:,} codes)")
    meta["scoring_seconds"] = round(time.perf_counter() - t0, 2)
    result = {"rows": rows, "meta": meta}
    if useful is not None:
        result["utility"] = useful
    if perplexity is not None:
        result["perplexity"] = perplexity
    if out_dir is not None:
        _write(result, {**candidates, "real": reference}, Path(out_dir), plots, code_system)
    return result


# ----------------------------------------------------------------------------- writing
def _clean(x):
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{x:,}"
    return f"{x:.4g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def markdown_table(result: dict) -> str:
    """The metrics as one Markdown table per section: synthetic, floor, baseline, real values."""
    rows, meta = result["rows"], result["meta"]
    better = {"low": "lower", "high": "higher", "0.5": "≈ 0.5", "0": "≈ 0", "real": "≈ real", "": ""}
    n_reference = meta["n_train"] if meta["reference"] == "train" else meta["n_real"]
    lines = [f"# Evaluation: {meta['n_synthetic']:,} synthetic patients vs {n_reference:,} real "
             f"({meta['reference']}) patients", "",
             f"Reference: the {meta['reference']} cohort. Floor: {meta['floor']}. Baseline: {meta['baseline']}. "
             f"Privacy: {meta['privacy']}. Column *real*: the reference cohort's own value (privacy: the same "
             "attack on held-out real patients, the control).", ""]
    system = LABELS[meta.get("code_system", DEFAULT_CODE_SYSTEM)]  # reports written before it was recorded
    timed = any(key in row for row in rows.values() if row for items in TIME_TABLE.values() for key, _, _ in items)
    for section, items in (TABLE | TIME_TABLE if timed else TABLE).items():
        lines += [f"## {section}", "", "| metric | synthetic | floor | baseline | real | better |",
                  "|---|---|---|---|---|---|"]
        for key, label, direction in items:
            cells = [_fmt(rows[r].get(key)) if rows.get(r) else "–" for r in ROWS]
            real_key = REAL_KEYS.get(key)
            real_value = rows["synthetic"].get(real_key) if real_key else None
            lines.append(f"| {label.format(system=system)} | " + " | ".join(cells)
                         + f" | {_fmt(real_value)} | {better[direction]} |")
        lines.append("")
    lines += _modality_lines(rows, system)
    if any(key in row for row in rows.values() if row for items in UTILITY_TABLE.values() for key, _, _ in items):
        lines += _utility_lines(rows)
    if result.get("perplexity"):
        lines += _perplexity_lines(result["perplexity"])
    if timed:
        lines.append("Definitions: `promptehr_hf.metrics.coherence`, `promptehr_hf.metrics.privacy` and "
                     "`promptehr_hf.metrics.time_outcome` docstrings.")
    else:
        lines.append("Definitions: `promptehr_hf.metrics.coherence` and `promptehr_hf.metrics.privacy` docstrings.")
    return "\n".join(lines) + "\n"


def _with_ci(row: dict | None, key: str) -> str:
    """The value, and its 95% interval ``[low, high]`` when the row has one (``<key>_ci_low``)."""
    if not row:
        return "–"
    text = _fmt(row.get(key))
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if text != "–" and low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _modality_lines(rows: dict, system: str) -> list[str]:
    """The sections "Per modality" and "Across modalities" when the synthetic row has procedure
    or medication figures (``coherence.modality_coherence``); [] otherwise."""
    scored = [name for name in MODALITY_FIELDS if f"{name}_code_js" in rows["synthetic"]]
    if not scored:
        return []
    better = {"low": "lower", "high": "higher", "real": "≈ real"}
    lines = ["## Per modality", "",
             "Each modality scored on its own codes against the reference's, as the diagnoses are (diagnoses: the "
             f"figures above). Invalid codes: diagnoses outside {system}, procedures outside the procedure code "
             "system, medications not of the form NAME//FORMULARY; CMS edits: diagnoses age/sex, procedures sex "
             "(medications have none).", "",
             "| metric | modality | synthetic | floor | baseline | real | better |", "|---|---|---|---|---|---|---|"]
    for key, label, direction in MODALITY_TABLE:
        for i, name in enumerate(("diagnoses", *scored)):
            full = key if name == "diagnoses" else f"{name}_{key}"
            real_key = (REAL_KEYS.get(key) if name == "diagnoses"
                        else f"{full}_real" if f"{full}_real" in rows["synthetic"] else None)
            cells = [_fmt(rows[r].get(full)) if rows.get(r) else "–" for r in ROWS]
            lines.append(f"| {label if i == 0 else ''} | {name} | " + " | ".join(cells)
                         + f" | {_fmt(rows['synthetic'].get(real_key) if real_key else None)} | {better[direction]} |")
    lines += ["", "## Across modalities", "",
              "R² of the within-visit prevalence of (diagnosis category, procedure category) and (diagnosis "
              "category, drug name) pairs: visits holding both / visits. The baseline draws each modality "
              "independently of the diagnoses, so its value is that of no association.", "",
              "| metric | synthetic | floor | baseline | better |", "|---|---|---|---|---|"]
    for key, label in CROSS_TABLE:
        if key in rows["synthetic"]:
            lines.append(f"| {label} | " + " | ".join(_fmt(rows[r].get(key)) if rows.get(r) else "–" for r in ROWS)
                         + " | higher |")
    return lines + [""]


def _utility_lines(rows: dict) -> list[str]:
    better = {"floor": "≈ floor", "1": "≈ 1", "": ""}
    lines = []
    for section, items in UTILITY_TABLE.items():
        lines += [f"## {section}", "",
                  "The same logistic regression per task, trained on each row's cohort (floor: the real training "
                  "split, i.e. real-trained) and tested on the held-out real patients; [low, high]: 95% bootstrap "
                  "interval over the test patients. Tasks, model and intervals: `promptehr_hf.metrics.utility`.", "",
                  "| metric | synthetic | floor | baseline | real | better |", "|---|---|---|---|---|---|"]
        for key, label, direction in items:
            cells = [_with_ci(rows.get(r), key) for r in ROWS]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | – | {better[direction]} |")
        lines.append("")
    return lines


def _perplexity_lines(ppl: dict) -> list[str]:
    types = (f"visit types marginalised over the cohort prior's chain ({ppl['n_types']} types; lpl over "
             + (f"the {ppl['lpl_types']} most likely" if ppl["lpl_types"] else "every reachable one")
             + f" per visit, mpl over {ppl['mpl_mean_types']:.1f} per code on average, at most {ppl['mpl_types']})"
             if ppl.get("n_types") else "no visit types")
    return [
        "## Perplexity (the model on held-out real patients)", "",
        f"PromptEHR's perplexities of the model on {ppl['n_patients']:,} held-out real patients "
        f"({ppl['n_visits']:,} visits, {ppl['n_codes']:,} codes scored, {ppl['n_unscored_codes']:,} of unknown "
        f"category not scored; codes in `{ppl['code_order']}` order; {types}). lpl: each code given the earlier "
        "visits and the codes before it in its visit; mpl: each code given the rest of its visit and the earlier "
        "visits; exp of the mean negative log-probability per code (median: the median of 1 / P(code), "
        "the statistic of PromptEHR's released evaluator). Definitions: `promptehr_hf.metrics.perplexity`.", "",
        "| metric | value | better |", "|---|---|---|",
        f"| longitudinal perplexity (lpl) | {_fmt(ppl['lpl'])} | lower |",
        f"| lpl, visits after the first ({ppl['n_codes_later_visits']:,} codes) | {_fmt(ppl['lpl_later_visits'])} "
        "| lower |",
        f"| marginal perplexity (mpl) | {_fmt(ppl['mpl'])} | lower |",
        f"| lpl, median over codes | {_fmt(ppl['lpl_median'])} | lower |",
        f"| mpl, median over codes | {_fmt(ppl['mpl_median'])} | lower |", ""]


def _write(result: dict, cohort_columns: dict[str, dict], out: Path, plots: bool, code_system: str) -> None:
    with replace_folder(out, "evaluate", {"meta": _clean(result["meta"])}) as tmp:
        write_json_atomic(tmp / "metrics.json", _clean(result), indent=2, allow_nan=False)
        write_text_atomic(tmp / "metrics.md", markdown_table(result))
        if plots:
            write_plots(cohort_columns, result["rows"], tmp, code_system, utility=result.get("utility"))


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--real", required=True, help="reference real cohort (held-out): Parquet file or folder")
    parser.add_argument("--synthetic", required=True, help="synthetic cohort: Parquet file or folder")
    parser.add_argument("--train", help="training cohort: enables the floor row and the privacy metrics")
    parser.add_argument("--out", required=True, help="output folder (an earlier report there is replaced; any other "
                        "non-empty folder, and any folder that is, holds or lies inside an input, is refused)")
    parser.add_argument("--real-split", default="test", help="split read from a prepared --real folder (default test)")
    parser.add_argument("--train-split", default="train", help="split read from a prepared --train folder")
    parser.add_argument("--code-system", choices=tuple(CODE_SYSTEMS), default=None,
                        help="the cohorts' code system (default: the one the inputs record in summary.json or "
                             f"generation_stats.json, else {DEFAULT_CODE_SYSTEM})")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--n-attack", type=int, default=2000, help="patients sampled per cohort for the attacks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-utility", action="store_true",
                        help="skip the train-on-synthetic, test-on-real figures (computed when --train is given)")
    parser.add_argument("--model", help="a trained checkpoint: adds its perplexities (lpl, mpl) on held-out real "
                        "patients (--real)")
    parser.add_argument("--perplexity-patients", type=int, default=DEFAULT_PATIENTS,
                        help=f"held-out patients sampled for the perplexities (default {DEFAULT_PATIENTS})")


def _inputs(args: argparse.Namespace) -> dict[str, str | None]:
    return {"--real": args.real, "--synthetic": args.synthetic, "--train": args.train}


def _guarded(args: argparse.Namespace) -> dict[str, str | None]:
    """Every input path, the model's included: --out must be none of them, lie in none, hold none."""
    return {**_inputs(args), "--model": args.model}


def validate(args: argparse.Namespace) -> None:
    """The checks ``promptehr evaluate`` runs before reading any cohort: every input exists, the
    numbers are in range, and --out is no input, lies in none, contains none, and is missing,
    empty or an earlier report. Raises FileNotFoundError, ValueError or OutputFolderError."""
    for flag, path in _guarded(args).items():
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    for flag, value in (("--top-k", args.top_k), ("--n-attack", args.n_attack),
                        ("--perplexity-patients", args.perplexity_patients)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    check_output(Path(args.out), "evaluate", _guarded(args))


def _code_system(args: argparse.Namespace) -> str:
    """``--code-system``, else the one system the inputs record (ValueError when they record
    several), else ICD-9-CM."""
    if args.code_system:
        return args.code_system
    recorded = {flag: recorded_code_system(path) for flag, path in _inputs(args).items() if path is not None}
    found = {flag: system for flag, system in recorded.items() if system is not None}
    if len(set(found.values())) > 1:
        raise ValueError("the inputs record different code systems (" + ", ".join(
            f"{flag}: {system}" for flag, system in found.items()) + "); pass --code-system")
    return next(iter(found.values()), DEFAULT_CODE_SYSTEM)


def _model_perplexity(model_dir: str, real: dict, n_patients: int, seed: int) -> dict:
    """``perplexity`` of the checkpoint at ``model_dir`` on ``real``: its cohort prior when the
    model is conditioned on visit types, its codes sorted when it was trained on sorted codes."""
    model, tokenizer = load_model(model_dir)
    prior = CohortPrior.load(model_dir) if (Path(model_dir) / PRIOR_FILE).is_file() else None
    try:
        trained = json.loads((Path(model_dir) / "training_args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a checkpoint saved by hand has none
        trained = {}
    order = "hierarchical" if trained.get("code_order") == "hierarchical" else "seq_num"
    return perplexity(model, tokenizer, real, prior, max_patients=n_patients, seed=seed, code_order=order)


def run(args: argparse.Namespace) -> int:
    """``promptehr evaluate`` (the CLI runs ``validate(args)`` first)."""
    code_system = _code_system(args)
    real = read_cohort(args.real, args.real_split)
    synthetic = read_cohort(args.synthetic, "synthetic")
    train = read_cohort(args.train, args.train_split) if args.train else None
    for flag, path, cohort in (("--synthetic", args.synthetic, synthetic), ("--real", args.real, real),
                               ("--train", args.train, train)):
        if cohort is not None and not len(cohort["visits"]):
            raise ValueError(f"{flag} {path}: no patients (0 rows); nothing to score, nothing written")
    ppl = _model_perplexity(args.model, real, args.perplexity_patients, args.seed) if args.model else None
    result = evaluate_cohorts(synthetic, real, train, out_dir=args.out, baseline=not args.no_baseline,
                              plots=not args.no_plots, seed=args.seed, top_k=args.top_k, n_attack=args.n_attack,
                              code_system=code_system, utility=not args.no_utility, perplexity=ppl)
    print(markdown_table(result))
    print(f"wrote {args.out}/metrics.json, metrics.md" + ("" if args.no_plots else " and plots"))
    return 0
