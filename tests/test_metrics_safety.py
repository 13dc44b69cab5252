"""Metrics that must neither lose data nor call a leak safe: privacy on a copy of the training
set, ties in the attacks, dotted codes, codes outside ICD-9-CM, empty cohorts."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from promptehr_hf.cli import main
from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.datasets_scripts.cohort_io import write_parquet
from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.metrics.coherence import Cohort, coherence, unknown_codes
from promptehr_hf.metrics.privacy import privacy
from promptehr_hf.metrics.report import evaluate_cohorts


def P(age, sex, *visits):
    return {"subject_id": 0, "age": float(age), "sex": sex, "visits": [list(v) for v in visits]}


@pytest.fixture(scope="module")
def population() -> dict[str, list[dict]]:
    """Three disjoint cohorts of one simulated population: train, held-out, and an independent
    draw standing for a generator that learned the population and nothing about its patients."""
    patients = simulate(6000, seed=11)
    order = np.random.default_rng(0).permutation(len(patients))
    shuffled = [patients[i] for i in order]
    return {"train": shuffled[:2000], "holdout": shuffled[2000:4000], "independent": shuffled[4000:]}


# ----------------------------------------------------------------------------- privacy
def test_membership_rule_counts_ties_at_the_median():
    # S = T; the first held-out patient is identical to a training one. Distances to S: members
    # 0, 0, 0, 0; non-members 0, 2, 3, 3: the median is 0, "d < 0" calls nobody a member,
    # "d <= 0" calls 5 of 8 (closer to 4): right on 4 members and 3 non-members.
    T = [P(30, "F", "ab"), P(40, "M", "cd"), P(50, "F", "e"), P(60, "M", "fgh")]
    H = [P(30, "F", "ab"), P(40, "F", "y"), P(50, "M", "zw"), P(60, "M", "yq")]
    out = privacy(T, T, H)
    assert out["membership_inference_accuracy"] == pytest.approx(7 / 8)
    assert out["membership_inference_auc"] == pytest.approx(7 / 8)  # (4 x (1/2 + 3)) / 16
    # The other side when that is closer to half: members at 0, 0, 2, 2 and non-members at
    # 2, 2, 2, 2; the median is 2, "d < 2" calls 2 (off by 2), "d <= 2" all 8 (off by 4).
    T = [P(30, "F", "ab"), P(40, "M", "cd"), P(50, "F", "ef"), P(60, "M", "gh")]
    S = [P(30, "F", "ab"), P(40, "M", "cd"), P(50, "F", "eg")]
    H = [P(30, "F", "ax"), P(40, "F", "cy"), P(50, "M", "ez"), P(60, "M", "aw")]
    assert privacy(S, T, H)["membership_inference_accuracy"] == pytest.approx(6 / 8)


def test_privacy_figures_flag_a_copy_of_the_training_set(population):
    train, holdout = population["train"], population["holdout"]
    for n_attack in (2000, 300):  # 300: the targets are a sample, the copies are still found
        out = privacy(train, train, holdout, n_attack=n_attack)
        assert out["exact_copy_rate"] == 1.0
        assert out["membership_inference_accuracy"] >= 0.90 and out["membership_inference_auc"] >= 0.90
        assert out["aa_train"] <= 0.05 and out["aa_holdout"] == pytest.approx(0.5, abs=0.04)
        assert out["nnaar"] >= 0.40
        assert out["attribute_inference_risk"] >= 0.5 and out["sex_inference_f1"] >= 0.9
    # What caps membership below 1: held-out patients that are some training patient's code set.
    code_sets = {frozenset(c for v in p["visits"] for c in v) for p in train}
    held_on_copy = np.mean([frozenset(c for v in p["visits"] for c in v) in code_sets for p in holdout])
    assert 0 < held_on_copy < 0.15
    out = privacy(train, train, holdout)
    assert out["membership_inference_accuracy"] == pytest.approx(1 - held_on_copy / 2, abs=0.03)


def test_privacy_figures_of_an_independent_real_cohort_are_ideal(population):
    out = privacy(population["independent"], population["train"], population["holdout"])
    assert out["membership_inference_accuracy"] == pytest.approx(0.5, abs=0.05)
    assert out["membership_inference_auc"] == pytest.approx(0.5, abs=0.05)
    # ties counted by share: the adversarial accuracies sit at 1/2, not below it
    assert out["aa_train"] == pytest.approx(0.5, abs=0.03) and out["aa_holdout"] == pytest.approx(0.5, abs=0.03)
    assert out["nnaar"] == pytest.approx(0.0, abs=0.03)
    assert out["attribute_inference_risk"] == pytest.approx(0.0, abs=0.03)
    assert out["exact_copy_rate"] == pytest.approx(out["holdout_exact_copy_rate"], abs=0.03)


# ----------------------------------------------------------------------------- codes
def _dotted(code: str) -> str:
    head = 4 if code.startswith("E") else 3
    return code[:head] + "." + code[head:] if len(code) > head else code


def _with_dots(patients: list[dict]) -> list[dict]:
    return [{**p, "visits": [[_dotted(c) for c in v] for v in p["visits"]]} for p in patients]


def test_dotted_codes_are_the_same_codes_everywhere(population):
    real = population["train"][:500]
    dotted = _with_dots(real)
    assert any("." in c for p in dotted for v in p["visits"] for c in v)
    out = coherence(dotted, real)
    assert out["code_js"] == 0 and out["category_js"] == 0 and out["r2_pair_prevalence"] == 1.0
    assert out["code_coverage"] == 1.0 and out["unknown_code_rate"] == 0
    assert out["distinct_codes"] == out["distinct_codes_real"]
    priv = privacy(dotted, real, population["holdout"][:500])
    assert priv["exact_copy_rate"] == 1.0 and priv["membership_inference_accuracy"] >= 0.9
    assert Cohort(dotted, inc.build_vocab(real), "synthetic").X.nnz == Cohort(real, inc.build_vocab(real), "r").X.nnz
    assert inc.cohort_visits([P(1, "F", ["401.9", " e880.0 "])]) == [[["4019", "E8800"]]]


def test_codes_outside_icd9_are_counted_and_warned(population):
    real, holdout = population["train"][:300], population["holdout"][:300]
    syn = [P(40, "F", ["XYZ99", "4019"], ["40.19"]), P(50, "M", ["XYZ99"])] + real[:50]
    found = unknown_codes(syn)
    assert (found["n_unknown"], found["n_distinct_unknown"]) == (3, 2)
    assert found["examples"] == ["XYZ99", "40.19"]
    with pytest.warns(UserWarning, match=r"synthetic cohort: 3 of [\d,]+ listed codes \(2 distinct\) are not "
                      r"ICD-9-CM v32 diagnosis codes, e.g. 'XYZ99', '40.19'"):
        result = evaluate_cohorts(syn, holdout, real, baseline=False, plots=False, n_attack=100)
    assert result["rows"]["synthetic"]["unknown_code_rate"] > 0


# ----------------------------------------------------------------------------- empty cohorts
def test_evaluate_refuses_an_empty_cohort(population, tmp_path, capsys):
    assert inc.cohort_column([], "age") == [] and inc.cohort_visits([]) == []
    empty, real, train = tmp_path / "empty.parquet", tmp_path / "real.parquet", tmp_path / "train.parquet"
    write_parquet([], empty)
    datasets.Dataset.from_list(population["holdout"][:100]).to_parquet(str(real))
    datasets.Dataset.from_list(population["train"][:200]).to_parquet(str(train))
    out = tmp_path / "report"
    assert main(["evaluate", "--real", str(real), "--synthetic", str(empty), "--train", str(train),
                 "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "--synthetic" in err and "no patients" in err and not out.exists()
    with pytest.raises(ValueError, match="synthetic cohort has no patients"):
        evaluate_cohorts([], population["holdout"][:50])
    # a non-empty one is scored as before
    assert main(["evaluate", "--real", str(real), "--synthetic", str(real), "--train", str(train),
                 "--out", str(out), "--no-plots", "--n-attack", "50"]) == 0
    assert json.loads((out / "metrics.json").read_text())["meta"]["n_synthetic"] == 100
