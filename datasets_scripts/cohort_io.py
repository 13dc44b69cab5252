"""Cohort I/O: the ONE place patients are laid out in time (`timeline`), the MIMIC-III CSV writer
(simulator, generation) and Parquet helpers. The MIMIC-IV and MEDS writers take their dates
from the same `timeline`.

Patients follow `promptehr_hf.datasets_scripts.schema` (subject_id, age, sex, visits).

`write_mimic3_csvs` writes `PATIENTS.csv`, `ADMISSIONS.csv` and `DIAGNOSES_ICD.csv` with the
upper-case MIMIC-III headers, so `promptehr_hf.datasets_scripts.mimic3.read_mimic3` reads them
back into the same patients (ages to 0.01 year, which is the reader's precision):

- each patient's first admission falls on a random minute in 2100-2200 (MIMIC's shifted
  years), with the DOB at midnight round(age * 365.25) days earlier; later admissions follow,
  each after the previous discharge (stay 1-15 days, then a gap of 1 day to 2 years), so
  admittime order is visit order;
- an age of 90 (the cap) is written the way MIMIC-III writes patients over 89: DOB 300 years
  before the first admission, so the reader caps it back to 90 and counts it like a real record
  (a patient who turns 90 in a later admission is also counted by the reader's `ages_capped`);
- hadm_ids are a random permutation of 100000.. (not in time order, like MIMIC);
  ROW_IDs count from 1; codes are written as given (dotless), in visit order as SEQ_NUM 1..n;
  strings and headers are double-quoted and missing values left empty, as in MIMIC-III v1.4.

`write_mimic4_csvs` writes a MIMIC-IV folder, `hosp/patients.csv.gz`, `hosp/admissions.csv.gz`
and `hosp/diagnoses_icd.csv.gz`, with MIMIC-IV's columns and lower-case headers, which
`promptehr_hf.datasets_scripts.mimic4.read_mimic4` reads back into the same patients with their
ages floored to whole years (MIMIC-IV has no date of birth, only whole-year ages):

- the admission dates and hadm_ids are `timeline`'s (the same as write_mimic3_csvs' for a seed);
- `anchor_year` is the year of the patient's first admission and `anchor_age` the age floored
  to whole years, 91 for an age of 90 (MIMIC-IV's "over 89"); `anchor_year_group` is one of
  MIMIC-IV's five real periods ("2008 - 2010" ... "2020 - 2022"), chosen by subject_id;
- codes are written with the one `icd_version` of the cohort's code system (10 for "icd10cm",
  9 for "icd9cm"), in visit order as seq_num 1..n; `admission_type` is "EW EMER." (MIMIC-IV's
  most frequent), `hospital_expire_flag` 0, `dod` and `deathtime` empty.

All writes go through `promptehr_hf.file_utils` (a temporary file beside each table, renamed
onto it once written): an error or interruption never leaves a half-written table behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from datasets import Dataset

from promptehr_hf.datasets_scripts.schema import AGE_CAP, PATIENT_FEATURES, SEXES
from promptehr_hf.file_utils import atomic_write, atomic_write_all

DAYS_PER_YEAR = 365.25
SECONDS_PER_YEAR = DAYS_PER_YEAR * 86400
MIMIC_SHIFT_YEARS = 300.0  # apparent age MIMIC-III gives patients over 89
FIRST_HADM_ID = 100000


def patients_to_dataset(patients: Sequence[dict]) -> Dataset:
    """list of patient dicts -> `datasets.Dataset` with PATIENT_FEATURES (n_patients rows)."""
    return Dataset.from_dict(
        {
            "subject_id": [int(p["subject_id"]) for p in patients],
            "age": [float(p["age"]) for p in patients],
            "sex": [p["sex"] for p in patients],
            "visits": [p["visits"] for p in patients],
        },
        features=PATIENT_FEATURES,
    )


def dataset_to_patients(ds: Dataset) -> list[dict]:
    """`datasets.Dataset` with PATIENT_FEATURES -> list of patient dicts (age as a Python float)."""
    return ds.select_columns(list(PATIENT_FEATURES)).to_list()


def _patients_table(patients: Sequence[dict] | Dataset) -> pa.Table:
    """Patients -> one Arrow table with PATIENT_FEATURES' columns."""
    ds = patients if isinstance(patients, Dataset) else patients_to_dataset(patients)
    return ds.select_columns(list(PATIENT_FEATURES)).with_format("arrow")[:].combine_chunks()


