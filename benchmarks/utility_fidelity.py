"""Utility of the fidelity benchmark's default model (issue 20's must-show 2): train on synthetic,
test on real.

    python benchmarks/utility_fidelity.py --model benchmarks/work/fidelity_v2/default/model

Generates as many patients as the model's held-out split holds (seed 0, as ``fidelity.py``; with
``--n-synthetic train``, as many as the real training split, so that the synthetic-trained and
the real-trained models learn from the same number of patients), draws the same number from the
independent-marginal baseline, and runs ``metrics.utility`` for both
against the real training and held-out splits of the model's prepared cohort. Writes
``benchmarks/results/utility_fidelity.json``: per task group the mean AUROC trained on real,
synthetic and baseline patients, the synthetic / real ratio (target >= 0.95) and whether the
synthetic-trained model beats the baseline-trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE / "work" / "fidelity_v2" / "default" / "model"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-synthetic", default="test", choices=("test", "train"),
                   help="synthetic (and baseline) patients: as many as the held-out split holds (as fidelity.py), "
                        "or as many as the real training split, so both models are fitted on the same number of "
                        "patients")
    p.add_argument("--out", default=str(HERE / "results" / "utility_fidelity.json"))
    args = p.parse_args(argv)
    from promptehr_hf.datasets_scripts.prepare import load_prepared
    from promptehr_hf.metrics.baselines import IndependentMarginalSampler
    from promptehr_hf.metrics.utility import TASKS, utility_rows
    from promptehr_hf.modeling_promptehr.generation.command import load_model
    from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients

    model_dir = Path(args.model)
    splits = load_prepared(model_dir.parent / "data")
    train, test = splits["train"].to_list(), splits["test"].to_list()
    model, tokenizer = load_model(model_dir)
    system = tokenizer.code_system
    n = len(test) if args.n_synthetic == "test" else len(train)
    synthetic, _ = generate_patients(model, tokenizer, n, prior=model_dir, seed=args.seed)
    baseline = IndependentMarginalSampler.fit(train, system).sample(n, seed=args.seed)
    t0 = time.perf_counter()
    rows = utility_rows({"synthetic": synthetic.to_list(), "baseline": baseline}, train, test, code_system=system,
                        seed=args.seed)
    seconds = time.perf_counter() - t0
    summary = {}
    for group in TASKS:
        s, b = rows["synthetic"].get(f"{group}_auroc"), rows["baseline"].get(f"{group}_auroc")
        real = rows["synthetic"].get(f"{group}_auroc_real")
        summary[group] = {"real": real, "synthetic": s, "baseline": b,
                          "ratio": None if not (real and s) else s / real,
                          "ratio_met": None if not (real and s) else s / real >= 0.95,
                          "beats_baseline": None if s is None or b is None else s > b}
    result = {"model": str(model_dir), "code_system": system, "n_synthetic": len(synthetic), "n_train": len(train),
              "n_test": len(test), "utility_seconds": round(seconds, 1), "summary": summary, "rows": rows}
    out = Path(args.out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    os.replace(tmp, out)
    print(json.dumps(summary, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
