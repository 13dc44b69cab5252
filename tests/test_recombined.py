"""The recombined cohort: patients rebuilt from the real MIMIC-III demo's admissions (read in place
through ``demo_dir``; nothing of it is written outside tmp_path)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from promptehr_hf.datasets_scripts import icd9
from promptehr_hf.datasets_scripts.mimic3 import read_mimic3
from promptehr_hf.datasets_scripts.recombined import (
    DEFAULT_PATIENTS,
    build_recombined_cohort,
    recombine,
    write_recombined_cohort,
)
from promptehr_hf.metrics.baselines import IndependentMarginalSampler
from promptehr_hf.metrics.coherence import coherence

N = 3000


@pytest.fixture(scope="module")
def demo(demo_dir) -> list[dict]:
    return read_mimic3(demo_dir)[0]


@pytest.fixture(scope="module")
def cohort(demo) -> list[dict]:
    return recombine(demo, N, seed=0)


def _key(patient: dict) -> tuple:
    return tuple(frozenset(v) for v in patient["visits"])


def test_deterministic_for_a_seed(demo, cohort):
    assert recombine(demo, N, seed=0) == cohort
    assert recombine(demo, N, seed=1) != cohort


def test_sizes_and_schema(demo, cohort):
    assert len(cohort) == N
    assert [p["subject_id"] for p in cohort] == list(range(1, N + 1))
    assert recombine(demo, 0, seed=0) == []
    real_visits = {len(p["visits"]) for p in demo}
    real_sizes = [len(v) for p in demo for v in p["visits"]]
    for p in cohort:
        assert set(p) == {"subject_id", "age", "sex", "visits"}
        assert p["sex"] in ("F", "M")
        assert isinstance(p["age"], float) and 0.0 <= p["age"] <= 90.0 and round(p["age"], 2) == p["age"]
        assert len(p["visits"]) in real_visits  # one visit per admission of a real patient
        for v in p["visits"]:
            assert 1 <= len(v) <= max(real_sizes)
            assert len(set(v)) == len(v)
    sizes = [len(v) for p in cohort for v in p["visits"]]
    assert abs(np.mean(sizes) - np.mean(real_sizes)) < 0.15 * np.mean(real_sizes)  # about the real size
    sexes = Counter(p["sex"] for p in cohort)
    assert 0.35 < sexes["F"] / N < 0.75


def test_codes_valid_and_no_cms_conflict(cohort):
    codes, ages, sexes = [], [], []
    for p in cohort:
        k = sum(len(v) for v in p["visits"])
        codes.extend(c for v in p["visits"] for c in v)
        ages.extend([p["age"]] * k)
        sexes.extend([p["sex"]] * k)
    assert all(icd9.is_valid(c) for c in set(codes))
    assert (icd9.violations(codes, ages, sexes) == "").all()


def test_keeps_the_demo_pair_structure_better_than_the_baseline(demo, cohort):
    ours = coherence(cohort, demo)
    base = coherence(IndependentMarginalSampler.fit(demo).sample(N, seed=0), demo)
    assert ours["r2_pair_prevalence"] > 0.8
    assert ours["r2_pair_prevalence"] > base["r2_pair_prevalence"] + 0.2
    assert ours["r2_consecutive_prevalence"] > base["r2_consecutive_prevalence"] + 0.3
    assert ours["code_js"] < 0.05
    assert ours["cms_invalid_code_rate"] == 0


def test_not_a_copy(demo, cohort):
    real = {_key(p) for p in demo}
    assert sum(_key(p) in real for p in cohort) / N < 0.01
    real_visits = {frozenset(v) for p in demo for v in p["visits"]}
    copied_visits = [frozenset(v) in real_visits for p in cohort for v in p["visits"]]
    assert np.mean(copied_visits) < 0.02


def test_build_and_write_read_back(demo_dir, demo, tmp_path):
    assert DEFAULT_PATIENTS == 12_000
    built = build_recombined_cohort(demo_dir, 200, seed=4)
    assert built == recombine(demo, 200, seed=4)
    write_recombined_cohort(demo_dir, tmp_path, 200, seed=4)
    back, _ = read_mimic3(tmp_path)
    assert [p["visits"] for p in back] == [p["visits"] for p in built]
    assert [p["sex"] for p in back] == [p["sex"] for p in built]


def test_bad_arguments(demo):
    for kwargs in ({"n_patients": -1}, {"p_keep": 1.5}, {"age_jitter": -1.0}):
        with pytest.raises(ValueError):
            recombine(demo, **{"n_patients": 10, **kwargs})
    with pytest.raises(ValueError, match="usable"):
        recombine([], 10)
