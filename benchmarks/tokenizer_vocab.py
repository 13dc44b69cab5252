"""Vocabulary figures of PromptEHRTokenizer on the MIMIC-III demo and a full-scale simulated cohort.

For each cohort and each min_code_count: categories, code tokens (catch-alls included), folded
codes, tokens per patient / per visit, the held-out fallback rate (tokenizer built on the train
split, test split encoded) and encoding speed. Prints a table and writes
benchmarks/results/tokenizer_vocab.json.

    python benchmarks/tokenizer_vocab.py [--demo-dir ../shared/mimic3demo] [--sim-patients 46520]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "tokenizer_vocab.json"
MIN_CODE_COUNTS = (1, 5)


def _split(patients: list[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    from promptehr_hf.datasets_scripts.cohort import split_patients

    split = split_patients(patients, seed=seed, val_frac=0.1, test_frac=0.1)
    return split["train"], split["test"]


def vocab_figures(patients: list[dict], min_code_count: int) -> dict:
    """Build on all patients, then on the train split with the test split encoded against it."""
    t0 = time.perf_counter()
    tok = PromptEHRTokenizer.from_patients(patients, min_code_count=min_code_count)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lengths = [len(tok.encode_patient(p["visits"])) for p in patients]
    encode_s = time.perf_counter() - t0
    n_visits = sum(len(p["visits"]) for p in patients)
    n_codes = sum(len(v) for p in patients for v in p["visits"])
    visit_tokens = [len(tok.encode_visit(v)) for p in patients for v in p["visits"]]
    cat_strings = [tok.convert_ids_to_tokens(i)[2:] for i in tok.category_ids]
    train, test = _split(patients)
    held = PromptEHRTokenizer.from_patients(train, min_code_count=min_code_count)
    for p in test:
        held.encode_patient(p["visits"])
    test_codes = sum(len(v) for p in test for v in p["visits"])
    lengths_sorted = sorted(lengths)
    return {
        "min_code_count": min_code_count,
        "patients": len(patients),
        "visits": n_visits,
        "code_occurrences": n_codes,
        "distinct_codes": len({c for p in patients for v in p["visits"] for c in v}),
        "vocab_size": len(tok),
        "categories": len(tok.category_ids),
        "code_tokens": len(tok.code_ids),
        "catch_alls_used": sum(1 for c in cat_strings if tok.code_counts.get(c, 0) > 0),
        "folded_codes": len(tok.folded_codes),
        "folded_occurrences": sum(tok.folded_codes.values()),
        "tokens_per_patient_mean": round(statistics.fmean(lengths), 2),
        "tokens_per_patient_median": statistics.median(lengths),
        "tokens_per_patient_p95": lengths_sorted[int(0.95 * (len(lengths) - 1))],
        "tokens_per_patient_p99": lengths_sorted[int(0.99 * (len(lengths) - 1))],
        "tokens_per_patient_max": max(lengths),
        "share_patients_over_512_tokens": round(sum(n > 512 for n in lengths) / len(lengths), 5),
        "tokens_per_visit_mean": round(statistics.fmean(visit_tokens), 2),
        "tokens_per_visit_max": max(visit_tokens),
        "heldout": {
            "train_patients": len(train),
            "test_patients": len(test),
            "vocab_size": len(held),
            "test_code_occurrences": test_codes,
            "fallback_category": held.fallback_counts["category"],
            "fallback_unk": held.fallback_counts["unk"],
            "fallback_rate": round(sum(held.fallback_counts.values()) / max(test_codes, 1), 5),
        },
        "build_seconds": round(build_s, 3),
        "encode_patients_per_second": round(len(patients) / max(encode_s, 1e-9)),
    }


def _print(name: str, rows: list[dict]) -> None:
    print(f"\n== {name}: {rows[0]['patients']} patients, {rows[0]['visits']} visits, "
          f"{rows[0]['code_occurrences']} codes ({rows[0]['distinct_codes']} distinct)")
    cols = ("min_code_count", "vocab_size", "categories", "code_tokens", "folded_codes",
            "tokens_per_patient_mean", "tokens_per_patient_p99", "tokens_per_patient_max", "tokens_per_visit_mean")
    print(" | ".join(cols + ("heldout_fallback_rate",)))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols) + f" | {r['heldout']['fallback_rate']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default=os.environ.get("MIMIC3_DEMO_DIR", REPO.parent / "shared" / "mimic3demo"))
    parser.add_argument("--sim-patients", type=int, default=46520)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

    from promptehr_hf.datasets_scripts.mimic3 import read_mimic3
    from promptehr_hf.datasets_scripts.simulator import simulate

    results: dict = {}
    demo, _ = read_mimic3(args.demo_dir)
    results["mimic3_demo"] = [vocab_figures(demo, k) for k in MIN_CODE_COUNTS]
    _print("MIMIC-III demo", results["mimic3_demo"])

    t0 = time.perf_counter()
    sim = simulate(args.sim_patients, seed=args.seed)
    sim_s = time.perf_counter() - t0
    results["simulated"] = [vocab_figures(sim, k) for k in MIN_CODE_COUNTS]
    results["simulated_meta"] = {"n_patients": args.sim_patients, "seed": args.seed,
                                 "simulate_seconds": round(sim_s, 1)}
    _print(f"simulated cohort (seed {args.seed})", results["simulated"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
