"""Metrics: hand-computed values on tiny cohorts, the evaluate modules, the baseline, the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.metrics.baselines import IndependentMarginalSampler
from promptehr_hf.metrics.coherence import coherence, js_divergence, r2_halo
from promptehr_hf.metrics.privacy import privacy


def P(age, sex, *visits):
    return {"subject_id": 0, "age": float(age), "sex": sex, "visits": [list(v) for v in visits]}


# Real: 3 visits; codes 4019 x3, 25000 x2, 41401 x2 (41401 carries the adult edit: fine at 40, 50).
REAL = [P(40, "F", ["4019", "25000"], ["4019", "41401"]), P(50, "M", ["4019", "25000", "41401"])]
# Synthetic: 4 visits; 486 listed twice in a visit; 650 (female-only, maternity) on a man of 45.
SYN = [P(60, "M", ["4011", "486", "486"]), P(30, "F", ["4019", "25000"], ["650"]), P(45, "M", ["650"])]


def kl2(p, q):
    return sum(a * math.log2(a / b) for a, b in zip(p, q) if a > 0)


def js2(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return 0.5 * kl2(p, m) + 0.5 * kl2(q, m)


def r2(r, s):
    mean = sum(r) / len(r)
    return 1 - sum((a - b) ** 2 for a, b in zip(r, s)) / sum((a - mean) ** 2 for a in r)


@pytest.fixture(scope="module")
def tiny():
    return coherence(SYN, REAL, top_k=2, min_real_count=3)


# ----------------------------------------------------------------------------- coherence, by hand
def test_code_and_category_js_by_hand(tiny):
    # codes in sorted order: 25000, 4011, 4019, 41401, 486, 650 (visit occurrences; 486 once)
    p_syn = [1 / 6, 1 / 6, 1 / 6, 0, 1 / 6, 2 / 6]
    p_real = [2 / 7, 0, 3 / 7, 2 / 7, 0, 0]
    assert tiny["code_js"] == pytest.approx(js2(p_syn, p_real))
    # categories 250, 401 (4011 + 4019), 414, 486, 650
    c_syn = [1 / 6, 2 / 6, 0, 1 / 6, 2 / 6]
    c_real = [2 / 7, 3 / 7, 2 / 7, 0, 0]
    assert tiny["category_js"] == pytest.approx(js2(c_syn, c_real))
    assert tiny["category_js"] < tiny["code_js"]


def test_top_k_by_hand(tiny):
    # real top-2: 4019 (3), then the 25000/41401 tie goes to the smaller string 25000;
    # synthetic top-2: 650 (2), then the four-way tie at 1 goes to 25000.
    assert tiny["top_k"] == 2
    assert tiny["top_k_overlap"] == pytest.approx(1 / 2)
    assert tiny["top_k_jaccard"] == pytest.approx(1 / 3)


def test_halo_r2_by_hand(tiny):
    # per-visit code prevalence over the union of codes (real / 3 visits, synthetic / 4 visits)
    assert tiny["r2_code_prevalence"] == pytest.approx(
        r2([2 / 3, 0, 1, 2 / 3, 0, 0], [1 / 4, 1 / 4, 1 / 4, 0, 1 / 4, 2 / 4]))
    # within-visit pairs: (25000,4019) (4019,41401) (25000,41401) (4011,486)
    assert tiny["r2_pair_prevalence"] == pytest.approx(r2([2 / 3, 2 / 3, 1 / 3, 0], [1 / 4, 0, 0, 1 / 4]))
    # consecutive visits: real 4019->4019, 4019->41401, 25000->4019, 25000->41401 (1 visit pair);
    # synthetic 4019->650, 25000->650 (1 visit pair): disjoint keys
    assert tiny["r2_consecutive_prevalence"] == pytest.approx(r2([1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]))
    assert tiny["r2_consecutive_prevalence"] == pytest.approx(-3.5)


def test_cooccurrence_by_hand(tiny):
    # synthetic pairs: (4011,486) in 0 real visits, (25000,4019) in 2
    assert tiny["cooccurrence_score"] == pytest.approx(1.0)
    assert tiny["cooccurrence_seen_share"] == pytest.approx(0.5)


def test_validity_by_hand(tiny):
    # 6 visit occurrences; only 650 on the man of 45 breaks an edit (sex_female_only)
    assert tiny["cms_invalid_code_rate"] == pytest.approx(1 / 6)
    assert tiny["cms_invalid_patient_rate"] == pytest.approx(1 / 3)
    assert tiny["cms_invalid_patient_rate_real"] == 0
    assert tiny["unknown_code_rate"] == 0
    assert tiny["duplicate_rate"] == pytest.approx(1 / 7)  # 7 listed, 6 distinct per visit


def test_diversity_by_hand(tiny):
    assert tiny["distinct_codes"] == 5 and tiny["distinct_codes_real"] == 3
    assert tiny["code_coverage"] == pytest.approx(2 / 3)  # 25000, 4019 of 25000, 4019, 41401
    assert tiny["code_coverage_frequent"] == 1.0  # min_real_count=3: only 4019
    assert tiny["top_code"] == "650" and tiny["top_code_share"] == pytest.approx(2 / 3)
    assert tiny["top_code_share_real"] == 1.0  # 4019 in both real patients
    assert tiny["distinct_patient_share"] == 1.0


def test_structure_by_hand(tiny):
    assert tiny["visits_per_patient_mean"] == pytest.approx(4 / 3)
    assert tiny["visits_per_patient_mean_real"] == 1.5
    assert tiny["visits_per_patient_wasserstein"] == pytest.approx(1 / 6)  # [1,2,1] vs [2,1]
    assert tiny["visits_per_patient_tv"] == pytest.approx(1 / 6)
    assert tiny["codes_per_visit_mean"] == 1.5 and tiny["codes_per_visit_mean_real"] == pytest.approx(7 / 3)
    assert tiny["codes_per_visit_wasserstein"] == pytest.approx(5 / 6)  # [2,2,1,1] vs [2,2,3]
    assert tiny["codes_per_visit_tv"] == pytest.approx(0.5)
    assert tiny["age_wasserstein"] == pytest.approx(25 / 3)  # [60,30,45] vs [40,50]
    assert tiny["female_share"] == pytest.approx(1 / 3) and tiny["female_share_real"] == 0.5


def test_identical_cohorts_are_perfect():
    out = coherence(REAL, REAL)
    assert out["code_js"] == 0 and out["category_js"] == 0
    assert out["r2_code_prevalence"] == out["r2_pair_prevalence"] == out["r2_consecutive_prevalence"] == 1.0
    assert out["top_k_overlap"] == out["top_k_jaccard"] == 1.0
    assert out["code_coverage"] == 1.0 and out["cooccurrence_seen_share"] == 1.0
    assert out["visits_per_patient_wasserstein"] == out["codes_per_visit_tv"] == out["age_wasserstein"] == 0


def test_disjoint_code_sets_give_js_one():
    other = [P(40, "F", ["486", "5990"]), P(70, "M", ["4280"])]
    out = coherence(other, REAL)
    assert out["code_js"] == pytest.approx(1.0) and out["category_js"] == pytest.approx(1.0)
    assert out["top_k_overlap"] == 0 and out["code_coverage"] == 0 and out["cooccurrence_seen_share"] == 0


def test_duplicates_unknown_codes_and_distinct_patients():
    syn = [P(30, "F", ["4019", "4019"]), P(30, "F", ["4019"]), P(31, "M", ["XYZ99", "4019"])]
    out = coherence(syn, REAL)
    assert out["duplicate_rate"] == pytest.approx(1 / 5)
    assert out["unknown_code_rate"] == pytest.approx(1 / 4)  # XYZ99 among 4 visit occurrences
    # patients 0 and 1 are the same visit set {4019}: 2 distinct of 3
    assert out["distinct_patient_share"] == pytest.approx(2 / 3)


def test_r2_and_js_edge_cases():
    assert r2_halo(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 1.0  # constant, exact
    assert r2_halo(np.array([0.5, 0.5]), np.array([0.5, 0.1])) == 0.0  # constant, missed
    assert math.isnan(r2_halo(np.zeros(3), np.zeros(3)))  # no key
    assert js_divergence([1, 0], [0, 1]) == 1.0 and js_divergence([2, 2], [1, 1]) == 0.0


def test_bad_demographics_name_the_row():
    with pytest.raises(ValueError, match="synthetic cohort, patient row 1"):
        coherence([P(30, "F", ["4019"]), P(30, "U", ["4019"])], REAL)


# ----------------------------------------------------------------------------- privacy, by hand
T = [P(30, "F", "ab"), P(40, "M", "cd"), P(50, "F", "e"), P(60, "M", "fgh")]
H = [P(30, "F", "abx"), P(40, "F", "y"), P(50, "M", "zw"), P(60, "M", "yq")]


def test_privacy_of_a_copy_by_hand():
    out = privacy(T, T, H, n_known_codes=2)
    assert out["exact_copy_rate"] == 1.0 and out["holdout_exact_copy_rate"] == 0.0
    # distances to the nearest synthetic patient: members 0,0,0,0; non-members 1,2,3,3
    assert out["membership_inference_accuracy"] == 1.0 and out["membership_inference_auc"] == 1.0
    # AA_train = 0 (every train patient sits on its copy). AA_holdout, share of own-side nearest
    # neighbours: H side abx 0, y 1, zw 1/2 (y and e at 3), yq 1; S side ab 0, cd 1/2 (e and y
    # at 3), e 0 (y at 2), fgh 1/2 (e and y at 4): 1/2 (2.5/4 + 1/4)
    assert out["aa_train"] == 0.0 and out["aa_holdout"] == pytest.approx(0.4375)
    assert out["nnaar"] == pytest.approx(0.4375)
    # known codes a, b: members' hidden sets {}, {c,d}, {e}, {f,g,h}; predicted {}, {c,d} x3
    assert out["attribute_inference_f1"] == pytest.approx(1 / 3)
    assert out["attribute_inference_f1_holdout"] == 0.0
    assert out["attribute_inference_risk"] == pytest.approx(1 / 3)
    # sex of the nearest synthetic patient: members exact; non-members all "F" vs F,F,M,M
    assert out["sex_inference_f1"] == 1.0 and out["sex_inference_f1_holdout"] == pytest.approx(1 / 3)


def test_privacy_of_unrelated_patients():
    out = privacy(H, T, H)
    assert out["exact_copy_rate"] == 0.0
    assert out["membership_inference_accuracy"] == 0.0  # the attack is fooled: S sits on H
    assert out["nnaar"] < 0


# ----------------------------------------------------------------------------- incidence helpers
def test_incidence_matrices():
    X, vocab = inc.visit_matrix(SYN)
    assert vocab == ["25000", "4011", "4019", "486", "650"]
    assert X.toarray().tolist() == [[0, 1, 0, 1, 0], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]]
    Pm, _ = inc.patient_matrix(SYN, vocab)
    assert Pm.toarray().tolist() == [[0, 1, 0, 1, 0], [1, 0, 1, 0, 1], [0, 0, 0, 0, 1]]
    offsets = inc.visit_offsets(inc.cohort_visits(SYN))
    assert offsets.tolist() == [0, 1, 3, 4]
    C = inc.cooccurrence(X).toarray()
    assert C[0, 2] == 1 and C[4, 4] == 2 and C[1, 3] == 1
    Tr = inc.transitions(X, offsets).toarray()
    assert Tr.sum() == 2 and Tr[0, 4] == 1 and Tr[2, 4] == 1
    M, cats = inc.group_columns(vocab, lambda c: c[:3])
    assert cats == ["250", "401", "486", "650"]
    assert inc.collapse(X, M).toarray()[0].tolist() == [0, 1, 1, 0]
    with pytest.raises(KeyError, match="patient row 1: code '650'"):
        inc.visit_matrix(SYN, vocab[:4])
    assert inc.visit_matrix(SYN, vocab[:4], unknown="ignore")[0].nnz == 4
    import datasets

    Xd, _ = inc.visit_matrix(datasets.Dataset.from_list(SYN), vocab)
    assert (Xd != X).nnz == 0


def test_hamming_matches_brute_force():
    rng = np.random.default_rng(0)
    A = sp.csr_matrix((rng.random((70, 40)) < 0.2).astype(np.int32))
    B = sp.csr_matrix((rng.random((50, 40)) < 0.1).astype(np.int32))
    ref = (A.toarray()[:, None, :] != B.toarray()[None, :, :]).sum(-1)
    for share in (1.0, 1e-3, 0.0):  # all sparse, mixed, all dense
        D = np.vstack([d for _, d in inc.hamming_blocks(A, B, block_rows=13, dense_share=share)])
        assert (D == ref).all()
    d, i = inc.nearest_hamming(A, A, exclude_self=True)
    self_ref = (A.toarray()[:, None, :] != A.toarray()[None, :, :]).sum(-1) + np.eye(70, dtype=int) * 10**6
    assert (d == self_ref.min(1)).all() and (i == self_ref.argmin(1)).all()


# ----------------------------------------------------------------------------- baseline
def test_independent_marginal_sampler():
    train = [P(30 + i % 50, "FM"[i % 2], ["4019", "25000", "41401"][: 1 + i % 3], ["486"]) for i in range(300)]
    sampler = IndependentMarginalSampler.fit(train)
    a, b = sampler.sample(2000, seed=1), sampler.sample(2000, seed=1)
    assert a == b and a != sampler.sample(2000, seed=2)
    assert all(len(v) == len(set(v)) for p in a for v in p["visits"])
    assert {len(p["visits"]) for p in a} == {2}
    sizes = np.bincount([len(v) for p in a for v in p["visits"]], minlength=4)[1:] / (2 * len(a))
    assert sizes == pytest.approx([0.5 + 1 / 6, 1 / 6, 1 / 6], abs=0.03)  # training visit sizes
    assert {(p["age"], p["sex"]) for p in a} <= {(t["age"], t["sex"]) for t in train}
    out = coherence(a, train)
    assert out["code_js"] < 0.01 and out["duplicate_rate"] == 0


# ----------------------------------------------------------------------------- evaluate modules
def test_evaluate_load_offline(repo_root, tmp_path):
    """Both modules load by path with HF_HUB_OFFLINE=1 and a fresh HF_HOME, in a clean process."""
    code = textwrap.dedent("""
        import json, evaluate
        real = [{"visits": [["4019", "25000"], ["4019", "41401"]], "age": 64.0, "sex": "M"},
                {"visits": [["V3000", "7742"]], "age": 0.0, "sex": "F"}]
        cols = {k: [p[k] for p in real] for k in ("visits", "age", "sex")}
        coh = evaluate.load("metrics/ehr_coherence")
        a = coh.compute(**cols, real=real)
        coh.add_batch(**{k: v[:1] for k, v in cols.items()})
        coh.add_batch(**{k: v[1:] for k, v in cols.items()})
        b = coh.compute(real=real)
        priv = evaluate.load("metrics/ehr_privacy")
        c = priv.compute(**cols, train=real, holdout=[{"visits": [["486"]], "age": 70.0, "sex": "F"}])
        try:
            coh.compute(**cols)
            err = None
        except ValueError as e:
            err = str(e)
        print(json.dumps({"a": a, "b": b, "c": c, "err": err, "doc": "r2_pair_prevalence" in coh.description}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for r in (out["a"], out["b"]):
        assert r["code_js"] == 0 and r["r2_pair_prevalence"] == 1.0 and r["top_k_overlap"] == 1.0
    assert out["c"]["exact_copy_rate"] == 1.0 and out["doc"]
    assert "needs the real cohort" in out["err"]
    assert (tmp_path / "hf").is_dir()


# ----------------------------------------------------------------------------- report
ZIPF = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def _cohort(n, seed):
    """Patients with co-occurrence structure: two clusters of codes, Zipf-like within each."""
    rng = np.random.default_rng(seed)
    groups = [["4019", "25000", "41401", "2724", "4280", "42731"], ["486", "5990", "51881", "0389", "99592", "5849"]]
    out = []
    for _ in range(n):
        g = groups[rng.integers(2)]
        visits = [[str(c) for c in rng.choice(g, size=rng.integers(1, 5), replace=False, p=ZIPF)]
                  for _ in range(rng.integers(1, 3))]
        out.append(P(float(rng.integers(20, 90)), "FM"[rng.integers(2)], *visits))
    return out


def test_report_writes_metrics_table_and_plots(tmp_path):
    from promptehr_hf.metrics.report import PLOTS, evaluate_cohorts

    train, real, syn = _cohort(600, 1), _cohort(200, 2), _cohort(200, 3)
    result = evaluate_cohorts(syn, real, train, out_dir=tmp_path / "out", n_attack=100)
    out = tmp_path / "out"
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["rows"]) == {"synthetic", "floor", "baseline"}
    assert saved["rows"]["floor"]["n_synthetic_patients"] == 200
    # the baseline has no cluster structure; real-like cohorts do
    rows = result["rows"]
    assert rows["synthetic"]["r2_pair_prevalence"] > rows["baseline"]["r2_pair_prevalence"]
    assert rows["floor"]["r2_pair_prevalence"] > rows["baseline"]["r2_pair_prevalence"]
    assert "membership_inference_accuracy" in rows["synthetic"] and "membership_inference_accuracy" not in rows["floor"]
    table = (out / "metrics.md").read_text()
    assert "| R² within-visit pair prevalence |" in table and "## Privacy" in table
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_cli_evaluate_reads_prepared_and_generated_folders(tmp_path, capsys):
    import datasets

    from promptehr_hf.cli import main

    prepared, generated = tmp_path / "prepared", tmp_path / "generated"
    prepared.mkdir()
    generated.mkdir()
    for split, (n, seed) in {"train": (300, 1), "validation": (20, 4), "test": (100, 2)}.items():
        datasets.Dataset.from_list(_cohort(n, seed)).to_parquet(str(prepared / f"{split}.parquet"))
    datasets.Dataset.from_list(_cohort(100, 3)).to_parquet(str(generated / "synthetic.parquet"))
    out = tmp_path / "report"
    assert main(["evaluate", "--real", str(prepared), "--synthetic", str(generated), "--train", str(prepared),
                 "--out", str(out), "--no-plots", "--n-attack", "50"]) == 0
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert (meta["n_real"], meta["n_synthetic"], meta["n_train"]) == (100, 100, 300)
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["evaluate", "--real", str(tmp_path / "empty"), "--synthetic", str(generated), "--out", str(out)]) == 2
    assert "prepared folder" in capsys.readouterr().err
    # an earlier report is replaced; a folder holding anything else is not touched
    assert main(["evaluate", "--real", str(prepared), "--synthetic", str(generated), "--out", str(out),
                 "--no-plots", "--no-baseline"]) == 0
    assert json.loads((out / "metrics.json").read_text())["rows"]["baseline"] is None
    capsys.readouterr()
    assert main(["evaluate", "--real", str(prepared), "--synthetic", str(generated), "--out", str(prepared),
                 "--no-plots"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert sorted(f.name for f in prepared.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]
