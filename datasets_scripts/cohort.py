"""A MIMIC-III, MIMIC-IV or MEDS folder -> train/validation/test patient datasets, through `datasets`.

`folder_format` tells the three apart:

- "meds": the folder has Parquet files under MEDS's `data/`; read by `meds_io.read_meds`
  (the code system inferred from the diagnoses unless `code_system` is given);
- "mimic4": its PATIENTS table (in `hosp/` or the folder itself) has MIMIC-IV's `anchor_age` and
  no `dob`; read by `mimic4.read_mimic4` into ICD-10-CM (`icd9_rows` says what ICD-9 rows become);
- "mimic3": any other folder with PATIENTS, ADMISSIONS and DIAGNOSES_ICD; read by
  `mimic3.read_mimic3` (ICD-9-CM).

The summary records `format` and `code_system` either way.

Splits: patients are split by a hash of (subject_id, seed) (`split_patients`), except that a MEDS
folder whose `metadata/subject_splits.parquet` assigns every kept patient to `train`, `tuning` or
`held_out` keeps that split (as train, validation, test); the summary's `split_source` says which.

`datasets` 4+ does not run loading scripts through `load_dataset`; use the builder class:
`CohortBuilder(source_dir=DIR, cache_dir=CACHE, seed=0).download_and_prepare(); .as_dataset()`,
or `load_cohort(DIR, cache_dir=CACHE)`, which does exactly that and also returns the summary
(`promptehr prepare` reads folders this way). `cache_dir` is required: the Arrow files are
copies of the patients' rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import meds
import numpy as np

from promptehr_hf.datasets_scripts.cohort_io import patients_to_dataset
from promptehr_hf.datasets_scripts.meds_io import ICD_VERSIONS, read_meds, read_subject_splits
from promptehr_hf.datasets_scripts.mimic3 import (
    _read_csv,
    combine_fingerprints,
    file_fingerprint,
    file_fingerprints,
    find_tables,
    read_mimic3,
)
from promptehr_hf.datasets_scripts.mimic4 import ICD9_ROWS, read_mimic4
from promptehr_hf.datasets_scripts.schema import PATIENT_FEATURES, with_modalities

SPLITS = ("train", "validation", "test")
FORMATS = ("mimic3", "mimic4", "meds")
SUMMARY_FILE = "cohort_summary.json"  # sidecar in the builder's cache folder
MEDS_SPLITS = {meds.train_split: "train", meds.tuning_split: "validation", meds.held_out_split: "test"}


# --------------------------------------------------------------------------- folders


def folder_format(source_dir: str | os.PathLike) -> str:
    """"meds", "mimic4" or "mimic3" (rules: module docstring). Reads at most one CSV header.

    Raises Mimic3Error for a folder that is none of them (missing folder or MIMIC table)."""
    folder = Path(source_dir)
    if next((folder / meds.data_subdirectory).rglob("*.parquet"), None) is not None:
        return "meds"
    path = find_tables(folder)["PATIENTS"]
    header = {str(c).strip().lower() for c in _read_csv(path, "PATIENTS", nrows=0).columns}
    return "mimic4" if "anchor_age" in header and "dob" not in header else "mimic3"


def _meds_files(folder: Path) -> list[Path]:
    return sorted(p for sub in (meds.data_subdirectory, "metadata") for p in (folder / sub).rglob("*")
                  if p.is_file())


def input_fingerprints(source_dir: str | os.PathLike) -> dict[str, dict]:
    """The input files of `source_dir` -> {"file", "size", "mtime_ns", "sha256"} (`mimic3.file_fingerprints`).

    MIMIC folders: their three tables and the optional PROCEDURES_ICD / PRESCRIPTIONS, keyed by
    table name. MEDS folders: every file under `data/`
    and `metadata/`, keyed by its path relative to the folder. Raises Mimic3Error for a folder
    that is none of the formats."""
    folder = Path(source_dir)
    if folder_format(folder) != "meds":
        return file_fingerprints(folder)
    prints = [file_fingerprint(path, folder) for path in _meds_files(folder)]
    return {fp["file"]: fp for fp in prints}


# --------------------------------------------------------------------------- splits


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a fixed, portable hash."""
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def check_fractions(val_frac: float, test_frac: float) -> None:
    """Raise ValueError unless both shares are >= 0 and sum to < 1."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac={val_frac} and test_frac={test_frac} must be >= 0 and sum to < 1")


def split_patients(patients: list[dict], seed: int = 0, val_frac: float = 0.1,
                   test_frac: float = 0.1) -> dict[str, list[dict]]:
    """Deterministic patient-level split: {"train", "validation", "test"} -> patients.

    Patients are ranked by a hash of (subject_id, seed), so a patient's rank depends only on its
    id and the seed, not on input order; the first round(n*test_frac) go to test, the next
    round(n*val_frac) to validation, the rest to train. Each split is sorted by subject_id.
    """
    check_fractions(val_frac, test_frac)
    n = len(patients)
    ids = np.array([p["subject_id"] for p in patients], dtype=np.int64)
    if len(np.unique(ids)) != n:
        raise ValueError("split_patients: subject_id values are not unique")
    salt = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    key = _mix64(ids.astype(np.uint64) ^ salt)
    order = np.lexsort((ids, key))
    n_test, n_val = round(n * test_frac), round(n * val_frac)
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {name: [patients[i] for i in idx[np.argsort(ids[idx], kind="stable")].tolist()]
            for name, idx in ((s, parts[s]) for s in SPLITS)}


def _meds_split(patients: list[dict], split_of: dict[int, str] | None) -> dict[str, list[dict]] | None:
    """The MEDS folder's own split (train/tuning/held_out -> train/validation/test) when it covers
    every patient; None otherwise."""
    if split_of is None or any(MEDS_SPLITS.get(split_of.get(p["subject_id"])) is None for p in patients):
        return None
    out = {name: [] for name in SPLITS}
    for p in patients:  # already sorted by subject_id
        out[MEDS_SPLITS[split_of[p["subject_id"]]]].append(p)
    return out


# --------------------------------------------------------------------------- datasets builder


@dataclass
class CohortConfig(datasets.BuilderConfig):
    """source_dir: the MIMIC-III, MIMIC-IV or MEDS folder; seed, val_frac, test_frac: the patient split;
    icd9_rows: what a MIMIC-IV folder's ICD-9 rows become (one of mimic4.ICD9_ROWS); code_system:
    the diagnoses kept from a MEDS folder (None: inferred; "icd9cm" or "icd10cm")."""

    source_dir: str | None = None
    seed: int = 0
    val_frac: float = 0.1
    test_frac: float = 0.1
    icd9_rows: str = "map"
    code_system: str | None = None


class CohortBuilder(datasets.GeneratorBasedBuilder):
    """`datasets` builder of the patient cohort of a MIMIC-III, MIMIC-IV or MEDS folder (train/validation/test).

    `CohortBuilder(source_dir=DIR, cache_dir=CACHE, seed=0, val_frac=0.1, test_frac=0.1,
    icd9_rows="map", code_system=None)`. `cache_dir` is required: the Arrow files written there
    are copies of the patients' rows, so they go where the caller decides, never to the global
    datasets cache. The cache key includes `input_fingerprints` (size, modification time and
    SHA-256 of every input file), so an edited folder is read again. After
    `download_and_prepare()`, `builder.summary` holds the reader's summary plus `format`,
    `seed`, `val_frac`, `test_frac`, `split_source` ("hash" or "meds"), `splits` (patients per
    split), `reader_version`, `input_files` (the fingerprints, taken before reading) and
    `fingerprint` (their short hash); also when the dataset came from the cache.
    """

    BUILDER_CONFIG_CLASS = CohortConfig
    # 1.1: MIMIC-IV folders; 1.2: MEDS folders; 1.3: the time fields (stay_days, gap_days,
    # hospital_death, death_days) and their quirks; 1.4: procedures and medications
    VERSION = datasets.Version("1.4.0")

    def __init__(self, *args, hash: str | None = None, **kwargs):
        if not kwargs.get("source_dir"):
            raise ValueError("CohortBuilder needs source_dir=<MIMIC-III, MIMIC-IV or MEDS folder>")
        if not kwargs.get("cache_dir"):
            raise ValueError("CohortBuilder needs cache_dir=<folder>: its Arrow files are copies of the patients' "
                             "rows and are not written to the global datasets cache")
        kwargs["source_dir"] = str(Path(kwargs["source_dir"]).resolve())
        # The cache folder is named from the kwargs given: spell out the defaults so that
        # CohortBuilder(source_dir=d) and CohortBuilder(source_dir=d, seed=0) share it.
        for name in ("seed", "val_frac", "test_frac", "icd9_rows", "code_system"):
            kwargs.setdefault(name, CohortConfig.__dataclass_fields__[name].default)
        if kwargs["icd9_rows"] not in ICD9_ROWS:
            raise ValueError(f"icd9_rows={kwargs['icd9_rows']!r}: expected one of {', '.join(ICD9_ROWS)}")
        if kwargs["code_system"] not in (None, *ICD_VERSIONS):
            raise ValueError(f"code_system={kwargs['code_system']!r}: expected None or one of "
                             f"{', '.join(ICD_VERSIONS)}")
        input_files = input_fingerprints(kwargs["source_dir"])
        super().__init__(*args, hash=hash or combine_fingerprints(input_files), **kwargs)
        self._input_files = input_files

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="Patients of a MIMIC-III (ICD-9-CM), MIMIC-IV (ICD-10-CM) or MEDS folder: age, sex, the "
                        "diagnosis codes of each admission (and its procedures and medications when the folder "
                        "has them), stays, gaps and deaths.",
            features=PATIENT_FEATURES,
        )

    def _split_generators(self, dl_manager):
        cfg = self.config
        fmt = folder_format(cfg.source_dir)
        splits = None
        if fmt == "meds":
            patients, summary = read_meds(cfg.source_dir, code_system=cfg.code_system)
            summary["meds_splits"] = summary.pop("splits")
            splits = _meds_split(patients, read_subject_splits(cfg.source_dir))
        elif fmt == "mimic4":
            patients, summary = read_mimic4(cfg.source_dir, icd9_rows=cfg.icd9_rows)
        else:
            patients, summary = read_mimic3(cfg.source_dir)
        self._splits = splits or split_patients(patients, cfg.seed, cfg.val_frac, cfg.test_frac)
        summary.update(format=fmt, seed=cfg.seed, val_frac=cfg.val_frac, test_frac=cfg.test_frac,
                       split_source="meds" if splits else "hash",
                       splits={name: len(ps) for name, ps in self._splits.items()},
                       reader_version=str(self.VERSION), input_files=self._input_files,
                       fingerprint=combine_fingerprints(self._input_files))
        self._summary = summary
        # Saved beside the arrow files (this is the temporary folder datasets renames on success).
        with open(os.path.join(self._output_dir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        # datasets cannot read back a split with no example: such a split is not generated.
        return [datasets.SplitGenerator(name=name, gen_kwargs={"split": name})
                for name in SPLITS if self._splits[name]]

    def _generate_examples(self, split: str):
        for p in self._splits[split]:
            yield p["subject_id"], with_modalities(p)

    @property
    def summary(self) -> dict:
        if not hasattr(self, "_summary"):
            with open(os.path.join(self.cache_dir, SUMMARY_FILE)) as f:
                self._summary = json.load(f)
        return self._summary


def load_cohort(source_dir: str | os.PathLike, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1, *,
                cache_dir: str | os.PathLike, icd9_rows: str = "map",
                code_system: str | None = None) -> tuple[datasets.DatasetDict, dict]:
    """Build (or reuse from `cache_dir`) the cohort of a MIMIC-III, MIMIC-IV or MEDS folder:
    (DatasetDict train/validation/test, summary).

    Runs `CohortBuilder`; this is how `promptehr prepare` reads a folder. The datasets are
    memory-mapped from the Arrow files in `cache_dir`. A split with no patient (e.g. val_frac=0)
    is an empty in-memory Dataset with PATIENT_FEATURES. Raises ValueError for bad fractions,
    icd9_rows or code_system, Mimic3Error for a MIMIC folder and MedsError for a MEDS folder
    that cannot be read.
    """
    check_fractions(val_frac, test_frac)
    builder = CohortBuilder(source_dir=str(source_dir), seed=seed, val_frac=val_frac, test_frac=test_frac,
                            icd9_rows=icd9_rows, code_system=code_system, cache_dir=str(cache_dir))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars: the caller reports the summary
    try:
        builder.download_and_prepare()
        dsd = builder.as_dataset()
    finally:
        if bars:
            datasets.enable_progress_bars()
    splits = {name: dsd[name] if name in dsd else patients_to_dataset([]) for name in SPLITS}
    return datasets.DatasetDict(splits), builder.summary

