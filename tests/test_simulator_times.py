"""The simulator's times: stays, gaps, in-hospital and later deaths (module docstring, step 5)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from promptehr_hf.datasets_scripts import code_systems, simulator
from promptehr_hf.datasets_scripts.simulator import simulate

N = 4000
TIME_KEYS = ("stay_days", "gap_days", "hospital_death", "death_days")
SEPSIS = {"0389", "99592", "78552"}  # septicemia, severe sepsis, septic shock
# CHF, COPD, chronic bronchitis, CKD, diabetes, cirrhosis
CHRONIC = ("4280", "496", "491", "585", "250", "5712", "5715")


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    return simulate(N, seed=0)


@pytest.fixture(scope="module")
def admissions(cohort) -> dict:
    """Per admission: died there, neonate, adult age, preterm newborn (a 765 code), sepsis coded,
    acute respiratory failure coded, stay; per readmission: gap, patient with a chronic code at
    the first admission."""
    rows, gaps = [], []
    for p in cohort:
        k = len(p["visits"])
        preterm = p["age"] == 0 and any(c.startswith("765") for c in p["visits"][0])
        chronic = any(c.startswith(CHRONIC) for c in p["visits"][0])
        for i, v in enumerate(p["visits"]):
            rows.append((p["hospital_death"] and i == k - 1, p["age"] == 0, p["age"], preterm,
                         bool(SEPSIS & set(v)), "51881" in v, p["stay_days"][i]))
            if i:
                gaps.append((p["gap_days"][i], chronic))
    died, neonate, age, preterm, sepsis, resp, stay = (np.array(c) for c in zip(*rows))
    gap, chronic = (np.array(c) for c in zip(*gaps))
    return {"died": died, "neonate": neonate, "age": age, "preterm": preterm, "sepsis": sepsis,
            "respiratory_failure": resp, "stay": stay, "gap": gap, "chronic": chronic}


def test_fields_exist_and_are_consistent(cohort):
    for p in cohort:
        assert set(p) == {"subject_id", "age", "sex", "visits", *TIME_KEYS, "procedures", "medications"}
        k = len(p["visits"])
        assert k >= 1 and len(p["stay_days"]) == k and len(p["gap_days"]) == k
        assert all(isinstance(s, float) and s >= simulator.TIME_PARAMS.stay_min for s in p["stay_days"])
        assert all(isinstance(g, float) and 0.0 <= g <= simulator.TIME_PARAMS.gap_max for g in p["gap_days"])
        assert p["gap_days"][0] == 0.0
        assert isinstance(p["hospital_death"], bool)
        if p["hospital_death"]:
            assert p["death_days"] is None
        else:
            assert p["death_days"] is None or (isinstance(p["death_days"], float) and p["death_days"] > 0)
    # All four outcomes occur.
    assert any(p["hospital_death"] for p in cohort) and any(p["death_days"] is not None for p in cohort)
    assert any(len(p["visits"]) > 1 and p["hospital_death"] for p in cohort)  # death at a readmission


# sha256 of json.dumps(simulate(500, seed=3, code_system=..., sort_keys=True) computed with the
# simulator before it drew times (commit 55f361f); a numpy release that changed its random streams
# would change it (and every simulated cohort with it).
BEFORE_TIMES = {
    "icd9cm": "efa38d33fca0ee9e74861f34fdbdff1ce75f895fd76ed0a147018b75dd363e90",
    "icd10cm": "466bce052d4c3e92a9b3eab2197962f0bd313129541bdbaa35a3e081083fb1a3",
}


@pytest.mark.parametrize("code_system", sorted(BEFORE_TIMES))
def test_times_false_is_the_cohort_without_times(code_system):
    diagnoses = simulate(500, seed=3, code_system=code_system, times=False, modalities=("diagnoses",))
    assert hashlib.sha256(json.dumps(diagnoses, sort_keys=True).encode()).hexdigest() == BEFORE_TIMES[code_system]
    # With times: the same patients and codes, the visits after an in-hospital death dropped.
    plain = simulate(500, seed=3, code_system=code_system, times=False)
    timed = simulate(500, seed=3, code_system=code_system)
    dropped = 0
    per_visit = ("visits", "procedures", "medications")
    for p, q in zip(timed, plain):
        assert {k: p[k] for k in q if k not in per_visit} == {k: q[k] for k in q if k not in per_visit}
        for k in per_visit:
            assert p[k] == q[k][: len(p["visits"])]
        if len(p["visits"]) < len(q["visits"]):
            assert p["hospital_death"]
            dropped += 1
    assert dropped > 0


def test_icd10cm_gets_the_same_times():
    icd9, icd10 = simulate(1500, seed=0), simulate(1500, seed=0, code_system="icd10cm")
    keys = ("subject_id", "age", "sex", *TIME_KEYS)
    assert [[p[k] for k in keys] for p in icd10] == [[p[k] for k in keys] for p in icd9]
    assert [len(p["visits"]) for p in icd10] == [len(p["visits"]) for p in icd9]


def test_deterministic_and_prefix():
    a = simulate(300, seed=7)
    assert a == simulate(300, seed=7) == simulate(5000, seed=7)[:300]
    assert [p["stay_days"] for p in a] != [p["stay_days"] for p in simulate(300, seed=8)]


def test_dependence_on_the_phenotypes(admissions):
    a = admissions
    overall = a["died"].mean()
    assert a["died"][a["sepsis"]].mean() > 2 * overall  # ~0.33 vs ~0.10
    assert a["died"][a["respiratory_failure"]].mean() > 2 * overall
    adult = ~a["neonate"]
    assert a["died"][adult & (a["age"] >= 75)].mean() > 3 * a["died"][adult & (a["age"] < 50)].mean()
    assert a["died"][a["neonate"]].mean() < overall / 4
    # Preterm newborns stay longer than adults (median ~13 vs ~7 days); term newborns leave soon.
    adult_median = np.median(a["stay"][adult])
    assert np.median(a["stay"][a["preterm"]]) > 1.5 * adult_median
    assert np.median(a["stay"][a["neonate"] & ~a["preterm"]]) < adult_median / 2
    # Chronic patients come back sooner.
    assert np.median(a["gap"][a["chronic"]]) < 0.75 * np.median(a["gap"][~a["chronic"]])


def test_dropping_the_admissions_after_a_death_keeps_the_admission_count(cohort):
    """The admissions drawn after an in-hospital death are dropped (about 4% of them); the
    admissions per patient stay within 10% of MIMIC-III's 1.27."""
    plain = simulate(N, seed=0, times=False)
    kept, drawn = sum(len(p["visits"]) for p in cohort), sum(len(p["visits"]) for p in plain)
    assert 0.9 < kept / drawn < 0.99
    assert abs(kept / N / 1.27 - 1) < 0.10


