"""The built-in simulated cohort (issue 3): validity, CMS edits, determinism, shape, round trip."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from promptehr_hf.datasets_scripts import icd9, incidence, simulator
from promptehr_hf.datasets_scripts.simulator import PHENOTYPES, simulate

N = 3000
CORE = {c for ph in PHENOTYPES for cond in ph.conditions for v in cond.variants for c in v.split()}


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    return simulate(N, seed=0)


@pytest.fixture(scope="module")
def large() -> tuple:
    """Visit-by-code incidence (csr, vocabulary) of 40,000 patients (seed 0): enough draws of the
    tail, whose codes are spread thin over many categories."""
    X, vocab = incidence.visit_matrix(simulate(40_000, seed=0))
    return X, np.array(vocab)


def _rows(patients):
    """(codes, ages, sexes) of every diagnosis row."""
    codes, ages, sexes = [], [], []
    for p in patients:
        k = sum(len(v) for v in p["visits"])
        codes.extend(c for v in p["visits"] for c in v)
        ages.extend([p["age"]] * k)
        sexes.extend([p["sex"]] * k)
    return codes, ages, sexes


def test_schema(cohort):
    assert [p["subject_id"] for p in cohort] == list(range(1, N + 1))
    for p in cohort:
        assert set(p) == {"subject_id", "age", "sex", "visits", "stay_days", "gap_days", "hospital_death",
                          "death_days", "procedures", "medications"}
        # times: tests/test_simulator_times.py; procedures, medications: tests/test_simulator_modalities.py
        assert p["sex"] in ("F", "M")
        assert isinstance(p["age"], float) and 0.0 <= p["age"] <= 90.0 and round(p["age"], 2) == p["age"]
        assert 1 <= len(p["visits"]) <= simulator.PARAMS.max_visits
        for v in p["visits"]:
            assert 1 <= len(v) <= simulator.PARAMS.max_codes
            assert len(set(v)) == len(v), f"duplicate code in a visit of {p['subject_id']}"
            assert all(isinstance(c, str) for c in v)


def test_codes_are_billable_v32(cohort):
    codes = set(_rows(cohort)[0])
    assert all(icd9.is_valid(c) for c in codes)
    assert all(icd9.is_billable(c) for c in codes), sorted(c for c in codes if not icd9.is_billable(c))


def test_table_codes_are_billable_v32():
    core = {c for ph in PHENOTYPES for cond in ph.conditions for v in cond.variants for c in v.split()}
    assert len(core) > 300
    assert sorted(c for c in core if not icd9.is_billable(c)) == []


def test_zero_cms_conflicts(cohort):
    codes, ages, sexes = _rows(cohort)
    broken = icd9.violations(codes, ages, sexes)
    assert (broken == "").all(), Counter(zip(np.array(codes)[broken != ""], broken[broken != ""])).most_common(5)
    # The edits are exercised: sex- and age-restricted codes do occur, on the right patients.
    edited = Counter(icd9.edit_of(c) for c in codes if icd9.edit_of(c))
    assert edited["age_newborn"] > 1000 and edited["sex_male_only"] > 0 and edited["sex_female_only"] > 0


def test_deterministic_and_prefix():
    a = simulate(500, seed=7)
    assert a == simulate(500, seed=7)
    assert a == simulate(5000, seed=7)[:500]  # a smaller cohort is the start of a larger one
    assert a != simulate(500, seed=8)


def test_calibrated_shape(cohort):
    """Loose bounds at 3,000 patients (the full-scale table is benchmarks/simulator_calibration.py)."""
    n_adm = np.array([len(p["visits"]) for p in cohort])
    n_codes = np.array([len(v) for p in cohort for v in p["visits"]])
    assert abs(n_adm.mean() - 1.27) < 0.127
    assert abs(n_codes.mean() - 11.3) < 1.13
    assert abs(np.mean([p["sex"] == "M" for p in cohort]) - 0.56) < 0.04
    ages = np.array([p["age"] for p in cohort])
    assert abs((ages == 0).mean() - 0.17) < 0.03
    assert 60 < np.median(ages[ages > 0]) < 70 and (ages == 90).any()
    patients_per_code = Counter(c for p in cohort for c in {c for v in p["visits"] for c in v})
    top = [c for c, _ in patients_per_code.most_common() if not c.startswith("V")][:5]
    assert "4019" in top and "41401" in top


def test_trajectories_depend_on_earlier_admissions(cohort):
    """Chronic codes persist into the next admission far above their base rate; stages progress."""
    multi = [p for p in cohort if len(p["visits"]) >= 2]
    assert len(multi) > 300
    for code in ("4019", "42731"):
        had = [code in p["visits"][1] for p in multi if code in p["visits"][0]]
        base = np.mean([code in p["visits"][1] for p in multi])
        assert np.mean(had) > 0.75 > base + 0.3
    # Newborns: one liveborn code, in the first admission only.
    for p in cohort:
        if p["age"] == 0:
            born = [[c for c in v if c[:3] in ("V30", "V31", "V34")] for v in p["visits"]]
            assert len(born[0]) == 1 and not any(born[1:])


def test_ckd_stage_never_regresses():
    stage = {"5852": 2, "5853": 3, "5854": 4, "5855": 5, "5856": 6}
    moved = 0
    for p in simulate(20000, seed=1):
        seen = [max((stage[c] for c in v if c in stage), default=0) for v in p["visits"]]
        staged = [s for s in seen if s]
        assert staged == sorted(staged), (p["subject_id"], p["visits"])
        moved += len(set(staged)) > 1
    assert moved > 10


def test_within_visit_structure(cohort):
    """Phenotype codes co-occur far above independence (the structure a model must learn)."""
    visits = [set(v) for p in cohort for v in p["visits"]]
    n = len(visits)

    def lift(a, b):
        pa, pb = sum(a in v for v in visits) / n, sum(b in v for v in visits) / n
        return sum(a in v and b in v for v in visits) / n / (pa * pb)

    assert lift("99592", "78552") > 5  # septic shock implies severe sepsis
    assert lift("V3000", "V053") > 3  # newborn codes together
    assert lift("4019", "V3000") == 0  # never an adult code on a newborn


def test_cli_prepare_round_trip(tmp_path):
    """simulate -> MIMIC-III CSVs -> `promptehr prepare` gives back exactly the simulated patients."""
    from promptehr_hf.cli import main
    from promptehr_hf.datasets_scripts.prepare import load_prepared, prepare

    assert main(["simulate", "--patients", "400", "--seed", "3", "--out", str(tmp_path / "csv")]) == 0
    assert {p.name for p in (tmp_path / "csv").iterdir()} == {"PATIENTS.csv", "ADMISSIONS.csv", "DIAGNOSES_ICD.csv",
                                                          "PROCEDURES_ICD.csv", "PRESCRIPTIONS.csv",
                                                          ".promptehr-manifest.json"}
    summary = prepare(tmp_path / "csv", tmp_path / "prepared", seed=0)
    splits = load_prepared(tmp_path / "prepared")
    back = sorted((row for name in splits for row in splits[name].to_list()), key=lambda p: p["subject_id"])
    expected = simulate(400, seed=3)
    assert sum(len(splits[name]) for name in splits) == 400
    for got, want in zip(back, expected):
        assert got["subject_id"] == want["subject_id"] and got["sex"] == want["sex"]
        assert got["visits"] == want["visits"]
        assert got["procedures"] == want["procedures"] and got["medications"] == want["medications"]
        assert np.float32(got["age"]) == np.float32(want["age"])
        # The times come back: stays and gaps to the second (float32), deaths exactly, a death after
        # discharge to the day (MIMIC-III's DOD is a date).
        for key in ("stay_days", "gap_days"):
            assert np.allclose(got[key], want[key], rtol=0, atol=1e-3)
        assert got["hospital_death"] == want["hospital_death"]
        assert (got["death_days"] is None) == (want["death_days"] is None)
        if want["death_days"] is not None:
            assert abs(got["death_days"] - want["death_days"]) < 1.0
    # A clean folder: nothing to repair except MIMIC's >89 age shift, which the writer reproduces.
    assert summary["admissions"] == sum(len(p["visits"]) for p in expected)
    assert summary["diagnosis_rows"] == sum(len(v) for p in expected for v in p["visits"])
    assert {k: v for k, v in summary["quirks"].items() if v and k != "ages_capped"} == {}
    assert summary["quirks"]["ages_capped"] >= sum(len(p["visits"]) for p in expected if p["age"] == 90.0) > 0


def _categories(lo: int, hi: int) -> set[str]:
    return {f"{i:03d}" for i in range(lo, hi + 1)}


# (markers of phenotype A, markers of phenotype B, tail categories both phenotypes cover)
MARKED = (
    ({"0389", "03811", "03842", "99592", "78552"}, {"5852", "5853", "5854", "5855", "5856", "5859"},
     _categories(590, 599)),  # sepsis vs renal (CKD)
    ({"E8120", "E8147", "E8160", "E8190", "E8261", "E9600", "E9654"}, {"82000", "82009", "82021", "8208", "E8497"},
     _categories(820, 829) | _categories(850, 854) | _categories(920, 924)),  # trauma vs falls
)


def test_tail_codes_inside_a_category_depend_on_the_phenotype(large):
    """Two phenotypes sharing a tail category write different codes of it. Visits are labelled by
    core codes only one of the two phenotypes writes; a group's rate of each tail code minus its
    rate in the visits with neither label (the background and the other phenotypes, common to
    both) is the phenotype's own share; per category, the total variation between the two
    groups' normalised shares. Mean over the categories: 0.76 with the simulator's blocks of
    codes per phenotype; 0.58 when every phenotype writes every code of the category (Zipf over
    a ranking seeded per phenotype)."""
    X, vocab = large
    cats = np.array([icd9.category(c) for c in vocab])
    tail = ~np.isin(vocab, sorted(CORE))
    tvs = []
    for marks_a, marks_b, shared in MARKED:
        has_a = np.asarray(X[:, np.flatnonzero(np.isin(vocab, sorted(marks_a)))].sum(axis=1)).ravel() > 0
        has_b = np.asarray(X[:, np.flatnonzero(np.isin(vocab, sorted(marks_b)))].sum(axis=1)).ravel() > 0
        groups = (has_a & ~has_b, has_b & ~has_a, ~has_a & ~has_b)
        count_a, count_b, _ = (np.asarray(X[g].sum(axis=0)).ravel() for g in groups)
        rate_a, rate_b, rate_rest = (np.asarray(X[g].sum(axis=0)).ravel() / g.sum() for g in groups)
        for cat in sorted(shared):
            sel = (cats == cat) & tail
            if count_a[sel].sum() < 10 or count_b[sel].sum() < 10:
                continue
            own_a = np.maximum(rate_a[sel] - rate_rest[sel], 0.0)
            own_b = np.maximum(rate_b[sel] - rate_rest[sel], 0.0)
            if own_a.sum() > 0 and own_b.sum() > 0:
                tvs.append(0.5 * np.abs(own_a / own_a.sum() - own_b / own_b.sum()).sum())
    assert len(tvs) >= 15
    assert np.mean(tvs) > 0.7, np.round(tvs, 2)


def test_tail_pairs_tie_codes_not_categories(large):
    """Code pairs written together: for many cross-category pairs (a, b), P(b | a) is high and far
    above P(b | a code of a's category), so the coupling lives at code level, not category level.
    The same holds for the core's coupled variants (25040 with 58381, not any 250.x with 583.x)."""
    X, vocab = large
    M, groups = incidence.group_columns(vocab, icd9.category)
    cat_of = M.indices  # one category per code
    co = incidence.cooccurrence(X)
    per_code = co.diagonal()
    Y = incidence.collapse(X, M)  # visit has a code of the category
    per_cat = np.asarray(Y.sum(axis=0)).ravel()
    cat_code = (Y.T.astype(np.int64) @ X.astype(np.int64)).tocsr()  # [category, code] visit counts
    pairs = co.tocoo()
    a, b, n_ab = pairs.row, pairs.col, pairs.data
    keep = (cat_of[a] != cat_of[b]) & (n_ab >= 5)
    a, b, n_ab = a[keep], b[keep], n_ab[keep]
    p_code = n_ab / per_code[a]
    p_cat = np.asarray(cat_code[cat_of[a], b]).ravel() / per_cat[cat_of[a]]
    coupled = (p_code >= 0.5) & (p_code >= 10 * p_cat)
    tail = ~np.isin(vocab, sorted(CORE))
    assert (coupled & tail[a] & tail[b]).sum() >= 100, coupled.sum()  # ~480; 0 without tail pairs

    i, j = (int(np.flatnonzero(vocab == c)[0]) for c in ("25040", "58381"))
    g, h = (groups.index(c) for c in ("250", "583"))
    with_250 = Y[:, g].toarray().ravel() > 0
    assert co[i, j] / per_code[i] > 0.8  # the variant writes 58381 with 25040 ...
    assert Y[with_250, h].sum() / with_250.sum() < 0.1  # ... while a 250.x visit seldom has any 583.x
