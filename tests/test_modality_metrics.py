"""Metrics of procedures and medications: per modality, across modalities, baseline, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest

from promptehr_hf.metrics.baselines import IndependentMarginalSampler
from promptehr_hf.metrics.coherence import coherence
from promptehr_hf.metrics.report import MODALITY_PLOTS, PLOTS, evaluate_cohorts, markdown_table, read_cohort

MODALITY_KEYS = ("procedures", "medications", "r2_pair_diagnosis")


def P(age, sex, visits, procedures=None, medications=None):
    p = {"subject_id": 0, "age": float(age), "sex": sex, "visits": visits}
    if procedures is not None:
        p["procedures"] = procedures
    if medications is not None:
        p["medications"] = medications
    return p


def r2(r, s):
    mean = sum(r) / len(r)
    return 1 - sum((a - b) ** 2 for a, b in zip(r, s)) / sum((a - mean) ** 2 for a in r)


def modality_keys(out: dict) -> list[str]:
    return [k for k in out if k.startswith(MODALITY_KEYS)]


# Two clusters: each patient's diagnoses, procedures and drugs come from one cluster.
DIAGNOSES = [["4019", "41401", "4280", "42731", "2724", "25000"], ["486", "5990", "51881", "0389", "99592", "5849"]]
PROCEDURES = [["3961", "3615", "8856", "3722"], ["9604", "9671", "3893", "9904", "3324"]]
DRUGS = [["ASPIRIN//ASA81", "METOPROLOL//METO25", "ATORVASTATIN//ATOR40", "FUROSEMIDE//FURO40"],
         ["VANCOMYCIN//VANC1F", "PIPERACILLIN-TAZOBACTAM//PIPT4I", "CEFTRIAXONE//CEFT1I", "ACETAMINOPHEN//ACET325"]]


def zipf(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** 1.5
    return w / w.sum()


def clustered(n: int, seed: int, procedures: bool = True, medications: bool = True) -> list[dict]:
    """Patients of one of two clusters each (two thirds in the first), Zipf-like code frequencies
    inside a cluster (so prevalences vary and R² is informative)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = int(rng.random() < 1 / 3)
        n_visits = int(rng.integers(1, 3))

        def pick(pool, lo, hi):
            return [str(c) for c in rng.choice(pool, size=rng.integers(lo, hi), replace=False, p=zipf(len(pool)))]
        out.append(P(rng.integers(20, 90), "FM"[rng.integers(2)], [pick(DIAGNOSES[g], 1, 5) for _ in range(n_visits)],
                     [pick(PROCEDURES[g], 0, 3) for _ in range(n_visits)] if procedures else None,
                     [pick(DRUGS[g], 1, 4) for _ in range(n_visits)] if medications else None))
    return out


def strip(cohort: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k not in ("procedures", "medications")} for p in cohort]


# ----------------------------------------------------------------------------- coherence
def test_identical_cohorts_are_perfect_in_every_modality():
    real = clustered(300, 1)
    out = coherence(real, real)
    for m in ("procedures", "medications"):
        assert out[f"{m}_code_js"] == 0 and out[f"{m}_category_js"] == 0
        assert out[f"{m}_r2_code_prevalence"] == out[f"{m}_r2_pair_prevalence"] == 1.0
        assert out[f"{m}_top_k_overlap"] == 1.0 and out[f"{m}_codes_per_visit_tv"] == 0
        assert out[f"{m}_unknown_code_rate"] == 0 and out[f"{m}_duplicate_rate"] == 0
        assert out[f"{m}_distinct_codes"] == out[f"{m}_distinct_codes_real"]
    assert out["r2_pair_diagnosis_procedure"] == out["r2_pair_diagnosis_medication"] == 1.0
    assert out["procedures_cms_invalid_code_rate"] == 0 and "medications_cms_invalid_code_rate" not in out


def test_shuffled_procedures_keep_marginals_and_lose_cross_pairs():
    real = clustered(400, 2)
    rng = np.random.default_rng(0)
    lists = [v for p in real for v in p["procedures"]]
    order = rng.permutation(len(lists))
    shuffled, at = [], 0
    for p in real:  # the procedure lists of all visits, dealt back in a random order
        k = len(p["visits"])
        shuffled.append({**p, "procedures": [lists[i] for i in order[at:at + k]]})
        at += k
    out = coherence(shuffled, real)
    assert out["procedures_code_js"] == 0 and out["procedures_category_js"] == 0
    assert out["procedures_r2_code_prevalence"] == 1.0 and out["procedures_r2_pair_prevalence"] == 1.0
    assert out["procedures_codes_per_visit_tv"] == 0 and out["procedures_top_k_overlap"] == 1.0
    assert out["r2_pair_diagnosis_medication"] == 1.0  # medications untouched
    assert out["r2_pair_diagnosis_procedure"] < 0.5  # the clusters are gone across modalities


