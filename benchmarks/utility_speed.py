"""Speed of the utility metric (train on synthetic, test on real) at MIMIC-III scale.

10,000 synthetic vs 46,520 real patients, both from the built-in simulator
(``datasets_scripts.simulator.simulate``, with times; seeds 2 and 1: two draws of one
population), the real cohort split 90/10 into the training and held-out (test) cohorts after a
seeded shuffle. Times ``metrics.utility.utility`` (every task group, 200 bootstrap resamples)
on the machine's cores (run with ``taskset -c 0,1`` for the 2-core figure). Writes
benchmarks/results/utility_speed.json: the seconds, the target (under 60 s on 2 cores), the
sizes, and the group figures (synthetic-trained, real-trained, ratio). Simulated "synthetic"
data is a second draw of the real population, so its ratios sit near 1 by construction: this
measures speed, not a generator.

    python benchmarks/utility_speed.py [--real 46520] [--synthetic 10000] [--n-bootstrap 200]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.metrics.utility import TASKS, utility

RESULTS = Path(__file__).resolve().parent / "results" / "utility_speed.json"
TARGET_SECONDS = 60


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=46_520)
    parser.add_argument("--synthetic", type=int, default=10_000)
    parser.add_argument("--n-bootstrap", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    real = simulate(args.real, seed=1)
    synthetic = simulate(args.synthetic, seed=2)
    t_data = time.perf_counter() - t0
    order = np.random.default_rng(0).permutation(len(real))
    n_train = int(0.9 * len(real))
    train = [real[i] for i in order[:n_train]]
    test = [real[i] for i in order[n_train:]]

    t0 = time.perf_counter()
    out = utility(synthetic, train, test, n_bootstrap=args.n_bootstrap, seed=0)
    t_utility = time.perf_counter() - t0

    figures = {}
    for group in TASKS:
        figures[group] = {key: out[f"{group}_{key}"] for key in (
            "auroc", "auroc_real", "auroc_ratio", "auroc_ci_low", "auroc_ci_high", "auprc", "auprc_real",
            "auprc_ratio", "tasks", "skipped")}
    result = {
        "n_real": len(real), "n_synthetic": len(synthetic), "n_train": len(train), "n_test": len(test),
        "train_visits": sum(len(p["visits"]) for p in train),
        "cpus": len(os.sched_getaffinity(0)),
        "n_bootstrap": args.n_bootstrap,
        "seconds": {"simulate": round(t_data, 2), "utility": round(t_utility, 2)},
        "target_seconds": TARGET_SECONDS,
        "passes": t_utility < TARGET_SECONDS,
        "fits": out["meta"]["fits"], "fits_not_converged": out["meta"]["fits_not_converged"],
        "model": out["meta"]["model"], "features": out["meta"]["features"],
        "skipped": out["skipped"],
        "figures": figures,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
