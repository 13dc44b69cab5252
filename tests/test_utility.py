"""metrics.utility (train on synthetic, test on real) on hand-built cohorts whose answers are known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from promptehr_hf.metrics.report import PLOTS, TIME_PLOTS, UTILITY_PLOTS, evaluate_cohorts
from promptehr_hf.metrics.utility import CHRONIC_ICD9, flat_figures, utility, utility_rows, weighted_auc

FILLERS = [f"{c}0" for c in range(800, 830)]  # 30 categories (injuries), none of them chronic


def _cohort(n: int, seed: int, *, coupled: bool = True, times: bool = True, fillers: int = 0) -> list[dict]:
    """Two visits each: visit 1 holds 401 (hypertension) or 486 (pneumonia); visit 2 holds 250
    (diabetes) exactly when visit 1 holds 401 (``coupled``; else by a coin), else 599; the patient
    dies in hospital at visit 2 exactly when it holds 250 (``coupled``; else by a coin). Each
    visit also holds ``fillers`` codes drawn from FILLERS, unrelated to anything."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = bool(rng.random() < 0.5)
        b = a if coupled else bool(rng.random() < 0.5)
        died = b if coupled else bool(rng.random() < 0.5)
        extra = [list(rng.choice(FILLERS, size=fillers, replace=False)) for _ in range(2)]
        p = {"subject_id": i + 1, "age": float(rng.integers(20, 90)), "sex": "FM"[int(rng.integers(2))],
             "visits": [(["4019"] if a else ["486"]) + extra[0], (["25000"] if b else ["5990"]) + extra[1]]}
        if times:
            p |= {"stay_days": [2.0, 3.0], "gap_days": [0.0, 40.0], "hospital_death": died, "death_days": None}
        out.append(p)
    return out


def test_weighted_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    score = rng.integers(0, 15, 400).astype(float)  # many ties
    y = rng.random(400) < 0.2 + score / 30
    w = rng.integers(0, 4, 400).astype(float)
    auroc, auprc = weighted_auc(score, y, np.stack([np.ones(400), w]))
    assert auroc[0] == pytest.approx(roc_auc_score(y, score))
    assert auprc[0] == pytest.approx(average_precision_score(y, score))
    assert auroc[1] == pytest.approx(roc_auc_score(y, score, sample_weight=w))
    assert auprc[1] == pytest.approx(average_precision_score(y, score, sample_weight=w))
    one_class = weighted_auc(score, np.zeros(400, bool), np.ones((1, 400)))
    assert np.isnan(one_class[0][0]) and np.isnan(one_class[1][0])


def test_perfectly_predictable_tasks_score_one_both_ways():
    train, test, syn = _cohort(400, 1), _cohort(300, 2), _cohort(300, 3)
    out = utility(syn, train, test, n_bootstrap=100)
    task = out["tasks"]["next_admission_250"]
    assert task["status"] == "ok" and task["real"]["auroc"] == 1.0 and task["synthetic"]["auroc"] == 1.0
    assert task["auroc_ratio"] == 1.0 and task["synthetic"]["auprc"] == 1.0
    assert out["next_admission_auroc"] == out["next_admission_auroc_real"] == 1.0
    assert out["mortality_auroc"] == out["mortality_auroc_real"] == 1.0 and out["mortality_tasks"] == 1
    # phenotype: the chronic categories present (401, 250), each predicted from the rest of its visit
    assert set(k for k, t in out["tasks"].items() if t["group"] == "phenotype") == {"phenotype_401", "phenotype_250"}
    assert {"401", "250"} <= set(CHRONIC_ICD9)
    # next-admission targets: the categories of the visits that follow another (401 and 486 never do)
    assert {k for k, t in out["tasks"].items() if t["group"] == "next_admission"} == \
        {"next_admission_250", "next_admission_599"}
    assert out["next_admission_tasks"] == 2 and out["next_admission_skipped"] == 0 and not out["skipped"]


def test_noise_synthetic_cohort_trains_a_chance_model():
    """Labels independent of the features in the synthetic cohort: its model ranks the real test
    patients by noise (AUROC about 0.5 on average over cohorts; one cohort's sign can go either
    way), while the real-trained model stays near perfect."""
    train, test = _cohort(800, 4, fillers=3), _cohort(1000, 5, fillers=3)
    found = {"mortality": [], "next_admission_250": []}
    for seed in range(6):
        noise = _cohort(1000, 100 + seed, coupled=False, fillers=3)
        out = utility(noise, train, test, tasks=("mortality", "next_admission"), n_bootstrap=50)
        for name in found:
            task = out["tasks"][name]
            assert task["real"]["auroc"] > 0.97, (name, task["real"])
            assert task["synthetic"]["auroc_ci"][0] < 0.75
            found[name].append(task["synthetic"]["auroc"])
    for name, values in found.items():
        assert abs(np.mean(values) - 0.5) < 0.1, (name, values)
    assert "phenotype_auroc" not in out


