"""`promptehr prepare`: a MIMIC-III folder -> Parquet splits + summary.json, written atomically.

    promptehr prepare --mimic-dir DIR --out OUT [--seed 0] [--val-frac 0.1] [--test-frac 0.1]

writes OUT/train.parquet, OUT/validation.parquet, OUT/test.parquet (schema.PATIENT_FEATURES,
one row per patient) and OUT/summary.json (`read_mimic3`'s summary plus seed, fractions and
split sizes), then prints the summary as a table. Everything is written to a temporary folder
beside OUT and swapped in at the end (`promptehr_hf.file_utils.replace_folder`): on any error or
interruption an existing OUT stays as it was. OUT must not be, lie inside or contain
`--mimic-dir`, and an existing OUT is replaced only if it is empty or holds nothing but an
earlier `prepare` output (its `.promptehr-manifest.json` lists every file); anything else is
refused (exit code 2) before anything is read or written.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from promptehr_hf.datasets_scripts.cohort_io import patients_to_dataset, write_parquet
from promptehr_hf.datasets_scripts.mimic3 import SPLITS, Mimic3Error, read_mimic3, split_patients
from promptehr_hf.datasets_scripts.schema import PATIENT_FEATURES
from promptehr_hf.file_utils import check_output, replace_folder, write_json_atomic

SUMMARY_JSON = "summary.json"


def prepare(mimic_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
            val_frac: float = 0.1, test_frac: float = 0.1) -> dict:
    """Read `mimic_dir`, split by patient, write Parquet splits and summary.json to `out_dir`.

    Returns the summary. Raises Mimic3Error (bad folder), OutputFolderError (a FileExistsError:
    out_dir is, lies inside or contains mimic_dir, or holds anything but an earlier `prepare`
    output) or ValueError (bad fractions) before anything is written to out_dir.
    """
    out = check_output(out_dir, "prepare", {"--mimic-dir": mimic_dir})
    patients, summary = read_mimic3(mimic_dir)
    splits = split_patients(patients, seed, val_frac, test_frac)
    summary.update(seed=seed, val_frac=val_frac, test_frac=test_frac,
                   splits={name: len(ps) for name, ps in splits.items()})
    arguments = {"mimic_dir": str(Path(mimic_dir).resolve()), "seed": seed, "val_frac": val_frac,
                 "test_frac": test_frac}
    with replace_folder(out, "prepare", arguments) as tmp:
        for name in SPLITS:
            write_parquet(splits[name], tmp / f"{name}.parquet")
        write_json_atomic(tmp / SUMMARY_JSON, summary, indent=2)
    return summary


def load_prepared(out_dir: str | os.PathLike, cache_dir: str | None = None) -> datasets.DatasetDict:
    """A `prepare` output folder -> DatasetDict(train/validation/test) through datasets' Parquet loader.

    A split with no patient is an empty Dataset with PATIENT_FEATURES.
    """
    out = Path(out_dir)
    files = {name: str(out / f"{name}.parquet") for name in SPLITS}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"{out}: not a prepared cohort, missing {', '.join(map(os.path.basename, missing))}")
    # datasets' Parquet loader cannot make a split of a file with no row: build those empty.
    full = {name: f for name, f in files.items() if pq.read_metadata(f).num_rows}
    loaded = (datasets.load_dataset("parquet", data_files=full, features=PATIENT_FEATURES, cache_dir=cache_dir)
              if full else {})
    return datasets.DatasetDict({name: loaded[name] if name in full else patients_to_dataset([]) for name in SPLITS})


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