def test_calibration(cohort, admissions):
    """Within stated tolerances of the MIMIC-III figures (benchmarks/simulator_calibration.py
    has the full-scale table and the sources), on 4,000 patients."""
    a = admissions
    assert abs(a["died"].mean() - 0.101) < 0.02  # in-hospital deaths per admission: 5,813 / 57,786
    assert abs(a["died"][~a["neonate"]].mean() - 0.115) < 0.025  # adults
    assert a["died"][a["neonate"]].mean() < 0.025  # NICU: 0.8%
    assert abs(np.median(a["stay"]) - 6.6) < 0.8  # hospital stay, median 6.6 (IQR 3.8-11.9)
    assert abs(np.quantile(a["stay"], 0.25) - 3.8) < 0.7 and abs(np.quantile(a["stay"], 0.75) - 11.9) < 1.5
    assert abs(np.median(a["stay"][a["neonate"]]) - 4.1) < 1.0  # NICU: 4.1 (2.3-10.3)
    assert 0.2 < (a["gap"] <= 30).mean() < 0.5  # the demo: 10 of 29 readmissions within 30 days
    died = np.mean([p["hospital_death"] or p["death_days"] is not None for p in cohort])
    assert abs(died - 0.33) < 0.05  # ~33% of MIMIC-III patients have a date of death
    later = [p["death_days"] for p in cohort if p["death_days"] is not None]
    assert 100 < np.median(later) < 600 and not any(math.isnan(d) for d in later)


def _visit_rows(patients):
    """(codes, ages at their admission, sexes) of every diagnosis row, the age at admission k
    being age + (days before it) / 365.25 (the schema's)."""
    codes, ages, sexes = [], [], []
    for p in patients:
        elapsed = 0.0
        for k, v in enumerate(p["visits"]):
            elapsed += p["gap_days"][k]
            codes += v
            ages += [min(p["age"] + elapsed / 365.25, 90.0)] * len(v)
            sexes += [p["sex"]] * len(v)
            elapsed += p["stay_days"][k]
    return codes, ages, sexes


@pytest.mark.parametrize(("code_system", "n"), [("icd9cm", 20_000), ("icd10cm", 5000)])
def test_no_cms_age_conflict_at_any_admission(code_system, n):
    """The codes are drawn for the age at the first admission; the times keep every later
    admission's age in the same CMS age class (without that, 73 newborn-code rows of 46,520
    ICD-9-CM patients fell on a readmission after the first birthday)."""
    patients = simulate(n, seed=0, code_system=code_system)
    codes, ages, sexes = _visit_rows(patients)
    broken = code_systems.code_system(code_system).violations(codes, ages, sexes)
    assert (broken == "").all(), sorted(set(broken[broken != ""]))
    # The neonates' readmissions do happen, all in the first year.
    later = [sum(p["gap_days"]) + sum(p["stay_days"][:-1]) for p in patients if p["age"] == 0 and len(p["visits"]) > 1]
    assert later and max(later) < 365.25
