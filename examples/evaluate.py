"""Score a synthetic cohort with the Python API: the two `evaluate` modules, then the full report.

    python examples/evaluate.py --synthetic synthetic_demo/ --data promptehr_run/data --out evaluation_demo/

``--synthetic``: a ``promptehr generate`` / ``examples/generate.py`` output folder (or any Parquet
file of patients); ``--data``: the prepared folder the model was trained on (its ``train`` and
held-out ``test`` splits). Without them the script runs on its own: a simulated cohort split
into train / test, and the independent-marginal baseline standing in for a model. The shell
equivalent of step 3 is

    promptehr evaluate --real promptehr_run/data --train promptehr_run/data \
        --synthetic synthetic_demo/ --out evaluation/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# This file is named evaluate.py: drop its folder from the import path so that `import evaluate`
# finds the Hugging Face library, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import evaluate  # noqa: E402

from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM  # noqa: E402
from promptehr_hf.metrics.report import as_columns, evaluate_cohorts, read_cohort, recorded_code_system  # noqa: E402

METRICS = Path(__file__).resolve().parents[1] / "metrics"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", default=None, help="synthetic cohort: generation output folder or Parquet file")
    p.add_argument("--data", default=None, help="prepared folder with train.parquet and test.parquet")
    p.add_argument("--out", default="evaluation_demo")
    args = p.parse_args(argv)

    # The cohorts' code system, as the prepared folder records it (the simulated cohort: ICD-9-CM).
    code_system = (recorded_code_system(args.data) if args.data else None) or DEFAULT_CODE_SYSTEM
    if args.data:
        train, real = read_cohort(args.data, "train"), read_cohort(args.data, "test")
    else:
        from promptehr_hf.datasets_scripts.simulator import simulate

        train, real = simulate(4000, seed=1), simulate(1000, seed=2)
    if args.synthetic:
        synthetic = read_cohort(args.synthetic, "synthetic")
    else:
        from promptehr_hf.metrics.baselines import IndependentMarginalSampler

        synthetic = IndependentMarginalSampler.fit(train).sample(1000, seed=3)

    # 1. Coherence: the synthetic cohort's columns are the metric's inputs, the real cohort a kwarg.
    coherence = evaluate.load(str(METRICS / "ehr_coherence"))
    scores = coherence.compute(**as_columns(synthetic), real=real, code_system=code_system)
    for key in ("code_js", "r2_code_prevalence", "r2_pair_prevalence", "cooccurrence_seen_share",
                "cms_invalid_patient_rate", "top_code_share"):
        print(f"{key:28s} {scores[key]:.4f}")

    # 2. Privacy: against the training cohort, with held-out real patients as the control.
    privacy = evaluate.load(str(METRICS / "ehr_privacy"))
    leaks = privacy.compute(**as_columns(synthetic), train=train, holdout=real, n_attack=1000, code_system=code_system)
    for key in ("exact_copy_rate", "holdout_exact_copy_rate", "membership_inference_accuracy", "nnaar"):
        print(f"{key:28s} {leaks[key]:.4f}")

    # 3. The report: synthetic, the real floor and the independent-marginal baseline side by side,
    #    written as metrics.json, metrics.md and PNG plots.
    result = evaluate_cohorts(synthetic, real, train, out_dir=args.out, code_system=code_system)
    print(f"pair R²: synthetic {result['rows']['synthetic']['r2_pair_prevalence']:.3f}, "
          f"floor {result['rows']['floor']['r2_pair_prevalence']:.3f}, "
          f"baseline {result['rows']['baseline']['r2_pair_prevalence']:.3f}; report in {args.out}/")


if __name__ == "__main__":
    main()
