"""Cohort I/O: the ONE place patients are laid out in time (`timeline`), the MIMIC-III CSV writer
(simulator, generation) and Parquet helpers. The MIMIC-IV and MEDS writers take their dates
from the same `timeline`.

Patients follow `promptehr_hf.datasets_scripts.schema` (subject_id, age, sex, visits and the
optional time fields stay_days, gap_days, hospital_death, death_days).

`write_mimic3_csvs` writes `PATIENTS.csv`, `ADMISSIONS.csv` and `DIAGNOSES_ICD.csv` with the
upper-case MIMIC-III headers, so `promptehr_hf.datasets_scripts.mimic3.read_mimic3` reads them
back into the same patients (ages to 0.01 year, which is the reader's precision):

- each patient's first admission falls on a random minute in 2100-2200 (MIMIC's shifted
  years; earlier, by whole days, for a history that would otherwise run past 2250), with the
  DOB at midnight round(age * 365.25) days earlier; later admissions follow,
  each after the previous discharge, so admittime order is visit order. A patient with
  `stay_days` and `gap_days` gets its own stays and gaps (to the second); one without (null)
  gets random ones (stay 1-15 days, then a gap of 1 day to 2 years, whole minutes), drawn as
  before the time fields existed (a time-free cohort gets the same dates for a seed);
- deaths: `hospital_death` -> DEATHTIME = the last DISCHTIME and HOSPITAL_EXPIRE_FLAG 1 on the
  last admission (0 elsewhere); the death, in hospital or `death_days` after the last discharge
  (to the second), is dated DOD (a midnight: the day of the death), with DOD_HOSP for a death in
  hospital, DOD_SSN for one outside, EXPIRE_FLAG 1; nobody else has a DOD. By construction no
  admission follows a death in hospital, no discharge precedes its admission and no stays
  overlap;
- an age of 90 (the cap) is written the way MIMIC-III writes patients over 89: DOB 300 years
  before the first admission, so the reader caps it back to 90 and counts it like a real record
  (a patient who turns 90 in a later admission is also counted by the reader's `ages_capped`);
- hadm_ids are a random permutation of 100000.. (not in time order, like MIMIC), but increasing
  among a patient's visits admitted at the same time;
  ROW_IDs count from 1; codes are written as given (dotless), in visit order as SEQ_NUM 1..n;
  strings and headers are double-quoted and missing values left empty, as in MIMIC-III v1.4.

Procedures and medications (`schema.MODALITY_FIELDS`), when some patient has them, are written
as PROCEDURES_ICD (ROW_ID, SUBJECT_ID, HADM_ID, SEQ_NUM 1..n, ICD9_CODE) and PRESCRIPTIONS (one
MAIN row per code: STARTDATE / ENDDATE the midnights of the visit's admission and discharge days,
DRUG and FORMULARY_DRUG_CD split from ``<NAME>//<FORMULARY>``, ``UNK`` written empty); a patient
whose field is null is written without rows (read back as empty lists). A cohort without them
writes neither table and removes one an earlier write left in the folder.

`write_mimic4_csvs` writes a MIMIC-IV folder, `hosp/patients.csv.gz`, `hosp/admissions.csv.gz`
and `hosp/diagnoses_icd.csv.gz`, with MIMIC-IV's columns and lower-case headers, which
`promptehr_hf.datasets_scripts.mimic4.read_mimic4` reads back into the same patients with their
ages floored to whole years (MIMIC-IV has no date of birth, only whole-year ages):

- the admission dates and hadm_ids are `timeline`'s (the same as write_mimic3_csvs' for a seed);
- `anchor_year` is the year of the patient's first admission and `anchor_age` the age floored
  to whole years, 91 for an age of 90 (MIMIC-IV's "over 89"); `anchor_year_group` is one of
  MIMIC-IV's five real periods ("2008 - 2010" ... "2020 - 2022"), chosen by subject_id;
- procedures_icd (subject_id, hadm_id, seq_num, chartdate = the admission's date, icd_code,
  icd_version) and prescriptions (subject_id, hadm_id, starttime / stoptime = admission /
  discharge, drug_type MAIN, drug, formulary_drug_cd) when the cohort has them, as above;
- codes are written with the one `icd_version` of the cohort's code system (10 for "icd10cm",
  9 for "icd9cm"), in visit order as seq_num 1..n; `admission_type` is "EW EMER." (MIMIC-IV's
  most frequent); `deathtime`, `hospital_expire_flag` and `dod` (a date) as the MIMIC-III
  writer's DEATHTIME, HOSPITAL_EXPIRE_FLAG and DOD.

Round trips (write, then read with the format's reader) give the same patients back to what the
layout holds: MIMIC CSVs and MEDS hold times to the second, so stays and gaps come back as the
float32 of their whole seconds (exactly the values given when those came from a reader; a
value read as float32 from a long gap, e.g. 21750 days, is written within 0.5 s of it and read
back equal); MIMIC's DOD / dod hold a date, so `death_days` comes back as whole days between
the last discharge's date and the date of death (exact for values read from MIMIC); MEDS holds
MEDS_DEATH's time (to the second), except that a death outside hospital at the discharge itself
(death_days < 1 s) is written a second after it, since at the discharge it reads as a death in
hospital. Ages: MIMIC-III and MEDS to 0.01 year, MIMIC-IV whole years. A patient without times
comes back with the random stays and gaps it was written with, and no death.

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

from promptehr_hf.datasets_scripts.medications import SEPARATOR, UNKNOWN
from promptehr_hf.datasets_scripts.schema import (
    AGE_CAP,
    MODALITY_FIELDS,
    PATIENT_FEATURES,
    SEXES,
    TIME_FIELDS,
    with_times,
    without_null_modalities,
)
from promptehr_hf.file_utils import atomic_write, atomic_write_all

DAYS_PER_YEAR = 365.25
SECONDS_PER_YEAR = DAYS_PER_YEAR * 86400
MIMIC_SHIFT_YEARS = 300.0  # apparent age MIMIC-III gives patients over 89
FIRST_HADM_ID = 100000


def patients_to_dataset(patients: Sequence[dict]) -> Dataset:
    """list of patient dicts -> `datasets.Dataset` with PATIENT_FEATURES (n_patients rows); a dict
    without the time fields (`schema.TIME_FIELDS`) or the modality fields (`schema.MODALITY_FIELDS`)
    gets them null."""
    return Dataset.from_dict(
        {
            "subject_id": [int(p["subject_id"]) for p in patients],
            "age": [float(p["age"]) for p in patients],
            "sex": [p["sex"] for p in patients],
            "visits": [p["visits"] for p in patients],
            **{name: [p.get(name) for p in patients] for name in (*TIME_FIELDS, *MODALITY_FIELDS)},
        },
        features=PATIENT_FEATURES,
    )


def with_time_columns(table: pa.Table) -> pa.Table:
    """An Arrow table of patients (e.g. a Parquet file written before the time or modality fields
    existed) with PATIENT_FEATURES' columns in order, a missing time or modality column added as
    nulls. Other columns are dropped."""
    schema = PATIENT_FEATURES.arrow_schema
    for name in (*TIME_FIELDS, *MODALITY_FIELDS):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(list(PATIENT_FEATURES))


def dataset_to_patients(ds: Dataset) -> list[dict]:
    """`datasets.Dataset` with PATIENT_FEATURES -> list of patient dicts (age as a Python float); a
    dataset without the time columns gives them as None; a null procedures or medications value is
    left out of the dict, as the readers give a cohort without that table."""
    rows = ds.select_columns([c for c in PATIENT_FEATURES if c in ds.column_names]).to_list()
    return [without_null_modalities(with_times(p)) for p in rows]


def _patients_table(patients: Sequence[dict] | Dataset) -> pa.Table:
    """Patients -> one Arrow table with PATIENT_FEATURES' columns (time and modality columns null where absent)."""
    if not isinstance(patients, Dataset):
        patients = patients_to_dataset(patients)
    present = [c for c in PATIENT_FEATURES if c in patients.column_names]
    return with_time_columns(patients.select_columns(present).with_format("arrow")[:].combine_chunks())