def write_parquet(patients: Sequence[dict] | Dataset, path: str | os.PathLike) -> Path:
    """Write patients (list of dicts or a Dataset) to one Parquet file, atomically."""
    table = _patients_table(patients)  # carries the datasets features in its schema metadata
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _timestamps(seconds: np.ndarray) -> pa.Array:
    """int64 seconds since 1970 -> Arrow timestamps (written as 'YYYY-MM-DD HH:MM:SS', MIMIC's format)."""
    return pa.array(seconds.astype(np.int64), type=pa.int64()).cast(pa.timestamp("s"))


@dataclass(frozen=True)
class Timeline:
    """Patients laid out in time, column-wise: what every table writer (MIMIC-III, MIMIC-IV,
    MEDS) writes. Times are int64 seconds since 1970, in whole minutes (MIMIC's resolution).

    Per patient [n]: ``subject``, ``age`` (float64, as given), ``sex`` (Arrow strings),
    ``n_visits``, ``dob`` (midnight; an age of 90 is written ``MIMIC_SHIFT_YEARS`` before the first
    admission, MIMIC-III's way). Per visit [v_total]: ``patient`` (row in the patient arrays),
    ``admit``, ``disch``, ``hadm``, ``n_codes``. Per diagnosis row [d_total]: ``codes`` (Arrow
    strings, visit order), ``seq_num`` (1..n within its visit).
    """

    subject: np.ndarray
    age: np.ndarray
    sex: pa.Array
    n_visits: np.ndarray
    dob: np.ndarray
    patient: np.ndarray
    admit: np.ndarray
    disch: np.ndarray
    hadm: np.ndarray
    n_codes: np.ndarray
    codes: pa.Array
    seq_num: np.ndarray


