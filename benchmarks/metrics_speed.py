"""Speed of the metrics at full MIMIC-III scale: 10,000 synthetic vs 46,520 real patients.

Cohorts come from the built-in simulator when it is installed and writes procedures and
medications (``promptehr_hf.datasets_scripts.simulator.simulate``), else from ``random_cohort``
below (MIMIC-scale shape: ~1.27 visits per patient, ~11 diagnosis codes, ~3.5 procedure codes
and ~30 medication codes per visit, Zipf code frequencies with latent clusters shared by the
three, so pairs within and across modalities are structured). ``coherence_diagnoses_only``
times the same cohorts without their procedures and medications. The real cohort is split 80/20
into the training and held-out cohorts the privacy metrics need.

Timed on the machine's cores (run with ``taskset -c 0,1`` for the 2-core figure): ``coherence``
(synthetic vs the 46,520 real), ``privacy`` (synthetic vs train / held-out) and the full
``evaluate_cohorts`` report (with the floor and baseline rows and the PNG plots; the reference
is the held-out part there), and ``ehr_coherence`` through ``evaluate.load(...).compute``.
Writes benchmarks/results/metrics_speed.json. Target: coherence + privacy < 30 s on 2 cores.

    python benchmarks/metrics_speed.py [--real 46520] [--synthetic 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "metrics_speed.json"
MODALITY_FIGURES = ("procedures_code_js", "procedures_r2_pair_prevalence", "medications_code_js",
                    "medications_r2_pair_prevalence", "r2_pair_diagnosis_procedure", "r2_pair_diagnosis_medication")


def _cluster_cdfs(codes: np.ndarray, n_clusters: int, pop: np.random.Generator) -> list[np.ndarray]:
    """Per latent cluster, the cumulative draw probabilities of ``codes``: Zipf-like, 60 codes
    boosted 40x."""
    base = 1.0 / np.arange(1, len(codes) + 1) ** 1.1
    cdfs = []
    for _ in range(n_clusters):
        w = base.copy()
        w[pop.choice(len(codes), size=60, replace=False)] *= 40.0
        cdfs.append(np.cumsum(w) / w.sum())
    return cdfs


def _visit_lists(codes: np.ndarray, cdfs: list[np.ndarray], visit_cluster: np.ndarray, sizes: np.ndarray,
                 rng: np.random.Generator) -> list[list[str]]:
    """One code list per visit: 2x its size drawn with replacement from its cluster, the first
    ``size`` distinct kept."""
    draw_owner = np.repeat(np.arange(len(sizes)), 2 * sizes)
    u = rng.random(len(draw_owner))
    draws = np.empty(len(u), dtype=np.int64)
    for k, cdf in enumerate(cdfs):
        at = visit_cluster[draw_owner] == k
        draws[at] = np.minimum(np.searchsorted(cdf, u[at]), len(codes) - 1)
    starts = np.r_[0, np.cumsum(2 * sizes)]
    drawn = codes[draws].tolist()
    return [list(dict.fromkeys(drawn[starts[v]:starts[v + 1]]))[: sizes[v]] for v in range(len(sizes))]


def random_cohort(n: int, seed: int, n_clusters: int = 40, modalities: bool = True) -> list[dict]:
    """n patients with MIMIC-like shape (see module docstring); deterministic for a seed. With
    ``modalities``, also procedures (~3.5 billable ICD-9-CM v32 procedure codes per visit, some
    visits none) and medications (~30 codes per visit over 3,000 ``NAME//FORMULARY`` codes),
    tied to the patient's cluster like the diagnoses."""
    from promptehr_hf.datasets_scripts import icd9
    from promptehr_hf.datasets_scripts.procedures import ICD9PROC

    rng = np.random.default_rng(seed)
    # The same code universe and clusters for every seed, so two cohorts share a population.
    pop = np.random.default_rng(12345)
    codes = np.array(sorted(c for c in icd9.billable_codes() if not icd9.edit_of(c)))
    codes = codes[pop.permutation(len(codes))[:7000]]
    cdfs = _cluster_cdfs(codes, n_clusters, pop)
    cluster = rng.integers(n_clusters, size=n)
    n_visits = rng.geometric(0.79, size=n)
    V = int(n_visits.sum())
    visit_cluster = np.repeat(cluster, n_visits)
    visits = _visit_lists(codes, cdfs, visit_cluster, np.clip(rng.poisson(11, size=V), 1, 39), rng)
    first = np.r_[0, np.cumsum(n_visits)]
    ages = rng.uniform(18, 90, size=n)
    female = rng.random(n) < 0.44
    patients = [{"subject_id": i, "age": float(ages[i]), "sex": "F" if female[i] else "M",
                 "visits": visits[first[i]:first[i + 1]]} for i in range(n)]
    if modalities:
        procs = np.array(sorted(c for c in ICD9PROC.billable_codes() if not ICD9PROC.edit_of(c)))
        procs = procs[pop.permutation(len(procs))[:2000]]
        drugs = np.array([f"DRUG {i}//F{j}" for i in range(1500) for j in range(2)])
        lists = {"procedures": _visit_lists(procs, _cluster_cdfs(procs, n_clusters, pop), visit_cluster,
                                            np.clip(rng.poisson(3.5, size=V), 0, 40), rng),
                 "medications": _visit_lists(drugs, _cluster_cdfs(drugs, n_clusters, pop), visit_cluster,
                                             np.clip(rng.poisson(30, size=V), 0, 120), rng)}
        for i, p in enumerate(patients):
            for name, per_visit in lists.items():
                p[name] = per_visit[first[i]:first[i + 1]]
    return patients


def make_cohort(n: int, seed: int) -> tuple[list[dict], str]:
    """The simulator's cohort when it is installed and carries procedures and medications, else ``random_cohort``."""
    try:
        from promptehr_hf.datasets_scripts.simulator import simulate
    except ImportError:
        return random_cohort(n, seed), "random_cohort"
    cohort = simulate(n, seed)
    if not all(p.get("procedures") is not None and p.get("medications") is not None for p in cohort[:100]):
        return random_cohort(n, seed), "random_cohort"
    return cohort, "simulator"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=46_520)
    parser.add_argument("--synthetic", type=int, default=10_000)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    from promptehr_hf.datasets_scripts.schema import MODALITY_FIELDS
    from promptehr_hf.metrics.coherence import coherence
    from promptehr_hf.metrics.privacy import privacy
    from promptehr_hf.metrics.report import evaluate_cohorts

    t0 = time.perf_counter()
    real, source = make_cohort(args.real, seed=1)
    synthetic, _ = make_cohort(args.synthetic, seed=2)
    t_data = time.perf_counter() - t0
    n_train = int(0.8 * len(real))
    train, holdout = real[:n_train], real[n_train:]

    t0 = time.perf_counter()
    coh = coherence(synthetic, real)
    t_coherence = time.perf_counter() - t0
    plain = [[{k: p[k] for k in ("visits", "age", "sex")} for p in c] for c in (synthetic, real)]
    t0 = time.perf_counter()
    coherence(*plain)
    t_diagnoses = time.perf_counter() - t0
    t0 = time.perf_counter()
    priv = privacy(synthetic, train, holdout)
    t_privacy = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        evaluate_cohorts(synthetic, holdout, train=train, out_dir=out)
        t_report = time.perf_counter() - t0
    # The same coherence through the evaluate module (arrow round trip of the synthetic columns).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import evaluate

    with tempfile.TemporaryDirectory() as cache:
        metric = evaluate.load(str(Path(__file__).resolve().parents[1] / "metrics" / "ehr_coherence"), cache_dir=cache)
        t0 = time.perf_counter()
        metric.compute(**{k: [p.get(k) for p in synthetic] for k in ("visits", "age", "sex", *MODALITY_FIELDS)},
                       real=real)
        t_module = time.perf_counter() - t0

    result = {
        "cohort_source": source,
        "n_real": len(real), "n_synthetic": len(synthetic), "n_train": len(train), "n_holdout": len(holdout),
        "real_visits": sum(len(p["visits"]) for p in real),
        "real_codes": sum(len(v) for p in real for v in p["visits"]),
        "cpus": len(os.sched_getaffinity(0)),
        "seconds": {
            "make_cohorts": round(t_data, 2),
            "coherence": round(t_coherence, 2),
            "coherence_diagnoses_only": round(t_diagnoses, 2),
            "privacy": round(t_privacy, 2),
            "coherence_plus_privacy": round(t_coherence + t_privacy, 2),
            "evaluate_cohorts_report_with_floor_baseline_plots": round(t_report, 2),
            "ehr_coherence_evaluate_module": round(t_module, 2),
        },
        "target_seconds": 30,
        "passes": t_coherence + t_privacy < 30,
        "real_procedure_codes": sum(len(v) for p in real for v in p.get("procedures") or ()),
        "real_medication_codes": sum(len(v) for p in real for v in p.get("medications") or ()),
        "figures": {k: coh[k] for k in ("code_js", "r2_code_prevalence", "r2_pair_prevalence", "top_k_overlap",
                                        *MODALITY_FIGURES) if k in coh}
        | {k: priv[k] for k in ("membership_inference_accuracy", "nnaar", "exact_copy_rate")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