def write_parquet(patients: Sequence[dict] | Dataset, path: str | os.PathLike) -> Path:
    """Write patients (list of dicts or a Dataset) to one Parquet file, atomically."""
    table = _patients_table(patients)  # carries the datasets features in its schema metadata
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _timestamps(seconds: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    """int64 seconds since 1970 -> Arrow timestamps (written as 'YYYY-MM-DD HH:MM:SS', MIMIC's format);
    null where `null` is True (written empty)."""
    return pa.array(seconds.astype(np.int64), type=pa.int64(), mask=null).cast(pa.timestamp("s"))


def _death_visits(tl: Timeline) -> np.ndarray:
    """[v_total] the visits at which the patient died in hospital (their last ones)."""
    last = np.zeros(len(tl.admit), dtype=bool)
    last[np.cumsum(tl.n_visits) - 1] = True
    return last & tl.hospital_death[tl.patient]

# Nothing is written after this time (seconds since 1970): pandas parses dates up to 2262.
LATEST_TIME = int(np.datetime64("2250-01-01T00:00:00", "s").astype(np.int64))


@dataclass(frozen=True)
class Timeline:
    """Patients laid out in time, column-wise: what every table writer (MIMIC-III, MIMIC-IV,
    MEDS) writes. Times are int64 seconds since 1970, in whole minutes (MIMIC's resolution).

    Per patient [n]: ``subject``, ``age`` (float64, as given), ``sex`` (Arrow strings),
    ``n_visits``, ``dob`` (midnight; an age of 90 is written ``MIMIC_SHIFT_YEARS`` before the first
    admission, MIMIC-III's way), ``hospital_death`` (died at the last discharge), ``has_death``
    (a death is known: in hospital or with death_days), ``death`` (its time; 0 where none) and
    ``dod_day`` (days since 1970 of the date of death written as DOD / dod; 0 where none). Per
    visit [v_total]: ``patient`` (row in the patient arrays), ``admit``, ``disch``, ``hadm``,
    ``n_codes``. Per diagnosis row [d_total]: ``codes`` (Arrow strings, visit order),
    ``seq_num`` (1..n within its visit). ``procedures`` / ``medications``: the cohort's
    :class:`Modality` of that name, None when no patient has it.
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
    hospital_death: np.ndarray
    has_death: np.ndarray
    death: np.ndarray
    dod_day: np.ndarray
    procedures: Modality | None = None
    medications: Modality | None = None


@dataclass(frozen=True)
class Modality:
    """One per-visit code list field of a cohort, column-wise: ``n_codes`` [v_total] codes per
    visit (0 for every visit of a patient whose field is null), ``codes`` (Arrow strings, visit
    order), ``seq_num`` (1..n within its visit)."""

    n_codes: np.ndarray
    codes: pa.Array
    seq_num: np.ndarray


def _seq_num(n_codes: np.ndarray) -> np.ndarray:
    """1..n within each visit of [v] counts."""
    first = np.r_[0, np.cumsum(n_codes)[:-1]].astype(np.int64)
    return np.arange(int(n_codes.sum())) - np.repeat(first, n_codes) + 1


def _modality(t: pa.Table, name: str, subject: np.ndarray, n_visits: np.ndarray, writer: str) -> Modality | None:
    """The cohort's `name` field (procedures or medications) column-wise; None when every patient's
    is null. ValueError, naming the subject_id, for a list whose length is not the number of
    visits, or a null or empty code."""
    col = t[name].combine_chunks() if t.num_rows else pa.nulls(0, pa.list_(pa.list_(pa.string())))
    own = col.is_valid().to_numpy(zero_copy_only=False)
    if not own.any():
        return None
    length = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    bad = own & (length != n_visits)
    if bad.any():
        raise ValueError(f"{writer}: subject_id {subject[bad][0]} has {int(length[bad][0])} {name} lists for "
                         f"{int(n_visits[bad][0])} visits")
    visit_lists = pc.list_flatten(col)  # the visits of the patients that have the field
    per_visit = np.zeros(int(n_visits.sum()), dtype=np.int64)
    per_visit[np.repeat(own, n_visits)] = pc.fill_null(pc.list_value_length(visit_lists), 0).to_numpy(
        zero_copy_only=False)
    codes = pc.list_flatten(visit_lists)
    empty = pc.fill_null(pc.equal(codes, ""), True).to_numpy(zero_copy_only=False)
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        visit = int(np.searchsorted(np.cumsum(per_visit), row, side="right"))
        owner = subject[np.repeat(np.arange(len(subject)), n_visits)[visit]]
        raise ValueError(f"{writer}: subject_id {owner} has a null or empty code in {name}")
    return Modality(n_codes=per_visit, codes=codes, seq_num=_seq_num(per_visit))


def timeline(patients: Sequence[dict] | Dataset, seed: int = 0, writer: str = "timeline") -> Timeline:
    """Lay patients out in time (see the module docstring for the dates); ``seed`` draws the dates
    and hadm_ids. ValueError, naming ``writer`` and the subject_id, on a patient with no visit, a
    bad age or sex, a repeated subject_id, only one of stay_days / gap_days, one whose length is
    not the number of visits, a negative or NaN stay, gap or death_days, both hospital_death
    and death_days, or procedures / medications with a list count other than the number of
    visits or a null or empty code.
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
    # Random stays and gaps (whole minutes), replaced by the patient's own where it has them (seconds).
    stay = 60 * rng.integers(1 * 1440, 15 * 1440, size=v_total)
    gap_min = 1440 + rng.exponential(180 * 1440, size=v_total).astype(np.int64).clip(0, 730 * 1440)
    gap = 60 * np.r_[0, gap_min[:-1]]  # gap before each visit
    own, own_stay, own_gap = _own_times(t, subject, n_visits, writer)
    own_visit = np.repeat(own, n_visits)
    stay[own_visit], gap[own_visit] = own_stay, own_gap
    step = np.where(is_first, 0, np.r_[0, stay[:-1]] + gap)  # from the previous admission
    offset = np.cumsum(step)
    offset -= np.repeat(offset[first_visit], n_visits)  # restart at each patient's first visit
    admit = np.repeat(first_admit, n_visits) + offset
    disch = admit + stay
    hospital_death, has_death, death, dod_day = _deaths(t, subject, disch[first_visit + n_visits - 1], writer)
    # A history of decades (a newborn readmitted for sixty years) must end before the last date
    # pandas can parse (2262): such a patient starts earlier, by whole days.
    end = np.maximum(disch[first_visit + n_visits - 1], death)
    shift = np.ceil(np.maximum(end - LATEST_TIME, 0) / 86400).astype(np.int64)
    if shift.any():
        dob = dob - 86400 * shift
        admit, disch = admit - 86400 * np.repeat(shift, n_visits), disch - 86400 * np.repeat(shift, n_visits)
        death, dod_day = np.where(has_death, death - 86400 * shift, 0), np.where(has_death, dod_day - shift, 0)

    hadm = FIRST_HADM_ID + rng.permutation(v_total)
    # Visits admitted at the same time (own times: a stay of 0, then a gap of 0) get increasing
    # hadm_ids, so that the readers' (admittime, hadm_id) order is still visit order.
    run = np.cumsum(is_first | np.r_[True, np.diff(admit) != 0])
    hadm = hadm[np.lexsort((hadm, run))]
    return Timeline(subject=subject, age=age, sex=sex, n_visits=n_visits, dob=dob,
                    patient=np.repeat(np.arange(n), n_visits), admit=admit, disch=disch, hadm=hadm,
                    n_codes=d_len, codes=visit_codes.flatten(), seq_num=_seq_num(d_len),
                    hospital_death=hospital_death, has_death=has_death, death=death, dod_day=dod_day,
                    procedures=_modality(t, "procedures", subject, n_visits, writer),
                    medications=_modality(t, "medications", subject, n_visits, writer))


def _seconds(days: np.ndarray) -> np.ndarray:
    """float days -> int64 whole seconds (nearest)."""
    return np.round(days.astype(np.float64) * 86400).astype(np.int64)


def _own_times(t: pa.Table, subject: np.ndarray, n_visits: np.ndarray,
               writer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients with stay_days and gap_days ([n] bool) and their stays and gaps in whole seconds
    (one per visit of those patients, the first visit's gap unused). ValueError, naming the
    subject_id, for only one of the two, a length other than the visits', or a value < 0 or NaN."""
    cols = {name: t[name].combine_chunks() for name in ("stay_days", "gap_days")}
    valid = {name: col.is_valid().to_numpy(zero_copy_only=False) for name, col in cols.items()}
    half = valid["stay_days"] != valid["gap_days"]
    if half.any():
        raise ValueError(f"{writer}: subject_id {subject[half][0]} has only one of stay_days and gap_days")
    own = valid["stay_days"]
    out = []
    for name, col in cols.items():
        length = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        bad = own & (np.nan_to_num(length, nan=-1) != n_visits)
        if bad.any():
            raise ValueError(f"{writer}: subject_id {subject[bad][0]} has {int(length[bad][0])} {name} for "
                             f"{int(n_visits[bad][0])} visits")
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        bad_value = ~(values >= 0) | ~np.isfinite(values)
        if bad_value.any():
            owner = np.repeat(subject[own], n_visits[own])[bad_value][0]
            raise ValueError(f"{writer}: subject_id {owner} has a {name} value that is negative, NaN or infinite")
        out.append(_seconds(values))
    return own, out[0], out[1]


def _deaths(t: pa.Table, subject: np.ndarray, last_disch: np.ndarray,
            writer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hospital_death, has_death, death time, dod_day) per patient: a death in hospital at the last
    discharge, one death_days after it. ValueError, naming the subject_id, for both at once or a
    death_days < 0 or NaN."""
    hospital = t["hospital_death"].combine_chunks()
    hospital = pc.fill_null(hospital, False).to_numpy(zero_copy_only=False).astype(bool)
    days = t["death_days"].combine_chunks()
    outside = days.is_valid().to_numpy(zero_copy_only=False)
    days = pc.fill_null(days, 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    both = hospital & outside
    if both.any():
        raise ValueError(f"{writer}: subject_id {subject[both][0]} has both hospital_death and death_days "
                         "(death_days is for a death outside hospital)")
    bad = outside & (~(days >= 0) | ~np.isfinite(days))
    if bad.any():
        raise ValueError(f"{writer}: subject_id {subject[bad][0]} has a death_days that is negative, NaN or infinite")
    death = np.where(hospital | outside, last_disch + np.where(outside, _seconds(days), 0), 0)
    return hospital, hospital | outside, death, death // 86400


def _tables(patients: Sequence[dict] | Dataset, seed: int) -> dict[str, pa.Table]:
    """patients -> the three MIMIC-III tables (upper-case headers), built column-wise in Arrow."""
    tl = timeline(patients, seed, writer="write_mimic3_csvs")
    n, v_total, d_total = len(tl.subject), len(tl.admit), len(tl.codes)
    v_subject = tl.subject[tl.patient]
    dod = _timestamps(86400 * tl.dod_day, ~tl.has_death)
    outside = tl.has_death & ~tl.hospital_death
    died_here = _death_visits(tl)
    return {
        "PATIENTS": pa.table({
            "ROW_ID": np.arange(1, n + 1), "SUBJECT_ID": tl.subject, "GENDER": tl.sex, "DOB": _timestamps(tl.dob),
            "DOD": dod, "DOD_HOSP": _timestamps(86400 * tl.dod_day, ~tl.hospital_death),
            "DOD_SSN": _timestamps(86400 * tl.dod_day, ~outside), "EXPIRE_FLAG": tl.has_death.astype(np.int64),
        }),
        "ADMISSIONS": pa.table({
            "ROW_ID": np.arange(1, v_total + 1), "SUBJECT_ID": v_subject, "HADM_ID": tl.hadm,
            "ADMITTIME": _timestamps(tl.admit), "DISCHTIME": _timestamps(tl.disch),
            "DEATHTIME": _timestamps(tl.disch, ~died_here), "HOSPITAL_EXPIRE_FLAG": died_here.astype(np.int64),
        }),
        "DIAGNOSES_ICD": pa.table({
            "ROW_ID": np.arange(1, d_total + 1), "SUBJECT_ID": np.repeat(v_subject, tl.n_codes),
            "HADM_ID": np.repeat(tl.hadm, tl.n_codes), "SEQ_NUM": tl.seq_num, "ICD9_CODE": tl.codes,
        }),
        **({} if tl.procedures is None else {"PROCEDURES_ICD": pa.table({
            "ROW_ID": np.arange(1, len(tl.procedures.codes) + 1),
            "SUBJECT_ID": np.repeat(v_subject, tl.procedures.n_codes),
            "HADM_ID": np.repeat(tl.hadm, tl.procedures.n_codes), "SEQ_NUM": tl.procedures.seq_num,
            "ICD9_CODE": tl.procedures.codes,
        })}),
        **({} if tl.medications is None else {"PRESCRIPTIONS": _prescriptions(tl, upper=True)}),
    }


def _prescriptions(tl: Timeline, upper: bool) -> pa.Table:
    """The prescriptions table of a timeline with medications: one MAIN row per code, dated at its
    visit's admission and discharge (MIMIC-III: STARTDATE / ENDDATE, midnights; MIMIC-IV: starttime /
    stoptime), the drug name and formulary code split from the code ("UNK" written empty)."""
    med = tl.medications
    parts = pc.split_pattern(med.codes, SEPARATOR, max_splits=1)
    formulary = pc.list_element(parts, 1)
    formulary = pc.if_else(pc.equal(formulary, UNKNOWN), pa.scalar(None, pa.string()), formulary)
    v_subject = tl.subject[tl.patient]
    start, stop = np.repeat(tl.admit, med.n_codes), np.repeat(tl.disch, med.n_codes)
    if upper:
        start, stop = start // 86400 * 86400, stop // 86400 * 86400
    n = len(med.codes)
    columns = {
        "row_id": np.arange(1, n + 1), "subject_id": np.repeat(v_subject, med.n_codes),
        "hadm_id": np.repeat(tl.hadm, med.n_codes),
        "startdate" if upper else "starttime": _timestamps(start),
        "enddate" if upper else "stoptime": _timestamps(stop),
        "drug_type": pa.array(["MAIN"] * n, type=pa.string()), "drug": pc.list_element(parts, 0),
        "formulary_drug_cd": formulary,
    }
    if not upper:
        del columns["row_id"]  # MIMIC-IV's prescriptions have no row_id
    return pa.table({(k.upper() if upper else k): v for k, v in columns.items()})


def write_mimic3_csvs(patients: Sequence[dict] | Dataset, out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write patients as a MIMIC-III folder (PATIENTS/ADMISSIONS/DIAGNOSES_ICD.csv, and
    PROCEDURES_ICD.csv / PRESCRIPTIONS.csv when some patient has procedures / medications); return
    the paths keyed by table name.

    `seed` draws the dates and hadm_ids. The tables are replaced together only once all are
    written; then a PROCEDURES_ICD.csv or PRESCRIPTIONS.csv left in `out_dir` by an earlier write
    whose cohort had that field, and this one has not, is removed (the reader would take it for
    this cohort's). Other files in `out_dir` are left alone.
    """
    tables = _tables(patients, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writers = {out / f"{name}.csv": (lambda tmp, table=table: pa_csv.write_csv(table, tmp))
               for name, table in tables.items()}
    written = dict(zip(tables, atomic_write_all(writers)))
    _remove_unwritten(out, [f"{t}.csv" for t in MODALITY_TABLES["mimic3"] if t not in tables])
    return written


# The optional tables of each layout, in the order of schema.MODALITY_FIELDS.
MODALITY_TABLES = {"mimic3": ("PROCEDURES_ICD", "PRESCRIPTIONS"), "mimic4": ("procedures_icd", "prescriptions")}


def _remove_unwritten(folder: Path, names: list[str]) -> None:
    """Remove the files `names` from `folder` if there: optional tables of an earlier cohort."""
    for name in names:
        (folder / name).unlink(missing_ok=True)


MIMIC4_OVER_89 = 91  # MIMIC-IV's anchor_age of every patient over 89
MIMIC4_ANCHOR_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019", "2020 - 2022")
ICD_VERSIONS = {"icd9cm": 9, "icd10cm": 10}


def write_mimic4_csvs(patients: Sequence[dict] | Dataset, out_dir: str | os.PathLike, *, seed: int = 0,
                      code_system: str = "icd10cm") -> dict[str, Path]:
    """Write patients as a MIMIC-IV folder (hosp/patients, admissions, diagnoses_icd .csv.gz, and
    procedures_icd / prescriptions when some patient has procedures / medications); return the
    paths keyed by table name ("patients", "admissions", "diagnoses_icd", ...).

    `seed` draws the dates and hadm_ids (`timeline`); `code_system` ("icd10cm" or "icd9cm") is
    the patients' code system, written as every diagnosis and procedure row's icd_version
    (ICD-10-PCS procedures with ICD-10-CM, ICD-9 procedures with ICD-9-CM). The tables are
    replaced together only once all are written; a procedures_icd or prescriptions table left in
    hosp/ by an earlier write is then removed when this cohort has no such field. Other files
    are left alone.
    """
    if code_system not in ICD_VERSIONS:
        raise ValueError(f"write_mimic4_csvs: code_system={code_system!r}, expected one of {', '.join(ICD_VERSIONS)}")
    tl = timeline(patients, seed, writer="write_mimic4_csvs")
    v_total, d_total = len(tl.admit), len(tl.codes)
    v_subject = tl.subject[tl.patient]
    died_here = _death_visits(tl)
    first_admit = tl.admit[np.cumsum(tl.n_visits) - tl.n_visits]
    anchor_year = first_admit.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    anchor_age = np.where(tl.age >= AGE_CAP, MIMIC4_OVER_89, np.floor(tl.age)).astype(np.int64)
    groups = np.array(MIMIC4_ANCHOR_YEAR_GROUPS, dtype=object)[tl.subject % len(MIMIC4_ANCHOR_YEAR_GROUPS)]
    tables = {
        "patients": pa.table({
            "subject_id": tl.subject, "gender": tl.sex, "anchor_age": anchor_age, "anchor_year": anchor_year,
            "anchor_year_group": pa.array(groups, type=pa.string()),
            "dod": pa.array(tl.dod_day.astype(np.int32), type=pa.int32(), mask=~tl.has_death).cast(pa.date32()),
        }),
        "admissions": pa.table({
            "subject_id": v_subject, "hadm_id": tl.hadm, "admittime": _timestamps(tl.admit),
            "dischtime": _timestamps(tl.disch), "deathtime": _timestamps(tl.disch, ~died_here),
            "admission_type": pa.array(["EW EMER."] * v_total, type=pa.string()),
            "hospital_expire_flag": died_here.astype(np.int64),
        }),
        "diagnoses_icd": pa.table({
            "subject_id": np.repeat(v_subject, tl.n_codes), "hadm_id": np.repeat(tl.hadm, tl.n_codes),
            "seq_num": tl.seq_num, "icd_code": tl.codes,
            "icd_version": np.full(d_total, ICD_VERSIONS[code_system], dtype=np.int64),
        }),
    }
    if tl.procedures is not None:
        proc = tl.procedures
        tables["procedures_icd"] = pa.table({
            "subject_id": np.repeat(v_subject, proc.n_codes), "hadm_id": np.repeat(tl.hadm, proc.n_codes),
            "seq_num": proc.seq_num,
            "chartdate": _timestamps(np.repeat(tl.admit, proc.n_codes) // 86400 * 86400).cast(pa.date32()),
            "icd_code": proc.codes,
            "icd_version": np.full(len(proc.codes), ICD_VERSIONS[code_system], dtype=np.int64),
        })
    if tl.medications is not None:
        tables["prescriptions"] = _prescriptions(tl, upper=False)
    hosp = Path(out_dir) / "hosp"

    def writer(table: pa.Table):
        def write(tmp: str) -> None:
            with pa.CompressedOutputStream(tmp, "gzip") as stream:
                pa_csv.write_csv(table, stream)
        return write

    written = dict(zip(tables, atomic_write_all({hosp / f"{name}.csv.gz": writer(t) for name, t in tables.items()})))
    _remove_unwritten(hosp, [f"{t}.csv.gz" for t in MODALITY_TABLES["mimic4"] if t not in tables])
    return written
