"""Time and outcome metrics (metrics.time_outcome): hand-computed values on tiny cohorts, every
consistency violation, the baseline's time draws, and the report with and without times."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
from scipy.stats import ks_2samp

from promptehr_hf.metrics.baselines import IndependentMarginalSampler
from promptehr_hf.metrics.report import (
    PLOTS,
    TIME_PLOTS,
    UTILITY_PLOTS,
    VIOLATION_LABELS,
    evaluate_cohorts,
    markdown_table,
    read_cohort,
)
from promptehr_hf.metrics.time_outcome import (
    VIOLATIONS,
    Times,
    has_times,
    ks_statistic,
    mortality_by_category,
    r2_plain,
    time_outcome,
)

TIME_KEYS = ("stay_days", "gap_days", "hospital_death", "death_days")


def T(age, visits, stays, gaps, death=False, days=None, sex="F"):
    """A patient with times."""
    return {"subject_id": 0, "age": float(age), "sex": sex, "visits": [list(v) for v in visits],
            "stay_days": list(stays), "gap_days": list(gaps), "hospital_death": death, "death_days": days}


def untimed(cohort):
    return [{k: v for k, v in p.items() if k not in TIME_KEYS} for p in cohort]


# A: discharges 3, readmitted after visit 0 (gap 10); B: dies at visit 1, its one discharge is
# readmitted after exactly 30 days; C: one visit, dies 12 days after discharge.
HAND = [
    T(50, [["4019"], ["4019", "25000"], ["486"]], [1, 2, 3], [0, 10, 40]),
    T(70, [["486"], ["486", "4019"]], [5, 4], [0, 30], death=True),
    T(30, [["25000"]], [2], [0], days=12.0, sex="M"),
]


# ----------------------------------------------------------------------------- by hand
def test_times_flatten_elapsed_and_ages():
    t = Times(HAND)
    assert t.stay.tolist() == [1, 2, 3, 5, 4, 2] and t.gap.tolist() == [0, 10, 40, 0, 30, 0]
    # elapsed to admission k: stays before k plus gaps up to k
    assert t.elapsed.tolist() == [0, 11, 53, 0, 35, 0]
    assert t.age_at == pytest.approx([50, 50 + 11 / 365.25, 50 + 53 / 365.25, 70, 70 + 35 / 365.25, 30])
    assert t.death_visit.tolist() == [False, False, False, False, True, False]
    assert t.gaps().tolist() == [10, 40, 30]


def test_readmission_and_mortality_by_hand():
    out = time_outcome(HAND, HAND)
    # discharges: A 3, B 1 (its last visit is a death), C 1; readmitted within 30 days: A0, B0
    assert out["readmission_30d_rate"] == out["readmission_30d_rate_real"] == pytest.approx(2 / 5)
    assert out["hospital_mortality_patient_rate"] == pytest.approx(1 / 3)
    assert out["hospital_mortality_admission_rate"] == pytest.approx(1 / 6)
    assert out["out_of_hospital_death_rate"] == pytest.approx(1 / 3)
    assert out["gap_days_mean"] == pytest.approx(80 / 3) and out["gap_days_median"] == 30
    assert out["stay_days_mean"] == pytest.approx(17 / 6)
    for name in ("gap_days", "stay_days", "admission_age"):
        assert out[f"{name}_wasserstein"] == 0 and out[f"{name}_ks"] == 0
    assert out["mortality_by_category_r2"] == 1.0 and out["time_violation_patient_rate"] == 0
    assert all(out[f"violations_{v}"] == 0 for v in VIOLATIONS)


def test_readmission_threshold_is_inclusive():
    # one discharge followed by 30.0 days (readmitted), one by 30.5 (not)
    a = [T(40, [["4019"], ["4019"]], [1, 1], [0, 30.0]), T(40, [["4019"], ["4019"]], [1, 1], [0, 30.5])]
    assert Times(a).readmission_rate() == pytest.approx(1 / 4)


def test_mortality_by_category_by_hand():
    # real: 401 in 4 visits (1 death), 250 in 2 (1 death), 486 in 2 (0 deaths), 599 in 1
    real = [
        T(60, [["4019", "25000"]], [3], [0], death=True),
        T(60, [["4019"], ["4019", "486"]], [3, 3], [0, 5]),
        T(60, [["4019", "25000", "486"]], [3], [0]),
        T(60, [["5990"]], [3], [0]),
    ]
    # synthetic: 401 in 2 visits (2 deaths), 250 in 1 (0 deaths), 486 never, 599 in 1 (1 death)
    syn = [T(60, [["4019"]], [3], [0], death=True), T(60, [["4019", "5990"]], [3], [0], death=True),
           T(60, [["25000"]], [3], [0])]
    by = mortality_by_category(syn, real, top_categories=3)
    assert by["categories"] == ["401", "250", "486"]  # 250 and 486 tie at 2 visits: smaller string first
    assert by["visits_real"].tolist() == [4, 2, 2] and by["visits"].tolist() == [2, 1, 0]
    assert by["rate_real"].tolist() == [0.25, 0.5, 0.0]
    assert by["rate"][:2].tolist() == [1.0, 0.0] and math.isnan(by["rate"][2])
    out = time_outcome(syn, real, top_categories=3)
    # compared over the categories S holds (401, 250): plain R², real mean 0.375
    assert out["mortality_by_category_n"] == 2
    assert out["mortality_by_category_r2"] == pytest.approx(1 - (0.75**2 + 0.5**2) / (2 * 0.125**2))
    assert time_outcome(syn, real, top_categories=4)["mortality_by_category_n"] == 3  # 599 joins


def test_r2_plain_and_ks():
    assert r2_plain([0.1, 0.3], [0.1, 0.3]) == 1.0
    assert r2_plain([0.2, 0.2], [0.2, 0.2]) == 1.0 and r2_plain([0.2, 0.2], [0.2, 0.3]) == 0.0
    assert math.isnan(r2_plain([], []))
    assert r2_plain([0, 0, 0, 1], [0.25] * 4) == pytest.approx(1 - 0.75 / 0.75)  # the mean: 0
    rng = np.random.default_rng(0)
    for n, m in ((50, 70), (200, 13)):
        a, b = rng.exponential(size=n), rng.exponential(1.3, size=m).round(1)
        assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic)
    assert math.isnan(ks_statistic(np.array([]), np.array([1.0])))


def test_wasserstein_and_ks_of_shifted_distributions():
    real = [T(40 + i, [["4019"], ["4019"]], [1 + i, 2 + i], [0, 10 * (i + 1)]) for i in range(4)]
    # stays + 2.5 days, gaps + 7 days, every age + 5 years (later admissions move with the times)
    syn = [T(45 + i, [["4019"], ["4019"]], [3.5 + i, 4.5 + i], [0, 10 * (i + 1) + 7]) for i in range(4)]
    out = time_outcome(syn, real)
    assert out["stay_days_wasserstein"] == pytest.approx(2.5)
    assert out["gap_days_wasserstein"] == pytest.approx(7)
    assert out["gap_days_ks"] == pytest.approx(1 / 4)  # gaps 10..40 vs 17..47
    # stays {1,2,2,3,3,4,4,5} vs the same + 2.5: at x = 3, F_R = 5/8 and F_S = 1/8 (3.5 <= 3? no)
    assert out["stay_days_ks"] == pytest.approx(ks_2samp([1, 2, 2, 3, 3, 4, 4, 5], np.add([1, 2, 2, 3, 3, 4, 4, 5],
                                                                                        2.5)).statistic)
    # second admissions: 5 years older, and (2.5 + 7) days later
    ages_r = np.r_[[40 + i for i in range(4)], [40 + i + (1 + i + 10 * (i + 1)) / 365.25 for i in range(4)]]
    ages_s = np.r_[[45 + i for i in range(4)], [45 + i + (3.5 + i + 10 * (i + 1) + 7) / 365.25 for i in range(4)]]
    assert out["admission_age_wasserstein"] == pytest.approx(np.mean(ages_s) - np.mean(ages_r))
    assert out["admission_age_ks"] == pytest.approx(1.0)


def test_every_violation_is_detected():
    ok = T(60, [["4019"]], [2], [0])
    bad = {
        "times_missing": {**ok, "stay_days": None},
        "length_mismatch": T(60, [["4019"], ["486"]], [2], [0, 3]),
        "nonfinite_time": T(60, [["4019"], ["486"]], [2, float("nan")], [0, 3]),
        "negative_stay": T(60, [["4019"]], [-1], [0]),
        "negative_gap": T(60, [["4019"], ["486"]], [2, 2], [0, -3]),
        "first_gap_nonzero": T(60, [["4019"]], [2], [4]),
        "death_and_death_days": T(60, [["4019"]], [2], [0], death=True, days=5.0),
        "bad_death_days": T(60, [["4019"]], [2], [0], days=-1.0),
        "death_without_visit": T(60, [], [], [], death=True),
        "age_over_cap": T(91, [["4019"]], [2], [0]),
        "age_implausible": T(80, [["4019"], ["4019"]], [2, 2], [0, 50 * 365.25]),
    }
    assert set(bad) == set(VIOLATIONS) == set(VIOLATION_LABELS)
    for name, patient in bad.items():
        found = Times([ok, patient, ok]).violations()
        assert found == {**dict.fromkeys(VIOLATIONS, 0), name: 1, "patients": 1}, name
        out = time_outcome([ok, patient, ok], [ok])
        assert out[f"violations_{name}"] == 1 and out["time_violation_patient_rate"] == pytest.approx(1 / 3)
    assert Times([T(60, [["4019"]], [2], [0], days=float("inf"))]).violations()["bad_death_days"] == 1
    assert Times([T(60, [["4019"]], [2], [0], days=float("nan"))]).violations()["bad_death_days"] == 0  # = None
    # a negative gap and a NaN elsewhere in one patient: two visit flags, one patient
    two = T(60, [["4019"], ["486"], ["486"]], [2, float("inf"), 1], [0, -1, 3])
    found = Times([two]).violations()
    assert (found["negative_gap"], found["nonfinite_time"], found["patients"]) == (1, 1, 1)


def test_no_times_gives_no_figures():
    assert not has_times(untimed(HAND)) and has_times(HAND)
    assert not has_times({"visits": [[["4019"]]], "age": [1.0], "sex": ["F"], "stay_days": [None]})
    assert time_outcome(untimed(HAND), HAND) == {} and time_outcome(HAND, untimed(HAND)) == {}
    cols = {k: [p[k] for p in HAND] for k in HAND[0]}  # a dict of columns reads the same
    assert time_outcome(cols, HAND)["readmission_30d_rate"] == pytest.approx(2 / 5)


# ----------------------------------------------------------------------------- baseline
def _cohort(n, seed, times=True):
    """Patients of 1-3 visits over five categories; in-hospital death only at a last visit that
    holds 486 (probability 0.6): mortality tied to one category."""
    rng = np.random.default_rng(seed)
    codes = np.array(["4019", "25000", "486", "5990", "4280"])
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        visits = [sorted(rng.choice(codes, size=int(rng.integers(1, 3)), replace=False).tolist()) for _ in range(k)]
        death = "486" in visits[-1] and rng.random() < 0.6
        days = None if death or rng.random() > 0.2 else float(rng.uniform(0, 365))
        p = T(float(rng.integers(20, 90)), visits, rng.exponential(6.0, k).round(2),
              np.r_[0.0, rng.exponential(90.0, k - 1).round(2)], death=bool(death), days=days,
              sex="FM"[int(rng.integers(2))])
        out.append(p if times else untimed([p])[0])
    return out


@pytest.fixture(scope="module")
def reference():
    return _cohort(3000, 1)


def test_baseline_draws_times_from_the_marginals(reference):
    sampler = IndependentMarginalSampler.fit(reference)
    base = sampler.sample(4000, seed=2)
    out = time_outcome(base, reference)
    t = Times(reference)
    p = float(t.hospital_death.mean())
    se = math.sqrt(p * (1 - p) / 4000 + p * (1 - p) / len(reference))
    assert abs(out["hospital_mortality_patient_rate"] - p) < 4 * se
    assert abs(out["out_of_hospital_death_rate"] - out["out_of_hospital_death_rate_real"]) < 0.04
    assert out["stay_days_ks"] < 0.04 and out["gap_days_ks"] < 0.05
    assert out["time_violation_patient_rate"] == 0 and out["violations_death_and_death_days"] == 0
    # the real cohort ties death to 486; the baseline ties it to nothing
    assert time_outcome(reference, reference)["mortality_by_category_r2"] == 1.0
    assert -0.5 < out["mortality_by_category_r2"] < 0.1
    by = mortality_by_category(base, reference)
    assert by["rate"].max() - by["rate"].min() < 0.05  # flat across categories
    # its codes, visits and demographics are those of the sampler without times, draw for draw
    plain = IndependentMarginalSampler.fit(untimed(reference)).sample(4000, seed=2)
    assert untimed(base) == plain and "stay_days" not in plain[0]
    assert all(p["gap_days"][0] == 0 for p in base if p["visits"])


# ----------------------------------------------------------------------------- report
def test_report_without_times_is_unchanged(tmp_path):
    train, real, syn = _cohort(300, 3, times=False), _cohort(100, 4, times=False), _cohort(100, 5, times=False)
    result = evaluate_cohorts(syn, real, train, out_dir=tmp_path / "a", n_attack=50)
    # the same cohorts with the fields present but empty read as cohorts without times
    nones = [{**p, **dict.fromkeys(TIME_KEYS)} for p in syn]
    again = evaluate_cohorts(nones, real, train, out_dir=tmp_path / "b", n_attack=50)
    for r in (result, again):
        assert not any(k in row for row in r["rows"].values() for k in ("readmission_30d_rate", "gap_days_ks"))
        assert "time_outcome" not in r["meta"]
    saved = [json.loads((tmp_path / f / "metrics.json").read_text()) for f in "ab"]  # NaN as null: comparable
    assert saved[0]["rows"] == saved[1]["rows"]
    for s in saved:
        del s["meta"]["scoring_seconds"]
    assert saved[0]["meta"] == saved[1]["meta"]
    table = (tmp_path / "a" / "metrics.md").read_text()
    assert table == (tmp_path / "b" / "metrics.md").read_text()
    assert "Time and outcome" not in table and "time_outcome" not in table
    assert sorted(f.name for f in (tmp_path / "a").glob("*.png")) == sorted(PLOTS + UTILITY_PLOTS)
    assert set(saved[0]["rows"]["baseline"]) == set(result["rows"]["baseline"])


def test_report_with_times(tmp_path):
    train, real, syn = _cohort(400, 6), _cohort(150, 7), _cohort(150, 8)
    result = evaluate_cohorts(syn, real, train, out_dir=tmp_path / "out", n_attack=50)
    rows = result["rows"]
    for name in ("synthetic", "floor", "baseline"):
        assert 0 < rows[name]["hospital_mortality_patient_rate"] < 1, name
        assert rows[name]["time_violation_patient_rate"] == 0
    assert rows["synthetic"]["mortality_by_category_r2"] > rows["baseline"]["mortality_by_category_r2"]
    assert "synthetic" in result["meta"]["time_outcome"]
    out = tmp_path / "out"
    for name in (*PLOTS, *TIME_PLOTS):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    table = (out / "metrics.md").read_text()
    assert "## Time and outcome" in table and "| 30-day readmission rate |" in table
    assert "| violations: negative gap (visits) |" in table
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["rows"]["floor"]["readmission_30d_rate"] == pytest.approx(rows["floor"]["readmission_30d_rate"])
    # a synthetic cohort without times: its row has no time figure, the baseline's has
    bare = evaluate_cohorts(untimed(syn), real, train, n_attack=50, plots=False)
    assert "readmission_30d_rate" not in bare["rows"]["synthetic"]
    assert "readmission_30d_rate" in bare["rows"]["baseline"] and "baseline" in bare["meta"]["time_outcome"]
    assert "## Time and outcome" in markdown_table(bare)


def test_read_cohort_keeps_the_time_columns(tmp_path):
    timed, plain = tmp_path / "timed.parquet", tmp_path / "plain.parquet"
    datasets.Dataset.from_list(_cohort(20, 9)).to_parquet(str(timed))
    datasets.Dataset.from_list(_cohort(20, 9, times=False)).to_parquet(str(plain))
    cols = read_cohort(timed)
    assert set(cols) == {"visits", "age", "sex", *TIME_KEYS}
    assert time_outcome(cols, _cohort(20, 9))["stay_days_wasserstein"] == pytest.approx(0, abs=1e-5)
    assert set(read_cohort(plain)) == {"visits", "age", "sex"}
