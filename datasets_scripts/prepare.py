"""`promptehr prepare`: a MIMIC-III folder -> Parquet splits + summary.json, written atomically.

    promptehr prepare --mimic-dir DIR --out OUT [--seed 0] [--val-frac 0.1] [--test-frac 0.1]

writes OUT/train.parquet, OUT/validation.parquet, OUT/test.parquet (schema.PATIENT_FEATURES,
one row per patient) and OUT/summary.json (the summary of the `Mimic3Cohort` datasets builder,
which reads the folder: the reader's figures and quirks, seed, fractions, split sizes and the
input files' fingerprint), then prints the summary as a table. Everything is written to a temporary folder
beside OUT and swapped in at the end (`promptehr_hf.file_utils.replace_folder`): on any error or
interruption an existing OUT stays as it was. OUT must not be, lie inside or contain
`--mimic-dir`, and an existing OUT is replaced only if it is empty or holds nothing but an
earlier `prepare` output (its `.promptehr-manifest.json` lists every file); anything else is
refused (exit code 2) before anything is read or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets.table import InMemoryTable, table_cast

from promptehr_hf.datasets_scripts.cohort_io import write_parquet
from promptehr_hf.datasets_scripts.mimic3 import (
    SPLITS,
    Mimic3Cohort,
    Mimic3Error,
    check_fractions,
    file_fingerprints,
    find_tables,
    load_cohort,
)
from promptehr_hf.datasets_scripts.schema import PATIENT_FEATURES
from promptehr_hf.file_utils import check_output, replace_folder, write_json_atomic

SUMMARY_JSON = "summary.json"
BUILDER_CACHE = ".builder_cache"  # the datasets builder's cache inside the folder being written


def prepare(mimic_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
            val_frac: float = 0.1, test_frac: float = 0.1) -> dict:
    """Read `mimic_dir` (through the `Mimic3Cohort` builder, `load_cohort`), split by patient, write
    Parquet splits and summary.json to `out_dir`.

    Returns the summary. Raises Mimic3Error (bad folder), OutputFolderError (a FileExistsError:
    out_dir is, lies inside or contains mimic_dir, or holds anything but an earlier `prepare`
    output) or ValueError (bad fractions) before anything is written to out_dir.
    """
    out = check_output(out_dir, "prepare", {"--mimic-dir": mimic_dir})
    check_fractions(val_frac, test_frac)
    find_tables(mimic_dir)  # a missing folder or table is refused before anything is written
    arguments = {"mimic_dir": str(Path(mimic_dir).resolve()), "seed": seed, "val_frac": val_frac,
                 "test_frac": test_frac}
    with replace_folder(out, "prepare", arguments) as tmp:
        # The datasets builder reads the folder; its Arrow cache lives inside the new output
        # folder (never in the global datasets cache) and is deleted once the Parquet is written.
        builder_cache = tmp / BUILDER_CACHE
        splits, summary = load_cohort(mimic_dir, seed, val_frac, test_frac, cache_dir=builder_cache)
        for name in SPLITS:
            write_parquet(splits[name], tmp / f"{name}.parquet")
        del splits
        shutil.rmtree(builder_cache)
        write_json_atomic(tmp / SUMMARY_JSON, summary, indent=2)
    return summary


def load_prepared(out_dir: str | os.PathLike) -> datasets.DatasetDict:
    """A `prepare` output folder -> DatasetDict(train/validation/test) with PATIENT_FEATURES.

    The Parquet files are read into memory (datasets' in-memory tables): no Arrow copy of the
    rows is written anywhere, the datasets cache included, and `.map`/`.shuffle` on these
    datasets keep their results in memory too. A split with no patient is an empty Dataset.
    """
    out = Path(out_dir)
    files = {name: out / f"{name}.parquet" for name in SPLITS}
    missing = [f.name for f in files.values() if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{out}: not a prepared cohort, missing {', '.join(missing)}")
    schema = PATIENT_FEATURES.arrow_schema
    return datasets.DatasetDict({
        name: datasets.Dataset(InMemoryTable(table_cast(pq.read_table(f, columns=list(PATIENT_FEATURES)), schema)),
                               info=datasets.DatasetInfo(features=PATIENT_FEATURES), split=name)
        for name, f in files.items()
    })


def stale_reasons(out_dir: str | os.PathLike, mimic_dir: str | os.PathLike, seed: int = 0,
                  val_frac: float = 0.1, test_frac: float = 0.1) -> list[str]:
    """Why the `prepare` output in `out_dir` is not what `prepare(mimic_dir, out_dir, ...)` would write now.

    Compares out_dir/summary.json with the current `file_fingerprints(mimic_dir)` (size,
    modification time and SHA-256 of each table), the split options and the reader's version.
    Returns readable reasons, one per difference; an empty list means the output is up to date.
    """
    out = Path(out_dir)
    try:
        summary = json.loads((out / SUMMARY_JSON).read_text())
    except FileNotFoundError:
        return [f"no prepared cohort in {out}"]
    except (OSError, ValueError) as e:
        return [f"{out / SUMMARY_JSON} is unreadable ({e})"]
    missing = [f"{name}.parquet" for name in SPLITS if not (out / f"{name}.parquet").is_file()]
    if missing:
        return [f"{out} lacks {', '.join(missing)}"]
    reasons = [f"{key} was {summary.get(key)!r}, now {value!r}"
               for key, value in (("seed", seed), ("val_frac", val_frac), ("test_frac", test_frac),
                                  ("reader_version", str(Mimic3Cohort.VERSION)))
               if summary.get(key) != value]
    before = summary.get("input_files")
    if not isinstance(before, dict):
        return reasons + [f"{out / SUMMARY_JSON} records no fingerprint of its input files"]
    now = file_fingerprints(mimic_dir)
    for table in sorted(set(before) | set(now)):
        old, new = before.get(table) or {}, now.get(table) or {}
        changed = [what for key, what in (("file", "file name"), ("size", "size"), ("mtime_ns", "modification time"),
                                          ("sha256", "content")) if old.get(key) != new.get(key)]
        if changed:
            reasons.append(f"{new.get('file', table)} changed ({', '.join(changed)})")
    return reasons


def format_summary(summary: dict) -> str:
    """The summary as a two-column text table (figures, splits, then every quirk) plus messages."""
    rows = [(key.replace("_", " "), summary[key]) for key in
            ("patients", "admissions", "diagnosis_rows", "distinct_codes", "non_billable_distinct_codes")]
    rows += [(f"split {name}", n) for name, n in summary.get("splits", {}).items()]
    rows += [(f"quirk: {key.replace('_', ' ')}", n) for key, n in summary["quirks"].items()]
    width = max(len(label) for label, _ in rows)
    lines = [f"MIMIC-III folder {summary['source']}", ""]
    lines += [f"{label:<{width}}  {value:>10,}" for label, value in rows]
    if summary["messages"]:
        lines += ["", *summary["messages"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mimic-dir", required=True,
                        help="folder with PATIENTS, ADMISSIONS, DIAGNOSES_ICD (.csv or .csv.gz)")
    parser.add_argument("--out", required=True, help="output folder (train/validation/test.parquet, summary.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    parser.add_argument("--val-frac", type=float, default=0.1, help="share of patients in validation (default 0.1)")
    parser.add_argument("--test-frac", type=float, default=0.1, help="share of patients in test (default 0.1)")


def validate(args: argparse.Namespace) -> None:
    """The checks `promptehr prepare` runs before reading anything (errors: ValueError, OutputFolderError)."""
    if not (0 <= args.val_frac < 1 and 0 <= args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise ValueError(f"--val-frac {args.val_frac} and --test-frac {args.test_frac} must be >= 0 and sum to < 1")
    if not Path(args.mimic_dir).is_dir():
        raise Mimic3Error(f"--mimic-dir {args.mimic_dir}: not a folder")
    check_output(args.out, "prepare", {"--mimic-dir": args.mimic_dir})


def run(args: argparse.Namespace) -> int:
    # The table below prints the reader's messages; don't log them a second time.
    logging.getLogger("promptehr_hf.datasets_scripts.mimic3").setLevel(logging.ERROR)
    summary = prepare(args.mimic_dir, args.out, seed=args.seed, val_frac=args.val_frac, test_frac=args.test_frac)
    print(format_summary(summary))
    print(f"\nwrote {Path(args.out) / 'train.parquet'} (+ validation, test) and {Path(args.out) / SUMMARY_JSON}")
    return 0
