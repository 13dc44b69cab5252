"""The simulator's procedures and medications (issue 18): the diagnoses, demographics and times
untouched, valid codes, CMS procedure sex edits, dependence on the phenotypes, the calibrated shape."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from promptehr_hf.datasets_scripts import medications, simulator
from promptehr_hf.datasets_scripts.procedures import ICD9PROC, ICD10PCS
from promptehr_hf.datasets_scripts.simulator import simulate

N = 6000
MODAL = ("procedures", "medications")

# sha256 of json.dumps(simulate(5000, seed=3, code_system=..., times=...), sort_keys=True) computed
# with the simulator before it drew procedures and medications (commit e40e50a): the cohorts the
# fidelity benchmarks read must not move.
BEFORE_MODALITIES = {
    ("icd9cm", True): "9b92c925fac484b62ddfb80a233af1812e7bf6d30061b105b300b77bb4d857df",
    ("icd9cm", False): "4b223bbc259ea15482deaabe3876898bba662c212ccaaf8affdb24918e439e06",
    ("icd10cm", True): "cd74a30b97e9639426d63bd7fb49e7d371ade92dc46dea313ed274a6aa9e11d0",
    ("icd10cm", False): "e3686a313daf5bdcd4d7c0e35479da6878eb88115d439a755732026a78330e5a",
}


def _digest(patients: list[dict]) -> str:
    return hashlib.sha256(json.dumps(patients, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    return simulate(N, seed=0)


@pytest.fixture(scope="module")
def visits(cohort) -> list[tuple[dict, int]]:
    return [(p, i) for p in cohort for i in range(len(p["visits"]))]


@pytest.mark.parametrize("code_system,times", sorted(BEFORE_MODALITIES))
def test_everything_else_is_the_cohort_before_modalities(code_system, times):
    full = simulate(5000, seed=3, code_system=code_system, times=times)
    assert all(set(MODAL) <= set(p) for p in full)
    stripped = [{k: v for k, v in p.items() if k not in MODAL} for p in full]
    assert _digest(stripped) == BEFORE_MODALITIES[code_system, times]
    assert _digest(simulate(5000, seed=3, code_system=code_system, times=times,
                            modalities=("diagnoses",))) == BEFORE_MODALITIES[code_system, times]


def test_each_modality_has_its_own_stream():
    full = simulate(800, seed=5)
    meds_only = simulate(800, seed=5, modalities=("diagnoses", "medications"))
    procs_only = simulate(800, seed=5, modalities=("diagnoses", "procedures"))
    assert all("procedures" not in p for p in meds_only) and all("medications" not in p for p in procs_only)
    assert [p["medications"] for p in meds_only] == [p["medications"] for p in full]
    assert [p["procedures"] for p in procs_only] == [p["procedures"] for p in full]
    assert full == simulate(5000, seed=5)[:800]  # still a prefix of a larger cohort


@pytest.mark.parametrize("bad", [("procedures",), ("diagnoses", "labs"), "diagnoses"])
def test_unknown_modalities_refused(bad):
    with pytest.raises(ValueError, match="modalities"):
        simulate(5, modalities=bad)


def test_schema(cohort):
    for p in cohort:
        for m in MODAL:
            assert len(p[m]) == len(p["visits"])
            for codes in p[m]:
                assert isinstance(codes, list) and len(set(codes)) == len(codes)
                assert all(isinstance(c, str) for c in codes)


def test_codes_are_valid(cohort):
    procs = {c for p in cohort for v in p["procedures"] for c in v}
    meds = {c for p in cohort for v in p["medications"] for c in v}
    assert sorted(c for c in procs if not ICD9PROC.is_billable(c)) == []
    assert sorted(c for c in meds if not medications.is_valid(c)) == []
    assert len(procs) > 300  # the background procedures reach far beyond the table
    table = {c for od in simulator.PROCEDURES for v in od.variants for c in v.split()}
    assert sorted(c for c in table if not ICD9PROC.is_billable(c)) == []
    assert sorted(t for t in simulator.PCS_CODES.values() if t and not ICD10PCS.is_billable(t)) == []
    assert table <= set(simulator.PCS_CODES)


def test_icd10_cohort_writes_icd10_pcs():
    cohort = simulate(1500, seed=0, code_system="icd10cm")
    procs = [c for p in cohort for v in p["procedures"] for c in v]
    assert len(procs) > 1000
    assert all(ICD10PCS.is_billable(c) for c in procs)
    assert set(procs) <= {t for t in simulator.PCS_CODES.values() if t}  # no background codes in ICD-10-PCS
    assert "5A1955Z" in procs  # > 96 hours of ventilation


def test_procedure_sex_edits(cohort):
    codes, sexes = [], []
    for p in cohort:
        for v in p["procedures"]:
            codes.extend(v)
            sexes.extend([p["sex"]] * len(v))
    broken = ICD9PROC.violations(codes, 40.0, np.array(sexes))
    assert (broken == "").all(), Counter(np.array(codes)[broken != ""]).most_common(5)
    edited = Counter((ICD9PROC.edit_of(c), s) for c, s in zip(codes, sexes) if ICD9PROC.edit_of(c))
    assert edited["sex_male_only", "M"] > 20 and edited["sex_female_only", "F"] > 20  # circumcision, deliveries


def _rate(visits, has, gets) -> tuple[float, float]:
    """P(gets | has) and P(gets | not has) over the visits."""
    a = np.array([has(p, i) for p, i in visits])
    b = np.array([gets(p, i) for p, i in visits])
    return b[a].mean(), b[~a].mean()


def test_phenotype_dependence(visits):
    def dx(*codes):
        return lambda p, i: any(c in p["visits"][i] for c in codes)

    def proc(*codes):
        return lambda p, i: any(c in p["procedures"][i] for c in codes)

    def drug(name):
        return lambda p, i: any(c.startswith(name + "//") for c in p["medications"][i])

    with_, without = _rate(visits, dx("51881", "51884"), proc("9671", "9672"))
    assert with_ > 0.5 and with_ > 5 * without  # mechanical ventilation with respiratory failure (and after surgery)
    with_, without = _rate(visits, dx("78552"), drug("NOREPINEPHRINE"))
    assert with_ > 0.6 and with_ > 10 * without  # vasopressors in septic shock
    with_, without = _rate(visits, dx("4280"), drug("FUROSEMIDE"))
    assert with_ > 0.7 and with_ > 2 * without  # the demo: 78% of heart-failure admissions, 34% of the others
    with_, without = _rate(visits, dx("5722"), drug("LACTULOSE"))
    assert with_ > 0.9 and with_ > 5 * without  # lactulose with hepatic encephalopathy
    with_, without = _rate(visits, dx("7746", "7742"), proc("9983"))
    assert with_ > 0.5 and without < 0.05  # phototherapy for neonatal jaundice
    cabg = [any(c in {"3611", "3612", "3613", "3614", "3615"} for c in p["procedures"][i]) for p, i in visits]
    cad = [any(c in {"41401", "412", "V4581"} for c in p["visits"][i]) for p, i in visits]
    assert sum(cabg) > 50 and np.mean([d for c, d in zip(cabg, cad) if c]) > 0.95  # CABG with coronary disease
    neonate = np.array([p["age"] == 0 for p, _ in visits])
    vit_k = np.array([drug("PHYTONADIONE (NEONATAL)")(p, i) for p, i in visits])
    assert vit_k[neonate].mean() > 0.85 and not vit_k[~neonate].any()
    with_, without = _rate(visits, dx("V053"), proc("9955"))  # hepatitis B vaccine given and coded
    assert with_ > 0.75 and without < 0.01


def test_calibrated_shape(visits):
    n_proc = np.array([len(p["procedures"][i]) for p, i in visits])
    n_med = np.array([len(p["medications"][i]) for p, i in visits])
    # MIMIC-III: 240,095 procedure rows over 58,976 admissions (4.1), the demo 3.8 and 12% without;
    # medications: the demo keeps 34.5 codes per admission (the simulator's table is narrower).
    assert 3.0 < n_proc.mean() < 4.5 and 0.08 < (n_proc == 0).mean() < 0.25
    assert 18 < n_med.mean() < 35 and (n_med == 0).mean() < 0.05
    top = [c for c, _ in Counter(c for p, i in visits for c in p["procedures"][i]).most_common(8)]
    assert {"3893", "9604", "966", "9904"} <= set(top)
    top = [c for c, _ in Counter(c for p, i in visits for c in p["medications"][i]).most_common(10)]
    assert "SODIUM CHLORIDE 0.9% FLUSH//NACLFLUSH" in top and "INSULIN//INSULIN" in top


def test_cli_writes_the_tables(tmp_path):
    from promptehr_hf.cli import main

    assert main(["simulate", "--patients", "50", "--seed", "1", "--modalities", "diagnoses", "--out",
                 str(tmp_path / "dx")]) == 0
    assert not (tmp_path / "dx" / "PROCEDURES_ICD.csv").exists()
    assert main(["simulate", "--patients", "50", "--seed", "1", "--code-system", "icd10cm", "--out",
                 str(tmp_path / "iv")]) == 0
    assert {p.name for p in (tmp_path / "iv" / "hosp").iterdir()} >= {"procedures_icd.csv.gz", "prescriptions.csv.gz"}
