"""Time and outcome consistency of generated patients: zero violations in 10,000 of them.

    python benchmarks/time_consistency.py --model benchmarks/work/fidelity_v2/default/model

Generates ``--n`` unconditional patients (with times) from a trained checkpoint and counts, with
code that does not come from the generator:

1. the consistency violations of ``metrics.time_outcome`` (negative or missing stays and gaps,
   a first gap that is not 0, a death both in and after hospital, ages past the cap, ...);
2. CMS age/sex conflicts at the age of EVERY admission (age at the first admission plus the stays
   and gaps before it), with the tables of the checkpoint's code system;
3. the written MIMIC tables read back as a user would read them (``promptehr prepare``'s reader):
   every quirk it counts (inverted or overlapping stays, deaths before the last visit, flag and
   death time disagreeing, DOD before the last discharge, ...; ages over 89, written MIMIC's way,
   excepted) must be 0, and the times read back must equal the generated ones (to the second;
   later deaths to the day).

Writes ``benchmarks/results/time_consistency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# A patient aged 90 is written MIMIC's way (born ~300 years before); the reader caps it back and
# counts it. Every other quirk of the written tables would be an inconsistency.
EXPECTED = {"ages_capped"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(HERE / "work" / "fidelity_v2" / "default" / "model"))
    p.add_argument("--data", default=None, help="prepared folder of the model's cohort (default: MODEL/../data)")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=str(HERE / "results" / "time_consistency.json"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from promptehr_hf.datasets_scripts import code_systems
    from promptehr_hf.datasets_scripts.cohort_io import write_mimic3_csvs, write_mimic4_csvs
    from promptehr_hf.datasets_scripts.mimic3 import read_mimic3
    from promptehr_hf.datasets_scripts.mimic4 import read_mimic4
    from promptehr_hf.datasets_scripts.prepare import load_prepared
    from promptehr_hf.metrics.time_outcome import VIOLATIONS, time_outcome
    from promptehr_hf.modeling_promptehr.generation.command import load_model
    from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients

    model_dir = Path(args.model)
    data_dir = Path(args.data) if args.data else model_dir.parent / "data"
    model, tokenizer = load_model(model_dir)
    system = tokenizer.code_system
    t0 = time.perf_counter()
    synthetic, stats = generate_patients(model, tokenizer, args.n, prior=model_dir, seed=args.seed,
                                         batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    if not stats.get("times"):
        raise SystemExit(f"{model_dir}: no time model (trained without times?)")
    patients = synthetic.to_list()
    train = load_prepared(data_dir)["train"]

    figures = time_outcome(patients, train, code_system=system)
    violations = {name: int(figures[f"violations_{name}"]) for name in VIOLATIONS}

    # CMS edits at the age of every admission.
    icd = code_systems.code_system(system)
    codes, ages, sexes = [], [], []
    for p in patients:
        elapsed = np.cumsum(p["gap_days"]) + np.r_[0.0, np.cumsum(p["stay_days"])[:-1]]
        for visit, days in zip(p["visits"], elapsed):
            codes += visit
            ages += [p["age"] + days / 365.25] * len(visit)
            sexes += [p["sex"]] * len(visit)
    cms_conflicts = int((icd.violations(codes, np.array(ages), np.array(sexes, dtype=object)) != "").sum())

    # The written tables, read back as a user reads them.
    with tempfile.TemporaryDirectory() as tmp:
        if system == "icd9cm":
            write_mimic3_csvs(patients, tmp, seed=args.seed)
            back, summary = read_mimic3(tmp)
        else:
            write_mimic4_csvs(patients, tmp, seed=args.seed, code_system=system)
            back, summary = read_mimic4(tmp)
    by_id = {p["subject_id"]: p for p in back}
    mismatched = 0
    for p in patients:
        q = by_id.get(p["subject_id"])
        same = q is not None and q["visits"] == p["visits"] and q["hospital_death"] == p["hospital_death"] and \
            np.allclose(q["stay_days"], p["stay_days"], atol=2 / 86400) and \
            np.allclose(q["gap_days"], p["gap_days"], atol=2 / 86400) and \
            (q["death_days"] is None) == (p["death_days"] is None) and \
            (p["death_days"] is None or abs(q["death_days"] - p["death_days"]) <= 1.0)
        mismatched += not same

    result = {
        "model": str(model_dir), "code_system": system, "n_patients": len(patients), "seed": args.seed,
        "generate_seconds": round(seconds, 1), "time_capped_visits": stats.get("time_capped_visits"),
        "hospital_deaths": stats.get("hospital_deaths"),
        "violations": violations, "violations_total": sum(violations.values()),
        "cms_conflicts_at_admission_age": cms_conflicts,
        "written_tables_nonzero_quirks": {k: v for k, v in summary["quirks"].items() if v and k not in EXPECTED},
        "patients_not_read_back_equal": mismatched,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": sys.version.split()[0],
    }
    result["met"] = (result["violations_total"] == 0 and cms_conflicts == 0 and mismatched == 0
                     and not result["written_tables_nonzero_quirks"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