def test_cross_modality_pair_r2_by_hand():
    real = [P(40, "F", [["4019", "25000"], ["4019", "41401"]], [["3961"], []]),
            P(50, "M", [["4019", "25000", "41401"]], [["3961", "8856"]])]
    syn = [P(60, "M", [["4019"], ["41401"]], [["39.61"], ["8856"]])]
    out = coherence(syn, real)
    # keys (diagnosis category, procedure category); real / 3 visits, synthetic / 2 visits:
    # (401,39) (250,39) (414,39) (401,88) (250,88) (414,88)
    assert out["r2_pair_diagnosis_procedure"] == pytest.approx(
        r2([2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3], [1 / 2, 0, 0, 0, 0, 1 / 2]))
    # procedure codes, "39.61" read as "3961": real 3961 x2, 8856 x1; synthetic 3961, 8856
    assert out["procedures_r2_code_prevalence"] == pytest.approx(r2([2 / 3, 1 / 3], [1 / 2, 1 / 2]))
    assert out["procedures_r2_pair_prevalence"] == 0.0  # one key (3961, 8856), real 1/3, missed: 0
    assert out["procedures_codes_per_visit_mean"] == 1 and out["procedures_codes_per_visit_mean_real"] == 1
    assert "medications_code_js" not in out and "r2_pair_diagnosis_medication" not in out  # real has none


def test_invalid_codes_are_counted():
    real = clustered(50, 3)
    syn = [P(45, "M", [["4019"], ["486"]], [["6501", "3605", "3605"], ["36.07"]],  # female-only on a man; deleted
             [["ASPIRIN//ASA81", "aspirin//asa81"], ["ASPIRIN"]]),
           P(30, "F", [["4019"]], [["6011"]], [["ASPIRIN//"]]),  # male-only on a woman; empty formulary
           P(60, "F", [["486"]], [["9604"]], [["VANCOMYCIN//VANC1F"]])]
    out = coherence(syn, real)
    # procedure visit occurrences: 6501, 3605, 3607, 6011, 9604 (3605 twice in one visit counts once)
    assert out["procedures_unknown_code_rate"] == pytest.approx(1 / 5)
    assert out["procedures_duplicate_rate"] == pytest.approx(1 / 6)
    assert out["procedures_cms_invalid_code_rate"] == pytest.approx(2 / 5)
    assert out["procedures_cms_invalid_patient_rate"] == pytest.approx(2 / 3)
    assert out["procedures_cms_invalid_patient_rate_real"] == 0
    # medication visit occurrences: ASPIRIN//ASA81, aspirin//asa81, ASPIRIN, ASPIRIN//, VANCOMYCIN//VANC1F
    assert out["medications_unknown_code_rate"] == pytest.approx(3 / 5)


def test_icd10_cohorts_use_icd10_pcs():
    real = [P(50, "M", [["I10", "E119"], ["J189"]], [["0DTJ4ZZ"], ["5A1955Z"]])]
    syn = [P(50, "M", [["I10", "E119"], ["J189"]], [["0DTJ4ZZ"], ["5A1955Z", "0VT04ZZ", "0UT90ZZ", "3605"]])]
    out = coherence(syn, real, code_system="icd10cm")
    assert out["procedures_unknown_code_rate"] == pytest.approx(1 / 5)  # 3605: an ICD-9 code
    assert out["procedures_cms_invalid_code_rate"] == pytest.approx(1 / 5)  # 0UT90ZZ (hysterectomy) on a man
    assert coherence(real, real, code_system="icd10cm")["r2_pair_diagnosis_procedure"] == 1.0


def test_diagnosis_only_output_is_unchanged():
    real, syn = clustered(200, 4), clustered(150, 5)
    plain = coherence(strip(syn), strip(real))
    assert not modality_keys(plain)
    assert coherence(strip(syn), real) == plain  # a modality only one cohort carries is not scored
    assert coherence(syn, strip(real)) == plain
    nulls = [{**p, "procedures": None, "medications": None} for p in strip(syn)]
    assert coherence(nulls, real) == plain
    both = coherence(syn, real)
    assert {k: v for k, v in both.items() if k not in modality_keys(both)} == plain


def test_lists_must_be_parallel_to_visits():
    real = clustered(20, 6)
    with pytest.raises(ValueError, match="patient row 0: procedures must be one list of codes per visit"):
        coherence([P(40, "F", [["4019"], ["486"]], [["3961"]])], real)


