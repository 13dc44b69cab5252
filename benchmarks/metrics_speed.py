"""Speed of the metrics at full MIMIC-III scale: 10,000 synthetic vs 46,520 real patients.

Cohorts come from the built-in simulator when it is installed
(``promptehr_hf.datasets_scripts.simulator.simulate``), else from ``random_cohort`` below (MIMIC-
scale shape: ~1.27 visits per patient, ~11 codes per visit, Zipf code frequencies over billable
ICD-9-CM codes with latent clusters so pairs are structured). The real cohort is split 80/20
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


def random_cohort(n: int, seed: int, n_clusters: int = 40) -> list[dict]:
    """n patients with MIMIC-like shape (see module docstring); deterministic for a seed."""
    from promptehr_hf.datasets_scripts import icd9

    rng = np.random.default_rng(seed)
    # The same code universe and clusters for every seed, so two cohorts share a population.
    pop = np.random.default_rng(12345)
    codes = np.array(sorted(c for c in icd9.billable_codes() if not icd9.edit_of(c)))
    codes = codes[pop.permutation(len(codes))[:7000]]
    base = 1.0 / np.arange(1, len(codes) + 1) ** 1.1
    cdfs = []
    for _ in range(n_clusters):
        w = base.copy()
        w[pop.choice(len(codes), size=60, replace=False)] *= 40.0
        cdfs.append(np.cumsum(w) / w.sum())
    cluster = rng.integers(n_clusters, size=n)
    n_visits = rng.geometric(0.79, size=n)
    sizes = np.clip(rng.poisson(11, size=int(n_visits.sum())), 1, 39)
    # Draw 2x the visit size with replacement from the patient's cluster, keep the first distinct.
    visit_cluster = np.repeat(cluster, n_visits)
    draw_owner = np.repeat(np.arange(len(sizes)), 2 * sizes)
    u = rng.random(len(draw_owner))
    draws = np.empty(len(u), dtype=np.int64)
    for k in range(n_clusters):
        at = visit_cluster[draw_owner] == k
        draws[at] = np.minimum(np.searchsorted(cdfs[k], u[at]), len(codes) - 1)
    starts = np.r_[0, np.cumsum(2 * sizes)]
    drawn = codes[draws].tolist()
    visits = [list(dict.fromkeys(drawn[starts[v]:starts[v + 1]]))[: sizes[v]] for v in range(len(sizes))]
    first = np.r_[0, np.cumsum(n_visits)]
    ages = rng.uniform(18, 90, size=n)
    female = rng.random(n) < 0.44
    return [{"subject_id": i, "age": float(ages[i]), "sex": "F" if female[i] else "M",
             "visits": visits[first[i]:first[i + 1]]} for i in range(n)]


def make_cohort(n: int, seed: int) -> tuple[list[dict], str]:
    try:
        from promptehr_hf.datasets_scripts.simulator import simulate
    except ImportError:
        return random_cohort(n, seed), "random_cohort"
    return simulate(n, seed), "simulator"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=46_520)
    parser.add_argument("--synthetic", type=int, default=10_000)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

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
        metric.compute(**{k: [p[k] for p in synthetic] for k in ("visits", "age", "sex")}, real=real)
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
            "privacy": round(t_privacy, 2),
            "coherence_plus_privacy": round(t_coherence + t_privacy, 2),
            "evaluate_cohorts_report_with_floor_baseline_plots": round(t_report, 2),
            "ehr_coherence_evaluate_module": round(t_module, 2),
        },
        "target_seconds": 30,
        "passes": t_coherence + t_privacy < 30,
        "figures": {k: coh[k] for k in ("code_js", "r2_code_prevalence", "r2_pair_prevalence", "top_k_overlap")}
        | {k: priv[k] for k in ("membership_inference_accuracy", "nnaar", "exact_copy_rate")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