def timeline(patients: Sequence[dict] | Dataset, seed: int = 0, writer: str = "timeline") -> Timeline:
    """Lay patients out in time (see the module docstring for the dates); ``seed`` draws the dates
    and hadm_ids. ValueError, naming ``writer`` and the subject_id, on a patient with no visit, a
    bad age or sex, or a repeated subject_id.
    """
    t = _patients_table(patients)
    n = t.num_rows
    subject = t["subject_id"].to_numpy()
    if len(np.unique(subject)) != n:
        raise ValueError(f"{writer}: subject_id values are not unique")
    # From a list, the ages as given (float64): the Arrow copy is float32, which can move an age
    # across a 0.01 rounding boundary.
    age = (t["age"].to_numpy(zero_copy_only=False).astype(np.float64) if isinstance(patients, Dataset)
           else np.fromiter((float(p["age"]) for p in patients), dtype=np.float64, count=n))
    sex = t["sex"].combine_chunks() if n else pa.array([], type=pa.string())
    bad_sex = ~np.isin(sex.to_numpy(zero_copy_only=False), SEXES)
    if bad_sex.any():
        raise ValueError(f"{writer}: sex must be one of {SEXES}; subject_id {subject[bad_sex][0]} has another")
    visits = t["visits"].chunk(0) if n else pa.array([], type=pa.list_(pa.list_(pa.string())))
    n_visits = pc.list_value_length(visits).to_numpy(zero_copy_only=False).astype(np.int64)
    if (n_visits == 0).any():
        raise ValueError(f"{writer}: subject_id {subject[n_visits == 0][0]} has no visit")
    bad_age = (age < 0) | ~np.isfinite(age)
    if bad_age.any():
        raise ValueError(f"{writer}: subject_id {subject[bad_age][0]} has a bad age")
    visit_codes = visits.flatten()  # one list of codes per visit
    d_len = pc.list_value_length(visit_codes).to_numpy(zero_copy_only=False).astype(np.int64)

    rng = np.random.default_rng(seed)
    v_total = int(n_visits.sum())
    first_visit = np.r_[0, np.cumsum(n_visits)[:-1]].astype(np.int64)
    is_first = np.zeros(v_total, dtype=bool)
    is_first[first_visit] = True

    # DOB is a midnight round(age * 365.25) days before the first admission's day, which starts at
    # a random minute: off from the exact age by -0.5..+1.5 days, inside the readers' 0.01-year
    # (3.65-day) rounding.
    written_age = np.where(age >= AGE_CAP, MIMIC_SHIFT_YEARS, np.round(age, 2))
    first_day = np.datetime64("2100-01-01", "D").astype(np.int64) + rng.integers(0, 100 * 365, size=n)
    dob = 86400 * (first_day - np.round(written_age * DAYS_PER_YEAR).astype(np.int64))
    first_admit = 86400 * first_day + 60 * rng.integers(0, 1440, size=n)
    stay_min = rng.integers(1 * 1440, 15 * 1440, size=v_total)
    gap_min = 1440 + rng.exponential(180 * 1440, size=v_total).astype(np.int64).clip(0, 730 * 1440)
    step = np.where(is_first, 0, np.r_[0, (stay_min + gap_min)[:-1]])  # after the previous discharge
    offset = np.cumsum(step)
    offset -= np.repeat(offset[first_visit], n_visits)  # restart at each patient's first visit
    admit = np.repeat(first_admit, n_visits) + 60 * offset
    disch = admit + 60 * stay_min

    hadm = FIRST_HADM_ID + rng.permutation(v_total)
    d_first = np.r_[0, np.cumsum(d_len)[:-1]].astype(np.int64)
    seq = np.arange(int(d_len.sum())) - np.repeat(d_first, d_len) + 1
    return Timeline(subject=subject, age=age, sex=sex, n_visits=n_visits, dob=dob,
                    patient=np.repeat(np.arange(n), n_visits), admit=admit, disch=disch, hadm=hadm,
                    n_codes=d_len, codes=visit_codes.flatten(), seq_num=seq)


def _tables(patients: Sequence[dict] | Dataset, seed: int) -> dict[str, pa.Table]:
    """patients -> the three MIMIC-III tables (upper-case headers), built column-wise in Arrow."""
    tl = timeline(patients, seed, writer="write_mimic3_csvs")
    n, v_total, d_total = len(tl.subject), len(tl.admit), len(tl.codes)
    v_subject = tl.subject[tl.patient]
    return {
        "PATIENTS": pa.table({
            "ROW_ID": np.arange(1, n + 1), "SUBJECT_ID": tl.subject, "GENDER": tl.sex, "DOB": _timestamps(tl.dob),
            "DOD": pa.nulls(n, pa.timestamp("s")), "DOD_HOSP": pa.nulls(n, pa.timestamp("s")),
            "DOD_SSN": pa.nulls(n, pa.timestamp("s")), "EXPIRE_FLAG": np.zeros(n, dtype=np.int64),
        }),
        "ADMISSIONS": pa.table({
            "ROW_ID": np.arange(1, v_total + 1), "SUBJECT_ID": v_subject, "HADM_ID": tl.hadm,
            "ADMITTIME": _timestamps(tl.admit), "DISCHTIME": _timestamps(tl.disch),
            "DEATHTIME": pa.nulls(v_total, pa.timestamp("s")),
        }),
        "DIAGNOSES_ICD": pa.table({
            "ROW_ID": np.arange(1, d_total + 1), "SUBJECT_ID": np.repeat(v_subject, tl.n_codes),
            "HADM_ID": np.repeat(tl.hadm, tl.n_codes), "SEQ_NUM": tl.seq_num, "ICD9_CODE": tl.codes,
        }),
    }