# ----------------------------------------------------------------------------- baseline
def test_baseline_draws_each_modality_independently():
    train = clustered(1500, 7)
    sampler = IndependentMarginalSampler.fit(train)
    a = sampler.sample(1500, seed=1)
    assert a == sampler.sample(1500, seed=1)
    # the diagnoses, demographics and times are those of a sampler without modalities
    assert strip(a) == IndependentMarginalSampler.fit(strip(train)).sample(1500, seed=1)
    assert all(len(p["procedures"]) == len(p["medications"]) == len(p["visits"]) for p in a)
    assert all(len(v) == len(set(v)) for p in a for v in p["procedures"] + p["medications"])
    share_empty = np.mean([not v for p in a for v in p["procedures"]])
    assert share_empty == pytest.approx(np.mean([not v for p in train for v in p["procedures"]]), abs=0.03)
    base, real = coherence(a, train), coherence(clustered(1500, 8), train)
    for m in ("procedures", "medications"):
        assert base[f"{m}_code_js"] < 0.01 and base[f"{m}_r2_code_prevalence"] > 0.95
    for key in ("r2_pair_diagnosis_procedure", "r2_pair_diagnosis_medication"):
        assert base[key] < 0.6 < 0.95 < real[key]


# ----------------------------------------------------------------------------- report
def test_report_has_per_modality_and_cross_modality_rows(tmp_path):
    train, real, syn = clustered(600, 9), clustered(200, 10), clustered(200, 11)
    result = evaluate_cohorts(syn, real, train, out_dir=tmp_path / "out", n_attack=100, utility=False)
    rows = result["rows"]
    for key in ("r2_pair_diagnosis_procedure", "r2_pair_diagnosis_medication"):
        assert rows["baseline"][key] < rows["floor"][key] and rows["baseline"][key] < rows["synthetic"][key]
    assert rows["baseline"]["procedures_code_js"] < 0.05
    assert "procedures, medications" in result["meta"]["modalities"]
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "## Per modality" in table and "## Across modalities" in table
    assert "| R² pair prevalence, diagnosis category × drug name |" in table
    assert "|  | medications |" in table
    pngs = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert pngs == set(PLOTS + MODALITY_PLOTS)
    assert (tmp_path / "out" / "modality_pairs.png").stat().st_size > 5000
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["rows"]["floor"]["procedures_unknown_code_rate"] == 0


def test_report_of_a_diagnosis_only_generator_is_unchanged():
    train, real, syn = clustered(300, 12), clustered(100, 13), clustered(100, 14)
    kwargs = dict(plots=False, n_attack=50, utility=False)
    plain = evaluate_cohorts(strip(syn), strip(real), strip(train), **kwargs)
    mixed = evaluate_cohorts(strip(syn), real, train, **kwargs)  # real data with modalities
    for result in (plain, mixed):
        del result["meta"]["scoring_seconds"]
    assert json.dumps(mixed, sort_keys=True) == json.dumps(plain, sort_keys=True)  # NaN as NaN
    assert markdown_table(mixed) == markdown_table(plain) and "Per modality" not in markdown_table(plain)


def test_read_cohort_carries_modalities(tmp_path):
    cohort = clustered(30, 15)
    datasets.Dataset.from_list(cohort).to_parquet(str(tmp_path / "a.parquet"))
    columns = read_cohort(tmp_path / "a.parquet")
    assert columns["procedures"] == [p["procedures"] for p in cohort]
    assert columns["medications"] == [p["medications"] for p in cohort]
    datasets.Dataset.from_list(strip(cohort)).to_parquet(str(tmp_path / "b.parquet"))
    assert "procedures" not in read_cohort(tmp_path / "b.parquet")


def test_evaluate_module_takes_modalities(repo_root, tmp_path):
    code = textwrap.dedent("""
        import json, evaluate
        real = [{"visits": [["4019", "25000"], ["4019"]], "procedures": [["3961"], []],
                 "medications": [["ASPIRIN//ASA81"], ["ASPIRIN//ASA81", "METOPROLOL//METO25"]],
                 "age": 64.0, "sex": "M"}]
        cols = {k: [p[k] for p in real] for k in ("visits", "age", "sex")}
        coh = evaluate.load("metrics/ehr_coherence")
        a = coh.compute(**cols, real=real, procedures=[p["procedures"] for p in real],
                        medications=[p["medications"] for p in real])
        b = coh.compute(**cols, real=real)
        print(json.dumps({"a": a, "b": b}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["a"]["procedures_code_js"] == 0 and out["a"]["r2_pair_diagnosis_medication"] == 1.0
    assert not modality_keys(out["b"])