def test_mortality_needs_the_outcome_in_both_cohorts():
    train, test, syn = _cohort(200, 7, times=False), _cohort(200, 8, times=False), _cohort(200, 9, times=False)
    out = utility(syn, train, test, n_bootstrap=20)
    assert "no in-hospital outcome" in out["skipped"]["mortality"] and out["tasks"]["mortality"]["status"] == "skipped"
    assert np.isnan(out["mortality_auroc"]) and out["mortality_tasks"] == 0 and out["mortality_skipped"] == 1
    assert out["next_admission_auroc"] == 1.0  # the rest runs
    # a synthetic cohort without times against timed real cohorts: only its side is skipped
    out = utility(syn, _cohort(200, 7), _cohort(200, 8), tasks=("mortality",), n_bootstrap=20)
    task = out["tasks"]["mortality"]
    assert task["status"] == "skipped" and task["real"]["auroc"] == 1.0 and "synthetic" in task["reason"]


def test_single_class_training_side_is_skipped():
    train, test = _cohort(300, 10), _cohort(300, 11)
    syn = [{**p, "visits": [p["visits"][0], ["5990"]], "hospital_death": False} for p in _cohort(300, 12)]
    out = utility(syn, train, test, n_bootstrap=20)
    task = out["tasks"]["next_admission_250"]
    assert task["status"] == "skipped" and "one class" in task["synthetic"]["skipped"]
    assert task["real"]["auroc"] == 1.0 and "next_admission_250" in out["skipped"]
    # test labels of one class: the whole task is skipped
    only_250 = [p for p in test if p["visits"][1] == ["25000"]]
    out = utility(train, train, only_250, n_bootstrap=20)
    assert out["tasks"]["next_admission_250"]["status"] == "skipped"
    assert out["skipped"]["next_admission_250"] == "real_test labels: one class only (all 1)"
    assert "real" not in out["tasks"]["next_admission_250"]


def test_bootstrap_intervals_hold_the_point_estimate():
    train, test = _cohort(500, 13), _cohort(400, 14)
    syn = _cohort(500, 15, coupled=False)
    for i, p in enumerate(syn):  # partly informative: half the patients follow the rule
        if i % 2:
            p["visits"][1] = ["25000"] if p["visits"][0] == ["4019"] else ["5990"]
    out = utility(syn, train, test, n_bootstrap=200, seed=3)
    checked = 0
    for task in out["tasks"].values():
        if task["status"] != "ok":
            continue
        for side in ("real", "synthetic"):
            for metric in ("auroc", "auprc"):
                lo, hi = task[side][f"{metric}_ci"]
                assert lo <= task[side][metric] <= hi, (task, side, metric)
                checked += 1
        lo, hi = task["auroc_ratio_ci"]
        assert lo <= task["auroc_ratio"] <= hi
    assert checked >= 8
    for group in ("mortality", "next_admission", "phenotype"):
        assert out[f"{group}_auroc_ci_low"] <= out[f"{group}_auroc"] <= out[f"{group}_auroc_ci_high"]
    again = utility(syn, train, test, n_bootstrap=200, seed=3)
    assert json.dumps(again["tasks"]) == json.dumps(out["tasks"])  # deterministic for a seed


def test_rows_share_the_real_models_and_flatten_for_the_report():
    train, test, syn = _cohort(300, 16), _cohort(300, 17), _cohort(300, 18, coupled=False)
    both = utility_rows({"synthetic": _cohort(300, 19), "baseline": syn}, train, test, n_bootstrap=20)
    assert both["synthetic"]["next_admission_auroc_real"] == both["baseline"]["next_admission_auroc_real"]
    assert both["synthetic"]["next_admission_auroc"] > both["baseline"]["next_admission_auroc"]
    real = flat_figures(both["synthetic"], "real")
    mine = flat_figures(both["synthetic"])
    assert real["utility_next_admission_auroc"] == both["synthetic"]["next_admission_auroc_real"]
    assert "utility_next_admission_auroc_ratio" in mine and "utility_next_admission_auroc_ratio" not in real
    with pytest.raises(ValueError, match="unknown task"):
        utility(syn, train, test, tasks=("los",))


def test_icd10_cohorts_use_the_icd10_chronic_list():
    def icd10(cohort):
        codes = {"4019": "I10", "486": "J189", "25000": "E119", "5990": "N390"}
        return [{**p, "visits": [[codes[c] for c in v] for v in p["visits"]]} for p in cohort]

    out = utility(icd10(_cohort(300, 20)), icd10(_cohort(300, 21)), icd10(_cohort(300, 22)),
                  code_system="icd10cm", n_bootstrap=20)
    assert {"phenotype_I10", "phenotype_E11"} <= set(out["tasks"]) and out["phenotype_auroc"] == 1.0
    assert out["tasks"]["next_admission_E11"]["synthetic"]["auroc"] == 1.0


