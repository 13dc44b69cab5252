"""`promptehr prepare`: a MIMIC-III, MIMIC-IV or MEDS folder -> Parquet splits + summary.json, written atomically.

    promptehr prepare --mimic-dir DIR --out OUT [--seed 0] [--val-frac 0.1] [--test-frac 0.1]
                      [--icd9-rows map] [--code-system icd9cm|icd10cm]

(`--meds-dir DIR` is the same option under another name.) The folder's format is detected
(`cohort.folder_format`): a MIMIC-III folder is read by `mimic3.read_mimic3` (ICD-9-CM); a
MIMIC-IV folder (its tables in `hosp/` or in DIR itself) by `mimic4.read_mimic4` into an
ICD-10-CM cohort, its ICD-9 rows mapped to ICD-10-CM (`--icd9-rows map`, the default) or their
admissions dropped (`drop`); a MEDS folder by `meds_io.read_meds`, keeping the diagnoses of
`--code-system` (default: inferred from the codes). The summary's `format` and `code_system`
say which. The command writes OUT/train.parquet, OUT/validation.parquet, OUT/test.parquet
(schema.PATIENT_FEATURES, one row per patient) and OUT/summary.json (the summary of the
`cohort.CohortBuilder` datasets builder, which reads the folder: the reader's figures and
quirks, seed, fractions, split sizes and the input files' fingerprint), then prints the summary
as a table. Everything is written to a temporary folder beside OUT and swapped in at the end
(`promptehr_hf.file_utils.replace_folder`): on any error or interruption an existing OUT stays
as it was. OUT must not be, lie inside or contain the input folder, and an existing OUT is
replaced only if it is empty or holds nothing but an earlier `prepare` output (its
`.promptehr-manifest.json` lists every file); anything else is refused (exit code 2) before
anything is read or written.
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

from promptehr_hf.datasets_scripts.cohort import (
    SPLITS,
    CohortBuilder,
    check_fractions,
    input_fingerprints,
    load_cohort,
)
from promptehr_hf.datasets_scripts.cohort_io import with_time_columns, write_parquet
from promptehr_hf.datasets_scripts.meds_io import ICD_VERSIONS
from promptehr_hf.datasets_scripts.mimic3 import Mimic3Error
from promptehr_hf.datasets_scripts.mimic4 import ICD9_ROWS
from promptehr_hf.datasets_scripts.schema import PATIENT_FEATURES
from promptehr_hf.file_utils import check_output, replace_folder, write_json_atomic

SUMMARY_JSON = "summary.json"
BUILDER_CACHE = ".builder_cache"  # the datasets builder's cache inside the folder being written


def prepare(source_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0,
            val_frac: float = 0.1, test_frac: float = 0.1, icd9_rows: str = "map",
            code_system: str | None = None) -> dict:
    """Read `source_dir` (a MIMIC-III, MIMIC-IV or MEDS folder, through the `cohort.CohortBuilder`
    datasets builder, `load_cohort`), split by patient, write Parquet splits and summary.json to
    `out_dir`.

    `icd9_rows` ("map" or "drop") is what a MIMIC-IV folder's ICD-9 rows become
    (`mimic4.read_mimic4`); `code_system` (None: inferred, "icd9cm", "icd10cm") which diagnoses
    of a MEDS folder are kept (`meds_io.read_meds`); each is unused for the other formats.
    Returns the summary. Raises Mimic3Error or MedsError (bad folder), OutputFolderError (a
    FileExistsError: out_dir is, lies inside or contains source_dir, or holds anything but an
    earlier `prepare` output) or ValueError (bad fractions, icd9_rows or code_system) before
    anything is written to out_dir.
    """
    out = check_output(out_dir, "prepare", {"--mimic-dir": source_dir})
    check_fractions(val_frac, test_frac)
    if icd9_rows not in ICD9_ROWS:
        raise ValueError(f"icd9_rows={icd9_rows!r}: expected one of {', '.join(ICD9_ROWS)}")
    if code_system not in (None, *ICD_VERSIONS):
        raise ValueError(f"code_system={code_system!r}: expected one of {', '.join(ICD_VERSIONS)} (or None)")
    input_fingerprints(source_dir)  # a missing folder or table is refused before anything is written
    arguments = {"source_dir": str(Path(source_dir).resolve()), "seed": seed, "val_frac": val_frac,
                 "test_frac": test_frac, "icd9_rows": icd9_rows, "code_system": code_system}
    with replace_folder(out, "prepare", arguments) as tmp:
        # The datasets builder reads the folder; its Arrow cache lives inside the new output
        # folder (never in the global datasets cache) and is deleted once the Parquet is written.
        builder_cache = tmp / BUILDER_CACHE
        splits, summary = load_cohort(source_dir, seed, val_frac, test_frac, cache_dir=builder_cache,
                                      icd9_rows=icd9_rows, code_system=code_system)
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
    datasets keep their results in memory too. A split with no patient is an empty Dataset. A
    folder written before the time fields existed reads with them null.
    """
    out = Path(out_dir)
    files = {name: out / f"{name}.parquet" for name in SPLITS}
    missing = [f.name for f in files.values() if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{out}: not a prepared cohort, missing {', '.join(missing)}")
    schema = PATIENT_FEATURES.arrow_schema

    def read(path: Path):
        # A folder prepared before the time fields existed reads with them null.
        present = [c for c in PATIENT_FEATURES if c in pq.read_schema(path).names]
        return table_cast(with_time_columns(pq.read_table(path, columns=present)), schema)

    return datasets.DatasetDict({
        name: datasets.Dataset(InMemoryTable(read(f)), info=datasets.DatasetInfo(features=PATIENT_FEATURES), split=name)
        for name, f in files.items()
    })


def stale_reasons(out_dir: str | os.PathLike, source_dir: str | os.PathLike, seed: int = 0,
                  val_frac: float = 0.1, test_frac: float = 0.1, icd9_rows: str = "map",
                  code_system: str | None = None) -> list[str]:
    """Why the `prepare` output in `out_dir` is not what `prepare(source_dir, out_dir, ...)` would write now.

    Compares out_dir/summary.json with the current `cohort.input_fingerprints(source_dir)` (path,
    size, modification time and SHA-256 of each input file), the split options, `icd9_rows` (for
    a MIMIC-IV output), `code_system` (for a MEDS output) and the reader's version.
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
                                  ("reader_version", str(CohortBuilder.VERSION)))
               if summary.get(key) != value]
    if summary.get("format") == "mimic4" and summary.get("icd9_rows") != icd9_rows:
        reasons.append(f"icd9_rows was {summary.get('icd9_rows')!r}, now {icd9_rows!r}")
    if summary.get("format") == "meds" and code_system is not None and summary.get("code_system") != code_system:
        reasons.append(f"code_system was {summary.get('code_system')!r}, now {code_system!r}")
    before = summary.get("input_files")
    if not isinstance(before, dict):
        return reasons + [f"{out / SUMMARY_JSON} records no fingerprint of its input files"]
    now = input_fingerprints(source_dir)
    for table in sorted(set(before) | set(now)):
        old, new = before.get(table) or {}, now.get(table) or {}
        changed = [what for key, what in (("file", "file name"), ("size", "size"), ("mtime_ns", "modification time"),
                                          ("sha256", "content")) if old.get(key) != new.get(key)]
        if changed:
            reasons.append(f"{new.get('file', table)} changed ({', '.join(changed)})")
    return reasons


def format_summary(summary: dict) -> str:
    """The summary as a two-column text table (figures, deaths when the cohort has times, rows per
    ICD version and ICD-9 mapping for MIMIC-IV, subjects dropped for MEDS, splits, every quirk,
    then the procedures' and medications' rows and quirks when the folder has them) plus messages."""
    rows = [(key.replace("_", " "), summary[key]) for key in
            ("patients", "admissions", "diagnosis_rows", "distinct_codes", "non_billable_distinct_codes")
            if key in summary]
    if summary.get("times"):
        rows += [(key.replace("_", " "), summary[key]) for key in ("hospital_deaths", "deaths_after_discharge")]
    rows += [(f"rows read with icd_version {v}", n)
             for v, n in summary.get("diagnosis_rows_by_icd_version", {}).items()]
    rows += [(f"icd9 {key.replace('_', ' ')}", n) for key, n in summary.get("icd9_mapping", {}).items()
             if isinstance(n, int)]
    rows += [(f"subjects dropped: {key.replace('_', ' ')}", n)
             for key, n in summary.get("subjects_dropped", {}).items()]
    rows += [(f"split {name}", n) for name, n in summary.get("splits", {}).items()]
    rows += [(f"quirk: {key.replace('_', ' ')}", n) for key, n in summary["quirks"].items()]
    for table in ("procedures", "medications"):  # the optional tables, when the folder has them
        if summary.get(table):
            t = summary[table]
            rows += [(f"{table}: {key.replace('_', ' ')}", t[key]) for key in ("rows_read", "rows", "distinct_codes")]
            rows += [(f"{table} quirk: {key.replace('_', ' ')}", n) for key, n in t["quirks"].items()]
    width = max(len(label) for label, _ in rows)
    system = {"icd9cm": "ICD-9-CM", "icd10cm": "ICD-10-CM"}.get(summary.get("code_system"), summary.get("code_system"))
    if summary.get("format") == "mimic4":
        head = f"MIMIC-IV folder {summary['source']} ({system}; ICD-9 rows: {summary['icd9_rows']})"
    elif summary.get("format") == "meds":
        head = f"MEDS folder {summary['source']} ({system}; split: {summary['split_source']})"
    else:
        head = f"MIMIC-III folder {summary['source']} ({system})"
    lines = [head, ""]
    lines += [f"{label:<{width}}  {value:>10,}" for label, value in rows]
    if summary["messages"]:
        lines += ["", *summary["messages"]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mimic-dir", "--meds-dir", dest="source_dir", required=True,
                        help="MIMIC-III folder (PATIENTS, ADMISSIONS, DIAGNOSES_ICD), MIMIC-IV folder (patients, "
                             "admissions, diagnoses_icd in hosp/ or in the folder itself; .csv or .csv.gz) or MEDS "
                             "folder (data/**/*.parquet, metadata/); the format is detected")
    parser.add_argument("--out", required=True, help="output folder (train/validation/test.parquet, summary.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split (default 0)")
    parser.add_argument("--val-frac", type=float, default=0.1, help="share of patients in validation (default 0.1)")
    parser.add_argument("--test-frac", type=float, default=0.1, help="share of patients in test (default 0.1)")
    parser.add_argument("--icd9-rows", choices=ICD9_ROWS, default="map",
                        help="MIMIC-IV only (read as ICD-10-CM): 'map' turns ICD-9 codes into their ICD-10-CM codes "
                             "(CMS GEMs), 'drop' drops the admissions coded in ICD-9 (default map)")
    parser.add_argument("--code-system", choices=tuple(ICD_VERSIONS), default=None,
                        help="MEDS only: keep the diagnoses of this system (default: inferred from the codes; a "
                             "dataset with both ICD-9 and ICD-10 diagnoses needs it)")


def validate(args: argparse.Namespace) -> None:
    """The checks `promptehr prepare` runs before reading anything (errors: ValueError, OutputFolderError)."""
    if not (0 <= args.val_frac < 1 and 0 <= args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise ValueError(f"--val-frac {args.val_frac} and --test-frac {args.test_frac} must be >= 0 and sum to < 1")
    if not Path(args.source_dir).is_dir():
        raise Mimic3Error(f"--mimic-dir {args.source_dir}: not a folder")
    check_output(args.out, "prepare", {"--mimic-dir": args.source_dir})


def run(args: argparse.Namespace) -> int:
    # The table below prints the reader's messages; don't log them a second time.
    for reader in ("mimic3", "mimic4", "meds_io"):
        logging.getLogger(f"promptehr_hf.datasets_scripts.{reader}").setLevel(logging.ERROR)
    summary = prepare(args.source_dir, args.out, seed=args.seed, val_frac=args.val_frac, test_frac=args.test_frac,
                      icd9_rows=args.icd9_rows, code_system=args.code_system)
    print(format_summary(summary))
    print(f"\nwrote {Path(args.out) / 'train.parquet'} (+ validation, test) and {Path(args.out) / SUMMARY_JSON}")
    return 0