def write_mimic3_csvs(patients: Sequence[dict] | Dataset, out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write patients as a MIMIC-III folder (PATIENTS/ADMISSIONS/DIAGNOSES_ICD.csv); return the paths.

    `seed` draws the dates and hadm_ids. Other files in `out_dir` are left alone; the three
    tables are replaced together only once all three are written.
    """
    tables = _tables(patients, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = {out / f"{name}.csv": (lambda tmp, table=table: pa_csv.write_csv(table, tmp))
               for name, table in tables.items()}
    return dict(zip(tables, atomic_write_all(writers)))


MIMIC4_OVER_89 = 91  # MIMIC-IV's anchor_age of every patient over 89
MIMIC4_ANCHOR_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022")
ICD_VERSIONS = {"icd9cm": 9, "icd10cm": 10}


def write_mimic4_csvs(patients: Sequence[dict] | Dataset, out_dir: str | os.PathLike, *, seed: int = 0,
                      code_system: str = "icd10cm") -> dict[str, Path]:
    """Write patients as a MIMIC-IV folder (hosp/patients, admissions, diagnoses_icd .csv.gz); return the paths
    keyed by table name ("patients", "admissions", "diagnoses_icd").

    `seed` draws the dates and hadm_ids (`timeline`); `code_system` ("icd10cm" or "icd9cm") is
    the patients' code system, written as every row's icd_version. Other files in `out_dir` are
    left alone; the three tables are replaced together only once all three are written.
    """
    if code_system not in ICD_VERSIONS:
        raise ValueError(f"write_mimic4_csvs: code_system={code_system!r}, expected one of {', '.join(ICD_VERSIONS)}")
    tl = timeline(patients, seed, writer="write_mimic4_csvs")
    n, v_total, d_total = len(tl.subject), len(tl.admit), len(tl.codes)
    v_subject = tl.subject[tl.patient]
    first_admit = tl.admit[np.cumsum(tl.n_visits) - tl.n_visits]
    anchor_year = first_admit.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    anchor_age = np.where(tl.age >= AGE_CAP, MIMIC4_OVER_89, np.floor(tl.age)).astype(np.int64)
    groups = np.array(MIMIC4_ANCHOR_YEAR_GROUPS, dtype=object)[tl.subject % len(MIMIC4_ANCHOR_YEAR_GROUPS)]
    tables = {
        "patients": pa.table({
            "subject_id": tl.subject, "gender": tl.sex, "anchor_age": anchor_age, "anchor_year": anchor_year,
            "anchor_year_group": pa.array(groups, type=pa.string()), "dod": pa.nulls(n, pa.date32()),
        }),
        "admissions": pa.table({
            "subject_id": v_subject, "hadm_id": tl.hadm, "admittime": _timestamps(tl.admit),
            "dischtime": _timestamps(tl.disch), "deathtime": pa.nulls(v_total, pa.timestamp("s")),
            "admission_type": pa.array(["EW EMER."] * v_total, type=pa.string()),
            "hospital_expire_flag": np.zeros(v_total, dtype=np.int64),
        }),
        "diagnoses_icd": pa.table({
            "subject_id": np.repeat(v_subject, tl.n_codes), "hadm_id": np.repeat(tl.hadm, tl.n_codes),
            "seq_num": tl.seq_num, "icd_code": tl.codes,
            "icd_version": np.full(d_total, ICD_VERSIONS[code_system], dtype=np.int64),
        }),
    }
    hosp = Path(out_dir) / "hosp"

    def writer(table: pa.Table):
        def write(tmp: str) -> None:
            with pa.CompressedOutputStream(tmp, "gzip") as stream:
                pa_csv.write_csv(table, stream)
        return write

    return dict(zip(tables, atomic_write_all({hosp / f"{name}.csv.gz": writer(t) for name, t in tables.items()})))