def test_evaluate_module_loads_by_path_and_computes(repo_root, tmp_path):
    code = textwrap.dedent("""
        import json, evaluate
        def patient(a, age):
            return {"visits": [["4019"] if a else ["486"], ["25000"] if a else ["5990"]], "age": age,
                    "sex": "FM"[int(age) % 2], "hospital_death": a}
        real = [patient(i % 2 == 0, 40.0 + i % 50) for i in range(200)]
        cols = {k: [p[k] for p in real] for k in ("visits", "age", "sex")}
        metric = evaluate.load("metrics/ehr_utility")
        out = metric.compute(**cols, real_train=real, real_test=real, n_bootstrap=20)
        bare = metric.compute(**cols, real_train=real, real_test=real, n_bootstrap=0,
                              hospital_death=[p["hospital_death"] for p in real])
        try:
            metric.compute(**cols, real_train=real)
            err = None
        except ValueError as e:
            err = str(e)
        print(json.dumps({"a": out["next_admission_auroc"], "m": out["skipped"].get("mortality"),
                          "b": bare["mortality_auroc"], "ci": bare["mortality_auroc_ci_low"], "err": err,
                          "doc": "train on synthetic" in metric.description.lower()}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["a"] == 1.0 and "synthetic" in out["m"]  # no hospital_death given: the synthetic side is skipped
    assert out["b"] == 1.0 and np.isnan(out["ci"])  # no resample: no interval
    assert "real_train" in out["err"] and out["doc"]


def test_report_gains_the_utility_section_and_nothing_else_changes(tmp_path):
    train, real, syn = _cohort(300, 30), _cohort(150, 31), _cohort(150, 32)
    with_u = evaluate_cohorts(syn, real, train, out_dir=tmp_path / "a", n_attack=50)
    evaluate_cohorts(syn, real, train, out_dir=tmp_path / "b", n_attack=50, utility=False)
    rows = with_u["rows"]
    assert rows["synthetic"]["utility_next_admission_auroc"] == 1.0
    assert rows["floor"]["utility_next_admission_auroc"] == with_u["utility"]["synthetic"]["next_admission_auroc_real"]
    assert "utility_next_admission_auroc_ratio" in rows["baseline"]
    assert rows["baseline"]["utility_mortality_auroc"] < 0.9  # the sampler's deaths ignore the codes
    a, b = (tmp_path / "a" / "metrics.md").read_text(), (tmp_path / "b" / "metrics.md").read_text()
    start, end = a.index("## Utility"), a.index("Definitions:")
    assert a[:start] + a[end:] == b and "| chronic phenotypes, mean AUROC | 1 [1.000, 1.000] |" in a
    saved = [json.loads((tmp_path / f / "metrics.json").read_text()) for f in "ab"]
    for name in ("synthetic", "floor", "baseline"):
        assert {k: v for k, v in saved[0]["rows"][name].items() if not k.startswith("utility_")} == \
            saved[1]["rows"][name]
    assert "utility" not in saved[1] and set(saved[0]["utility"]) == {"synthetic", "baseline"}
    assert "utility" in saved[0]["meta"] and "utility" not in saved[1]["meta"]
    pngs = {p.name for p in (tmp_path / "a").glob("*.png")}
    assert pngs == set(PLOTS + TIME_PLOTS + UTILITY_PLOTS)
    assert {p.name for p in (tmp_path / "b").glob("*.png")} == set(PLOTS + TIME_PLOTS)
    # without a training split there is nothing to compare with: no utility
    bare = evaluate_cohorts(syn, real, plots=False)
    assert "utility" not in bare and not any(k.startswith("utility_") for k in bare["rows"]["synthetic"])


def test_cli_no_utility(tmp_path):
    import datasets

    from promptehr_hf.cli import main

    for name, cohort in (("train", _cohort(200, 40)), ("real", _cohort(80, 41)), ("syn", _cohort(80, 42))):
        datasets.Dataset.from_list(cohort).to_parquet(str(tmp_path / f"{name}.parquet"))
    args = ["evaluate", "--real", str(tmp_path / "real.parquet"), "--synthetic", str(tmp_path / "syn.parquet"),
            "--train", str(tmp_path / "train.parquet"), "--no-plots", "--n-attack", "30"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--no-utility"]) == 0
    assert "## Utility" in (tmp_path / "a" / "metrics.md").read_text()
    assert "## Utility" not in (tmp_path / "b" / "metrics.md").read_text()
