"""MIMIC-III folder -> patient cohort (the schema of `schema.PATIENT_FEATURES`).

Reads `PATIENTS`, `ADMISSIONS` and `DIAGNOSES_ICD` (`.csv` or `.csv.gz`, file names and column
headers in upper or lower case) and turns them into one record per patient::

    {"subject_id": int, "age": float, "sex": "F" | "M", "visits": list[list[str]],
     "stay_days": list[float], "gap_days": list[float], "hospital_death": bool, "death_days": float | None}

Rules (every departure from a clean table is counted in the summary, never dropped silently):

- age = years (365.25 days) from `dob` to the patient's first admission with a diagnosis, rounded
  to 0.01 year; MIMIC shifts the date of birth of patients over 89 so that they look ~300 years
  old: any age above 90 is capped at 90 and the admission counted (`ages_capped`).
- visits in `admittime` order (ties by `hadm_id`); codes in `seq_num` order (missing last),
  normalised to dotless ICD-9-CM; empty codes, codes that are not ICD-9-CM v32 nodes, and a
  code repeated inside one admission are dropped and counted; admissions left with no code and
  patients left with no visit are dropped and counted.
- ICD-10 codes (a MIMIC-IV folder: an `icd_version` column saying 10, or codes shaped like
  ICD-10-CM such as `I10`, `E119`) are refused with an error; so are a missing file or column,
  an empty or unreadable (e.g. truncated gzip) table, duplicated keys, and unparseable ids,
  dates or sexes. Each error names the file and what is wrong.

Times and deaths (`read_times`, shared with `mimic4.read_mimic4`; the fields of `schema`). They
are read from ADMISSIONS' `dischtime`, `deathtime`, `hospital_expire_flag` and PATIENTS' `dod`,
`expire_flag`; without a `dischtime` column the cohort has no times (the four fields null, the
summary's `times` false) and a missing death column counts as empty (both listed in
`time_columns_missing`). An empty cell is "none" (an empty flag is 0); a non-empty cell that
does not parse (a time, or a flag other than 0 or 1) is an error naming the file, column and
row. Only the visits (admissions kept for their codes) are laid out:

- stay = dischtime - admittime. No dischtime: stay 0 (`missing_dischtimes`); dischtime before
  admittime: stay 0 (`inverted_stays`); the discharge is then taken at the admission.
- gap = admittime - the previous visit's (effective) discharge, 0 for the first visit; an
  admission before that discharge gets gap 0 (`overlapping_stays`; later visits move with it).
  The three count visits.
- an admission is a death in hospital when hospital_expire_flag = 1 or it has a deathtime (the
  two disagree: `expire_flag_without_deathtime`, `deathtime_without_expire_flag`, counted over
  ADMISSIONS rows of known patients; only when both columns exist). The stay still ends at the
  dischtime; a deathtime more than `DEATHTIME_SLACK_HOURS` (6) hours before or after it is
  counted (`deathtime_before_discharge`, `deathtime_after_discharge`).
- hospital_death = the patient's last visit is a death in hospital. A death in hospital at an
  earlier visit is ignored, the later visits kept (`hospital_deaths_before_last_visit`, counting
  such visits). A death at an admission dropped for having no code
  (`deaths_at_dropped_admissions`) is, when it is after the last visit, the patient's death
  outside the visits, on the day of its deathtime (else its dischtime); one before the last
  visit is ignored.
- otherwise the death outside is the `dod`, which is a date. Either way death_days is the whole
  days from the last discharge's date to the day of death (0 for the same day, never < 0), so
  that a MIMIC round trip (which writes that death as a DOD) gives it back exactly. A dod on a
  day before the last discharge's gives 0 (`dod_before_last_discharge`). No dod: death_days
  null (also for expire_flag = 1).
- counted over PATIENTS rows, nothing changed: `expire_flag_without_dod`,
  `dod_without_expire_flag` (the dod is used); over patients who died in hospital:
  `dod_not_at_hospital_death` (no dod, or a dod on another day than the deathtime's, else the
  dischtime's).

Stays, gaps and death_days are float32 days (a dict holds the float32 value as a Python float,
so a Dataset round trip gives the same value). The summary adds `times`, `hospital_deaths`,
`deaths_after_discharge` (patients with a death_days) and `time_columns_missing`.

The summary says `"code_system": "icd9cm"` and `"format": "mimic3"`.

Procedures and medications (`read_modalities`, shared with `mimic4.read_mimic4`): the optional
PROCEDURES_ICD (`hadm_id`, `seq_num`, `icd9_code`: ICD-9-CM volume 3, `procedures.ICD9PROC`) and
PRESCRIPTIONS (`hadm_id`, `drug`, optional `drug_type`, `formulary_drug_cd`, `startdate`:
`medications` codes) are read when the folder has them, into each patient's `procedures` /
`medications` (one list per visit); a folder without them reads as before, the fields left out
of the patient dicts. Their rows are counted as `modalities` says, in the summary's
`procedures` / `medications` (None for an absent table), with one message per non-zero count.

`find_tables` also looks in MIMIC-IV's `hosp/` sub-folder when the tables are not in the folder
itself; `mimic4.read_mimic4` reads MIMIC-IV folders with this module's table helpers, and
`cohort.CohortBuilder` turns either (or a MEDS folder) into train/validation/test datasets.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import logging
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from promptehr_hf.datasets_scripts import icd9, medications, modalities
from promptehr_hf.datasets_scripts.modalities import N_EXAMPLES
from promptehr_hf.datasets_scripts.procedures import ICD9PROC, ProcedureCodes
from promptehr_hf.datasets_scripts.schema import AGE_CAP, NO_TIMES, SEXES

logger = logging.getLogger(__name__)

TABLES = ("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD")
OPTIONAL_TABLES = ("PROCEDURES_ICD", "PRESCRIPTIONS")  # read when present (schema.MODALITY_FIELDS)
ADMISSION_TIME_COLUMNS = ("dischtime", "deathtime", "hospital_expire_flag")
DAYS_PER_YEAR = 365.25
AGE_DECIMALS = 2  # ages are kept to 0.01 year (~4 days), so they survive a CSV round trip exactly

# Dotless ICD-9-CM: 3-5 digits, V + 2-4 digits, E000-E030 / E800-E999 (+ one digit).
_ICD9_SHAPE = re.compile(r"^(\d{3,5}|V\d{2,4}|E(0[0-2]\d|030|[89]\d\d)\d?)$")
# Dotless ICD-10-CM: a letter, a digit, then 1-5 letters or digits.
_ICD10_SHAPE = re.compile(r"^[A-Z]\d[0-9A-Z]{1,5}$")


class Mimic3Error(ValueError):
    """A MIMIC-III (or MIMIC-IV) folder that cannot be read; the message names the file and the problem."""


# --------------------------------------------------------------------------- files and tables


def _by_lower_name(folder: Path) -> dict[str, list[Path]]:
    by_name: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        by_name.setdefault(path.name.lower(), []).append(path)
    return by_name


def find_tables(mimic_dir: str | os.PathLike) -> dict[str, Path]:
    """Map each of TABLES to its file (`NAME.csv` or `NAME.csv.gz`, any case) in `mimic_dir` or,
    when none of the three is there, in its `hosp/` sub-folder (MIMIC-IV's layout); each of
    OPTIONAL_TABLES present in that folder is mapped too."""
    folder = Path(mimic_dir)
    if not folder.is_dir():
        raise Mimic3Error(f"{folder}: not a folder (expected a MIMIC-III or MIMIC-IV folder with {', '.join(TABLES)})")
    by_name = _by_lower_name(folder)
    hosp = [p for p in by_name.get("hosp", []) if p.is_dir()]
    if hosp and not any(f"{t.lower()}{ext}" in by_name for t in TABLES for ext in (".csv", ".csv.gz")):
        folder = hosp[0]
        by_name = _by_lower_name(folder)
    found = {}
    for table in (*TABLES, *OPTIONAL_TABLES):
        candidates = by_name.get(f"{table.lower()}.csv", []) + by_name.get(f"{table.lower()}.csv.gz", [])
        if not candidates and table in OPTIONAL_TABLES:
            continue
        if not candidates:
            raise Mimic3Error(f"{folder}: missing file {table}.csv or {table}.csv.gz")
        if len(candidates) > 1:
            names = ", ".join(sorted(p.name for p in candidates))
            raise Mimic3Error(f"{folder}: {table} is present more than once ({names}); keep one")
        found[table] = candidates[0]
    return found


def file_fingerprints(mimic_dir: str | os.PathLike) -> dict[str, dict]:
    """Each table of `mimic_dir` -> {"file": path, "size": bytes, "mtime_ns": int, "sha256": hex digest}.

    `file` is the path relative to `mimic_dir` (`PATIENTS.csv.gz`, `hosp/patients.csv.gz`). The
    SHA-256 is of the file's bytes as stored (gzip included), read in 1 MiB blocks; a row edited
    in place shows in it even when the size and modification time are unchanged.
    """
    return {table: file_fingerprint(path, mimic_dir) for table, path in find_tables(mimic_dir).items()}


def file_fingerprint(path: Path, root: str | os.PathLike) -> dict:
    """{"file": path relative to `root`, "size", "mtime_ns", "sha256"} of one file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        while block := f.read(1 << 20):
            h.update(block)
    return {"file": Path(path).relative_to(root).as_posix(), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": h.hexdigest()}


def combine_fingerprints(files: dict[str, dict]) -> str:
    """A short hash (16 hex digits) of `file_fingerprints`' output."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(mimic_dir: str | os.PathLike) -> str:
    """A short hash of the tables' names, sizes, modification times and contents (cache key)."""
    return combine_fingerprints(file_fingerprints(mimic_dir))


def _read_csv(path: Path, table: str, **kwargs) -> pd.DataFrame:
    """pd.read_csv(path, **kwargs), its failures (empty, not UTF-8, truncated, corrupt) as Mimic3Error."""
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise Mimic3Error(f"{path}: the {table} table is empty (no header, no rows)") from None
    except UnicodeDecodeError as e:
        raise Mimic3Error(f"{path}: {_first_non_utf8(path)} in the {table} table; MIMIC CSVs are UTF-8 "
                          "(re-encode the file, e.g. with iconv)") from e
    except (EOFError, OSError, zlib.error, pd.errors.ParserError) as e:
        raise Mimic3Error(f"{path}: cannot read the {table} table (truncated or corrupt file?): {e}") from e


def _read_table(path: Path, table: str, required: list[str | tuple[str, ...]], optional: tuple[str, ...] = (),
                str_cols: tuple[str, ...] = (), allow_empty: bool = False) -> pd.DataFrame:
    """Read the named columns (matched case-insensitively) of one table, renamed to lower case.

    A tuple in `required` lists alternative names (first = canonical name, used in errors). A
    table with a header but no rows is an error unless `allow_empty`.
    """
    header = _read_csv(path, table, nrows=0).columns
    by_lower = {str(c).strip().lower(): c for c in header}
    wanted, missing = {}, []  # canonical name -> name in the file
    for names in [(r,) if isinstance(r, str) else r for r in required]:
        present = [n for n in names if n in by_lower]
        if present:
            wanted[names[0]] = by_lower[present[0]]
        else:
            missing.append(names[0])
    if missing:
        raise Mimic3Error(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} in the {table} table "
            f"(found: {', '.join(map(str, header))})"
        )
    wanted.update({c: by_lower[c] for c in optional if c in by_lower})
    df = _read_csv(path, table, usecols=list(wanted.values()), dtype={wanted[c]: str for c in str_cols if c in wanted})
    df = df.rename(columns={v: k for k, v in wanted.items()})
    if len(df) == 0 and not allow_empty:
        raise Mimic3Error(f"{path}: the {table} table has a header but no rows")
    return df


def _first_non_utf8(path: Path) -> str:
    """Where the first byte that is not UTF-8 lies in a text file (gzipped if named .gz)."""
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    return (f"non-UTF-8 byte 0x{line[err.start]:02x} at line {number} (data row {number - 1}), "
                            f"byte {err.start + 1} of the line")
    except (EOFError, OSError, zlib.error):
        pass
    return "a byte that is not UTF-8"


def _plain(value):
    """A numpy scalar as the Python value it holds, so that messages show 10, not np.int64(10)."""
    return value.item() if isinstance(value, np.generic) else value


def _bad(path: Path, col: str, mask: pd.Series, values: pd.Series, what: str) -> Mimic3Error:
    """Error naming the file, column, count and first offending data row (1-based)."""
    rows = np.flatnonzero(mask.to_numpy())
    return Mimic3Error(
        f"{path}: column {col} has {len(rows)} {what} value{'s' if len(rows) > 1 else ''}, "
        f"first at data row {rows[0] + 1}: {_plain(values.iloc[rows[0]])!r}"
    )


def _int_column(df: pd.DataFrame, col: str, path: Path, allow_missing: bool = False) -> pd.Series:
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce")
    bad = (num.isna() & raw.notna()) | (num.notna() & (num != num.round()))
    if not allow_missing:
        bad |= raw.isna()
    if bad.any():
        raise _bad(path, col, bad, raw, "missing or non-integer")
    return num if allow_missing else num.astype("int64")


def _date_column(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    parsed = pd.to_datetime(df[col], format="ISO8601", errors="coerce")
    if parsed.isna().any():
        raise _bad(path, col, parsed.isna(), df[col], "missing or unparseable (not ISO 8601) date")
    return parsed


def _unique_key(ids: pd.Series, col: str, path: Path) -> None:
    dup = ids.duplicated()
    if dup.any():
        raise _bad(path, col, dup, ids, "duplicated")


def _optional_date_column(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    """An optional date column (all NaT when absent): empty cells are NaT, anything else must parse."""
    if col not in df.columns:
        return pd.Series(pd.NaT, index=df.index, dtype="datetime64[ns]")
    raw = df[col]
    parsed = pd.to_datetime(raw, format="ISO8601", errors="coerce")
    bad = parsed.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
    if bad.any():
        raise _bad(path, col, bad, raw, "unparseable (not ISO 8601) date")
    return parsed.astype("datetime64[ns]")


def _flag_column(df: pd.DataFrame, col: str, path: Path) -> np.ndarray | None:
    """An optional 0/1 column as a bool array (a missing cell is 0); None when the column is absent."""
    if col not in df.columns:
        return None
    num = _int_column(df, col, path, allow_missing=True)
    bad = num.notna() & ~num.isin((0, 1))
    if bad.any():
        raise _bad(path, col, bad, df[col], "non-0/1")
    return (num == 1).to_numpy()


# --------------------------------------------------------------------------- times and deaths

DAY_NS = 86400 * 10**9
DEATHTIME_SLACK_HOURS = 6  # a deathtime further than this from its dischtime is counted
TIME_QUIRKS = ("missing_dischtimes", "inverted_stays", "overlapping_stays", "expire_flag_without_deathtime",
               "deathtime_without_expire_flag", "deathtime_before_discharge", "deathtime_after_discharge",
               "hospital_deaths_before_last_visit", "deaths_at_dropped_admissions", "dod_before_last_discharge",
               "dod_not_at_hospital_death", "expire_flag_without_dod", "dod_without_expire_flag")
_TIME_QUIRK_TEXT = {
    "missing_dischtimes": ("ADMISSIONS", "visits without a dischtime: stay set to 0"),
    "inverted_stays": ("ADMISSIONS", "visits discharged before their admission: stay set to 0"),
    "overlapping_stays": ("ADMISSIONS", "visits admitted before the previous visit's discharge: gap set to 0"),
    "expire_flag_without_deathtime": ("ADMISSIONS", "admissions with hospital_expire_flag 1 but no deathtime "
                                                    "(taken as deaths in hospital)"),
    "deathtime_without_expire_flag": ("ADMISSIONS", "admissions with a deathtime but hospital_expire_flag 0 "
                                                    "(taken as deaths in hospital)"),
    "deathtime_before_discharge": ("ADMISSIONS", f"admissions with a deathtime over {DEATHTIME_SLACK_HOURS} h "
                                                 "before the dischtime (the stay ends at the dischtime)"),
    "deathtime_after_discharge": ("ADMISSIONS", f"admissions with a deathtime over {DEATHTIME_SLACK_HOURS} h "
                                                "after the dischtime (the stay ends at the dischtime)"),
    "hospital_deaths_before_last_visit": ("ADMISSIONS", "deaths in hospital at a visit that is not the patient's "
                                                        "last were ignored (the later visits kept)"),
    "deaths_at_dropped_admissions": ("ADMISSIONS", "deaths in hospital at an admission dropped for having no "
                                                   "code (after the last visit: a death outside the visits at "
                                                   "its deathtime; else ignored)"),
    "dod_before_last_discharge": ("PATIENTS", "patients whose dod is a day before their last discharge: "
                                              "death_days set to 0"),
    "dod_not_at_hospital_death": ("PATIENTS", "patients who died in hospital with no dod or a dod on another "
                                              "day (the hospital death kept)"),
    "expire_flag_without_dod": ("PATIENTS", "patients with expire_flag 1 but no dod (no time of death known)"),
    "dod_without_expire_flag": ("PATIENTS", "patients with a dod but expire_flag 0 (the dod kept)"),
}


def _ns(times: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """datetime64 Series -> (int64 nanoseconds since 1970, NaT mask)."""
    values = times.to_numpy(dtype="datetime64[ns]")
    return values.view(np.int64), np.isnat(values)


def visit_times(subject: np.ndarray, admit: np.ndarray, disch: np.ndarray, missing: np.ndarray,
                has_code: np.ndarray, quirks: dict,
                per_day: int = DAY_NS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stays and gaps of the kept admissions (`has_code`) of admissions sorted by (subject, admittime).

    admit, disch: [n] int64 times, `per_day` units a day (ns by default; disch meaningless where
    `missing`). A missing or inverted
    discharge is taken at the admission (stay 0); a gap < 0 (overlap) is set to 0. Counts
    `missing_dischtimes`, `inverted_stays`, `overlapping_stays` over the kept admissions.
    Returns (stay days [n] float32, gap days [n] float32, NaN where not kept; the effective
    discharge [n] int64 ns; last [n_patients]: position of each patient's last kept admission).
    """
    inverted = ~missing & (disch < admit)
    quirks["missing_dischtimes"] = int((missing & has_code).sum())
    quirks["inverted_stays"] = int((inverted & has_code).sum())
    disch = np.where(missing | inverted, admit, disch)
    k = np.flatnonzero(has_code)
    sk = subject[k]
    new = np.r_[True, sk[1:] != sk[:-1]] if len(k) else np.zeros(0, dtype=bool)
    gap = np.where(new, 0, admit[k] - np.r_[0, disch[k][:-1]])
    quirks["overlapping_stays"] = int((gap < 0).sum())
    stay_days = np.full(len(admit), np.nan, dtype=np.float32)
    gap_days = np.full(len(admit), np.nan, dtype=np.float32)
    stay_days[k] = (disch[k] - admit[k]) / per_day
    gap_days[k] = np.clip(gap, 0, None) / per_day
    last = k[np.r_[new[1:], True]] if len(k) else k
    return stay_days, gap_days, disch, last


def read_times(adm: pd.DataFrame, has_code: np.ndarray, expire: np.ndarray | None, pat: pd.DataFrame,
               expire_flag: np.ndarray | None, quirks: dict, *, deathtimes: bool = True,
               dods: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The time fields of a MIMIC cohort (rules: module docstring), counting `TIME_QUIRKS` in `quirks`.

    adm: admissions sorted by (subject_id, admittime, hadm_id) with datetime64 columns admittime,
    dischtime, deathtime (NaT: none); has_code [n_adm]: the admissions kept as visits; expire
    [n_adm]: hospital_expire_flag == 1 (None: no such column); pat: PATIENTS rows with
    subject_id and dod (NaT: none); expire_flag [n_pat]: expire_flag == 1 (None: no column);
    deathtimes / dods: whether the tables have those columns (else nothing is compared with them).
    Returns (adm with float32 columns stay_days and gap_days, per-patient outcomes indexed by
    subject_id: hospital_death, death_days (NaN: none)).
    """
    subject = adm["subject_id"].to_numpy()
    admit, _ = _ns(adm["admittime"])
    disch_raw, missing = _ns(adm["dischtime"])
    death_raw, no_deathtime = _ns(adm["deathtime"])
    stay, gap, disch, last = visit_times(subject, admit, disch_raw, missing, has_code, quirks)
    adm = adm.assign(stay_days=stay, gap_days=gap)

    has_deathtime = ~no_deathtime
    died = has_deathtime if expire is None else has_deathtime | expire
    if expire is not None and deathtimes:
        quirks["expire_flag_without_deathtime"] = int((expire & no_deathtime).sum())
        quirks["deathtime_without_expire_flag"] = int((has_deathtime & ~expire).sum())
    slack = DEATHTIME_SLACK_HOURS * 3600 * 10**9
    both = has_deathtime & ~missing
    quirks["deathtime_before_discharge"] = int((both & (death_raw < disch_raw - slack)).sum())
    quirks["deathtime_after_discharge"] = int((both & (death_raw > disch_raw + slack)).sum())

    # Per patient with a visit: the last kept admission, a death there, after it, or a dod.
    is_last = np.zeros(len(adm), dtype=bool)
    is_last[last] = True
    quirks["hospital_deaths_before_last_visit"] = int((died & has_code & ~is_last).sum())
    p_subject = subject[last]
    last_of = pd.Series(last, index=p_subject)
    in_cohort = np.isin(subject, p_subject)
    dropped_death = died & ~has_code & in_cohort
    quirks["deaths_at_dropped_admissions"] = int(dropped_death.sum())
    hospital = died[last]
    death_time = np.where(has_deathtime, death_raw, np.where(missing, admit, disch_raw))
    after = np.flatnonzero(dropped_death)
    after = after[after > last_of.reindex(subject[after]).to_numpy()]  # first one per subject: sorted by time
    later = pd.Series(death_time[after], index=subject[after])
    later = later[~later.index.duplicated()].reindex(p_subject)
    last_disch = disch[last]
    # Deaths outside the visits are counted in whole days between dates, as a dod is.
    last_day = np.floor(last_disch / DAY_NS)
    death_ns = np.where(later.notna().to_numpy(), np.floor(later.fillna(0).to_numpy(np.int64) / DAY_NS) - last_day,
                        np.nan)
    death_ns = np.clip(death_ns, 0, None) * DAY_NS

    dod_ns, no_dod = _ns(pat["dod"])
    dod = pd.Series(np.where(no_dod, np.nan, dod_ns.astype(np.float64)), index=pat["subject_id"].to_numpy())
    p_dod = dod.reindex(p_subject).to_numpy()
    has_dod = ~np.isnan(p_dod)
    use_dod = ~hospital & np.isnan(death_ns) & has_dod
    # A dod is a date: whole days from the last discharge's date to it.
    dod_day = np.floor(np.where(has_dod, p_dod, 0) / DAY_NS)
    dod_days = dod_day - last_day
    quirks["dod_before_last_discharge"] = int((use_dod & (dod_days < 0)).sum())
    death_ns = np.where(use_dod, np.clip(dod_days, 0, None) * DAY_NS, death_ns)
    if dods:
        death_day = np.floor(np.where(has_deathtime, death_raw, disch)[last] / DAY_NS)
        quirks["dod_not_at_hospital_death"] = int((hospital & (~has_dod | (dod_day != death_day))).sum())
    if expire_flag is not None and dods:
        quirks["expire_flag_without_dod"] = int((expire_flag & no_dod).sum())
        quirks["dod_without_expire_flag"] = int((~expire_flag & ~no_dod).sum())
    outcomes = pd.DataFrame({"hospital_death": hospital,
                             "death_days": (death_ns / DAY_NS).astype(np.float32)}, index=p_subject)
    return adm, outcomes


# --------------------------------------------------------------------------- the reader


def _read_admissions(path: Path) -> tuple[pd.DataFrame, int, list[str]]:
    """The ADMISSIONS table (MIMIC-III's or MIMIC-IV's: the same columns, in any case) with parsed ids,
    admittime, dischtime, deathtime and ``expire`` (hospital_expire_flag, False when absent):
    (table, rows read, the optional time columns the file lacks)."""
    adm = _read_table(path, "ADMISSIONS", ["subject_id", "hadm_id", "admittime"], optional=ADMISSION_TIME_COLUMNS)
    rows_read = len(adm)
    adm["subject_id"] = _int_column(adm, "subject_id", path)
    adm["hadm_id"] = _int_column(adm, "hadm_id", path)
    _unique_key(adm["hadm_id"], "hadm_id", path)
    adm["admittime"] = _date_column(adm, "admittime", path)
    absent = [c for c in ADMISSION_TIME_COLUMNS if c not in adm.columns]
    expire = _flag_column(adm, "hospital_expire_flag", path)
    adm["expire"] = False if expire is None else expire
    for col in ("dischtime", "deathtime"):
        adm[col] = _optional_date_column(adm, col, path)
    return adm, rows_read, absent


def read_mimic3(mimic_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """Read a MIMIC-III folder into patients (the schema of `schema.PATIENT_FEATURES`) and a summary.

    Returns `(patients, summary)`: patients sorted by subject_id; the summary (JSON-ready) holds
    `format` ("mimic3"), `code_system` ("icd9cm"), `patients`, `admissions`, `diagnosis_rows`
    (codes loaded), `distinct_codes`, `rows_read` per table, `quirks` (each count, zero
    included), `invalid_code_examples`, `files` and `messages` (one readable line per non-zero
    quirk, naming the file).
    Raises Mimic3Error for a folder that cannot be read as ICD-9-CM MIMIC-III.
    """
    files = find_tables(mimic_dir)
    quirks = dict.fromkeys(
        ("ages_capped", "ages_negative", "admissions_without_diagnoses", "admissions_without_valid_codes",
         "empty_codes", "invalid_codes", "duplicate_codes", "patients_without_admissions",
         "patients_without_diagnoses", "admissions_without_patient", "diagnoses_without_admission"),
        0,
    )
    messages: list[str] = []

    # DIAGNOSES_ICD first: a MIMIC-IV folder is then refused for its ICD-10 codes, not for
    # the columns its other tables lack.
    path_d = files["DIAGNOSES_ICD"]
    # MIMIC-IV names the code column icd_code (beside icd_version).
    diag = _read_table(path_d, "DIAGNOSES_ICD", ["hadm_id", "seq_num", ("icd9_code", "icd_code")],
                       optional=("icd_version",), str_cols=("icd9_code",))
    if "icd_version" in diag.columns:
        version = pd.to_numeric(diag["icd_version"], errors="coerce")
        not9 = version != 9
        if not9.any():
            raise Mimic3Error(
                f"{path_d}: {int(not9.sum())} rows have icd_version other than 9 (e.g. "
                f"{_plain(diag['icd_version'][not9].iloc[0])!r} at data row {int(np.flatnonzero(not9)[0]) + 1}): "
                "ICD-10 diagnoses (a MIMIC-IV folder?) are not read as MIMIC-III; read a MIMIC-IV folder with "
                "mimic4.read_mimic4 (its patients table has anchor_age; promptehr prepare does this)"
            )
    diag_rows_read = len(diag)
    hadm_d = _int_column(diag, "hadm_id", path_d).to_numpy()
    seq_d = _int_column(diag, "seq_num", path_d, allow_missing=True).to_numpy(dtype=np.float64, na_value=np.inf)

    # Codes as integer ids into `code_names`; strip/normalise/validate once per distinct string.
    raw_id, raw_names = pd.factorize(diag["icd9_code"])  # missing -> -1
    # A trailing "" names the empty code, so that raw id -1 (missing) indexes it too.
    norm_id, code_names = pd.factorize(pd.Series([icd9.normalize(c) for c in raw_names] + [""], dtype=object))
    code_names = np.asarray(code_names, dtype=object)
    code_d = norm_id[raw_id]
    empty = (code_names == "")[code_d]
    quirks["empty_codes"] = int(empty.sum())
    valid_name = np.array([icd9.is_valid(c) for c in code_names], dtype=bool)
    icd10 = sorted(c for c, ok in zip(code_names, valid_name)
                   if not ok and not _ICD9_SHAPE.match(c) and _ICD10_SHAPE.match(c))
    if icd10:
        n_rows = int(np.isin(code_names[code_d[~empty]], icd10).sum())
        raise Mimic3Error(
            f"{path_d}: {n_rows} rows hold ICD-10-CM codes ({len(icd10)} distinct, e.g. {', '.join(icd10[:5])}); "
            "this looks like a MIMIC-IV folder. read_mimic3 reads ICD-9-CM (MIMIC-III) diagnoses only; a MIMIC-IV "
            "folder (patients with anchor_age) is read by mimic4.read_mimic4"
        )
    invalid = ~empty & ~valid_name[code_d]
    quirks["invalid_codes"] = int(invalid.sum())
    invalid_examples = []
    if quirks["invalid_codes"]:
        bad_rows = np.flatnonzero(invalid)
        ids, first, counts = np.unique(code_d[bad_rows], return_index=True, return_counts=True)
        top = np.lexsort((first, -counts))[:N_EXAMPLES]  # most frequent first
        invalid_examples = [
            {"code": code_names[ids[i]], "rows": int(counts[i]), "first_data_row": int(bad_rows[first[i]]) + 1}
            for i in top
        ]
        shown = ", ".join(f"{e['code']} (x{e['rows']}, data row {e['first_data_row']})" for e in invalid_examples)
        messages.append(
            f"{path_d.name}: {quirks['invalid_codes']} rows with {len(ids)} distinct codes that are not "
            f"ICD-9-CM v32 codes were dropped, e.g. {shown}"
        )
    keep = np.flatnonzero(~empty & ~invalid)  # data rows still in play, in file order

    path_a = files["ADMISSIONS"]
    adm, adm_rows_read, absent = _read_admissions(path_a)

    path_p = files["PATIENTS"]
    pat = _read_table(path_p, "PATIENTS", ["subject_id", "gender", "dob"], optional=("dod", "expire_flag"))
    pat_rows_read = len(pat)
    pat["subject_id"] = _int_column(pat, "subject_id", path_p)
    _unique_key(pat["subject_id"], "subject_id", path_p)
    pat["dob"] = _date_column(pat, "dob", path_p)
    absent_p = [c for c in ("dod", "expire_flag") if c not in pat.columns]
    expire_flag = _flag_column(pat, "expire_flag", path_p)
    pat["dod"] = _optional_date_column(pat, "dod", path_p)
    sex = pat["gender"].str.strip().str.upper()
    bad_sex = ~sex.isin(SEXES)
    if bad_sex.any():
        raise _bad(path_p, "gender", bad_sex, pat["gender"], f"missing or unknown (not {'/'.join(SEXES)}) sex")
    pat["sex"] = sex

    # Admissions <-> patients.
    has_patient = adm["subject_id"].isin(pat["subject_id"])
    quirks["admissions_without_patient"] = int((~has_patient).sum())
    adm = adm.loc[has_patient].merge(pat[["subject_id", "dob"]], on="subject_id", how="left")
    quirks["patients_without_admissions"] = int((~pat["subject_id"].isin(adm["subject_id"])).sum())

    # Age at each admission; MIMIC's >89 shift shows as ~300 years.
    age = (adm["admittime"] - adm["dob"]).dt.total_seconds().to_numpy() / (DAYS_PER_YEAR * 86400)
    quirks["ages_negative"] = int((age < 0).sum())
    quirks["ages_capped"] = int((age > AGE_CAP).sum())
    adm["age"] = np.round(np.clip(age, 0.0, AGE_CAP), AGE_DECIMALS)

    # Admissions in visit order: patient, admission time, hadm_id (for ties).
    adm = adm.sort_values(["subject_id", "admittime", "hadm_id"], kind="stable", ignore_index=True)

    # Diagnoses <-> admissions (as positions in `adm`).
    with_rows = adm["hadm_id"].isin(pd.unique(hadm_d)).to_numpy()  # any row, before dropping codes
    quirks["admissions_without_diagnoses"] = int((~with_rows).sum())
    pos = pd.Index(adm["hadm_id"]).get_indexer(hadm_d[keep])
    quirks["diagnoses_without_admission"] = int((pos < 0).sum())
    keep, pos = keep[pos >= 0], pos[pos >= 0]

    # Order: admission (visit order), seq_num (missing last), file row; then dedupe per admission.
    order = np.lexsort((keep, seq_d[keep], pos))
    keep, pos = keep[order], pos[order]
    code = code_d[keep]
    dup = pd.DataFrame({"pos": pos, "code": code}).duplicated().to_numpy()
    quirks["duplicate_codes"] = int(dup.sum())
    pos, code = pos[~dup], code[~dup]
    has_code = np.zeros(len(adm), dtype=bool)
    has_code[pos] = True
    quirks["admissions_without_valid_codes"] = int((with_rows & ~has_code).sum())
    subj = adm["subject_id"].to_numpy()
    quirks["patients_without_diagnoses"] = int(len(np.setdiff1d(subj, subj[has_code])))

    times = "dischtime" not in absent
    quirks.update(dict.fromkeys(TIME_QUIRKS, 0))
    outcomes = None
    if times:
        flags = None if "hospital_expire_flag" in absent else adm["expire"].to_numpy()
        adm, outcomes = read_times(adm, has_code, flags, pat, expire_flag, quirks, deathtimes="deathtime" not in absent,
                                   dods="dod" not in absent_p)
    patients = _assemble(pos, code_names[code], adm, pat, outcomes)
    tables, table_messages = read_modalities(files, adm, has_code, patients, ICD9PROC)
    missing_cols = {t: cols for t, cols in (("ADMISSIONS", absent), ("PATIENTS", absent_p)) if cols}
    distinct = code_names[np.unique(code)]
    summary = {
        "source": str(Path(mimic_dir).resolve()),
        "format": "mimic3",
        "code_system": "icd9cm",
        "files": {t: p.name for t, p in files.items()},
        "patients": len(patients),
        "admissions": int(has_code.sum()),
        **time_summary(patients, times, missing_cols),
        "diagnosis_rows": len(code),
        "distinct_codes": len(distinct),
        "non_billable_distinct_codes": int(sum(not icd9.is_billable(c) for c in distinct)),
        "rows_read": {"PATIENTS": pat_rows_read, "ADMISSIONS": adm_rows_read, "DIAGNOSES_ICD": diag_rows_read},
        "quirks": quirks,
        "invalid_code_examples": invalid_examples,
        **tables,
        "messages": messages + _quirk_messages(quirks, files) + _quirk_messages(quirks, files, _TIME_QUIRK_TEXT)
                    + _time_messages(missing_cols, files) + table_messages,
    }
    for line in summary["messages"]:
        logger.warning(line)
    return patients, summary


def read_modalities(files: dict[str, Path], adm: pd.DataFrame, has_code: np.ndarray, patients: list[dict],
                    system: ProcedureCodes, icd_versions: bool = False) -> tuple[dict, list[str]]:
    """Read the OPTIONAL_TABLES of `files` into the patients (in place: `procedures`, `medications`).

    adm / has_code: the admissions in visit order and which are visits; patients: `_assemble`'s
    output over them. `system`: the procedure code system; `icd_versions`: the table has
    MIMIC-IV's icd_version and `system` is ICD-10-PCS (the ICD-9 rows are dropped and counted). Rules and
    counts: `modalities`. Returns ({"procedures": summary or None, "medications": summary or None},
    messages); a table that is absent leaves its field out of the patients and its summary None.
    """
    out: dict[str, dict | None] = {"procedures": None, "medications": None}
    lines: list[str] = []
    hadm_order = adm["hadm_id"].to_numpy()
    path = files.get("PROCEDURES_ICD")
    if path is not None:
        code_col = ("icd_code",) if icd_versions else ("icd9_code", "icd_code")
        df = _read_table(path, "PROCEDURES_ICD", ["hadm_id", code_col, *(["icd_version"] if icd_versions else [])],
                         optional=("seq_num",), str_cols=(code_col[0],), allow_empty=True)
        quirks = dict.fromkeys(modalities.PROCEDURE_QUIRKS if icd_versions else modalities.PROCEDURE_QUIRKS[1:], 0)
        rows = np.arange(len(df))
        if icd_versions:
            version = _int_column(df, "icd_version", path)
            bad = ~version.isin((9, 10))
            if bad.any():
                raise _bad(path, "icd_version", bad, df["icd_version"], "unknown (not 9 or 10) icd_version")
            icd9_rows = (version == 9).to_numpy()
            quirks["icd9_rows"] = int(icd9_rows.sum())
            rows = rows[~icd9_rows]
        code, names, examples = modalities.procedure_codes(df[code_col[0]], system, rows, quirks)
        hadm = _int_column(df, "hadm_id", path, allow_missing=True).to_numpy(dtype=np.float64, na_value=np.nan)
        seq = (_int_column(df, "seq_num", path, allow_missing=True).to_numpy(dtype=np.float64, na_value=np.inf)
               if "seq_num" in df.columns else np.zeros(len(df)))
        pos, code = modalities.place(hadm, seq, code, hadm_order, has_code, quirks)
        modalities.attach(patients, "procedures", pos, code, names, has_code)
        out["procedures"], more = modalities.table_summary(path.name, len(df), pos, code, names, quirks, system.SYSTEM,
                                                           system.label, examples, system.is_billable)
        lines += more
    path = files.get("PRESCRIPTIONS")
    if path is not None:
        df = _read_table(path, "PRESCRIPTIONS", ["hadm_id", "drug"],
                         optional=("drug_type", "formulary_drug_cd", "startdate", "starttime"),
                         str_cols=("drug", "drug_type", "formulary_drug_cd"), allow_empty=True)
        quirks = dict.fromkeys(modalities.MEDICATION_QUIRKS, 0)
        code, names = modalities.medication_codes(df["drug"], df.get("formulary_drug_cd"), df.get("drug_type"), quirks)
        hadm = _int_column(df, "hadm_id", path, allow_missing=True).to_numpy(dtype=np.float64, na_value=np.nan)
        start = next((c for c in ("starttime", "startdate") if c in df.columns), None)
        order = np.zeros(len(df))
        if start is not None:
            ns, missing = _ns(_optional_date_column(df, start, path))
            order = np.where(missing, np.inf, ns.astype(np.float64))
        pos, code = modalities.place(hadm, order, code, hadm_order, has_code, quirks)
        modalities.attach(patients, "medications", pos, code, names, has_code)
        out["medications"], more = modalities.table_summary(path.name, len(df), pos, code, names, quirks,
                                                            medications.SYSTEM, "medication")
        lines += more
    return out, lines


def time_summary(patients: list[dict], times: bool, absent: dict[str, list[str]]) -> dict:
    """The summary's time figures: `times` (the cohort has the time fields), `hospital_deaths`,
    `deaths_after_discharge` (patients with death_days) and `time_columns_missing` (table -> columns)."""
    return {"times": times,
            "hospital_deaths": sum(bool(p["hospital_death"]) for p in patients),
            "deaths_after_discharge": sum(p["death_days"] is not None for p in patients),
            "time_columns_missing": absent}


def _time_messages(absent: dict[str, list[str]], files: dict[str, Path]) -> list[str]:
    """One line per table with time columns missing."""
    return [f"{files[t].name}: no {', '.join(cols)} column{'s' if len(cols) > 1 else ''}"
           + ("" if t != "ADMISSIONS" or "dischtime" not in cols
              else ": the cohort has no times (stay_days, gap_days, hospital_death, death_days are null)")
           for t, cols in absent.items()]


def _assemble(pos: np.ndarray, codes: np.ndarray, adm: pd.DataFrame, pat: pd.DataFrame,
              outcomes: pd.DataFrame | None = None) -> list[dict]:
    """Diagnosis rows sorted in visit order -> one patient dict per subject.

    pos: [n_rows] position in `adm` (sorted by subject, admittime) of each row's admission;
    codes: [n_rows] object array of dotless codes. Boundaries are found with numpy. With
    `outcomes` (indexed by subject_id: hospital_death, death_days, NaN for none), the time
    fields come from it and from adm's stay_days / gap_days columns; without, they are None.
    """
    if len(pos) == 0:
        return []
    v_start = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    v_end = np.r_[v_start[1:], len(pos)]
    v_adm = pos[v_start]
    v_subject = adm["subject_id"].to_numpy()[v_adm]
    p_start = np.flatnonzero(np.r_[True, v_subject[1:] != v_subject[:-1]])
    p_end = np.r_[p_start[1:], len(v_subject)]
    subjects = v_subject[p_start]
    ages = adm["age"].to_numpy()[v_adm[p_start]]
    sexes = pat.set_index("subject_id")["sex"].reindex(subjects).tolist()
    code_list = codes.tolist()
    # Many small lists: pause the cyclic GC, which would rescan them all repeatedly.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        visits = [code_list[s:e] for s, e in zip(v_start.tolist(), v_end.tolist())]
        if outcomes is None:
            return [
                {"subject_id": s, "age": a, "sex": x, "visits": visits[b:e], **NO_TIMES}
                for s, a, x, b, e in zip(subjects.tolist(), ages.tolist(), sexes, p_start.tolist(), p_end.tolist())
            ]
        # float32 values as Python floats: a Dataset (float32) round trip gives them back equal.
        stays = adm["stay_days"].to_numpy(np.float32)[v_adm].tolist()
        gaps = adm["gap_days"].to_numpy(np.float32)[v_adm].tolist()
        out = outcomes.reindex(subjects)
        deaths = out["hospital_death"].to_numpy(bool).tolist()
        days = out["death_days"].to_numpy(np.float32)
        days = [None if d != d else d for d in days.tolist()]
        return [
            {"subject_id": s, "age": a, "sex": x, "visits": visits[b:e], "stay_days": stays[b:e],
             "gap_days": gaps[b:e], "hospital_death": h, "death_days": d}
            for s, a, x, b, e, h, d in zip(subjects.tolist(), ages.tolist(), sexes, p_start.tolist(), p_end.tolist(),
                                           deaths, days)
        ]
    finally:
        if gc_was_enabled:
            gc.enable()


_QUIRK_TEXT = {
    "ages_capped": ("ADMISSIONS",
                    "admissions at an age over {cap:g} (MIMIC's >89 date-of-birth shift) capped at {cap:g}"),
    "ages_negative": ("ADMISSIONS", "admissions before the date of birth: age set to 0"),
    "admissions_without_diagnoses": ("ADMISSIONS", "admissions without any diagnosis row were dropped"),
    "admissions_without_valid_codes": ("ADMISSIONS", "admissions left without a valid code were dropped"),
    "empty_codes": ("DIAGNOSES_ICD", "rows with an empty code were dropped"),
    "duplicate_codes": ("DIAGNOSES_ICD", "repeated codes inside one admission were dropped (first seq_num kept)"),
    "patients_without_admissions": ("PATIENTS", "patients without any admission were dropped"),
    "patients_without_diagnoses": ("PATIENTS", "patients without any admission with a valid code were dropped"),
    "admissions_without_patient": ("ADMISSIONS", "admissions whose subject_id is not in PATIENTS were dropped"),
    "diagnoses_without_admission": ("DIAGNOSES_ICD", "rows whose hadm_id is not in ADMISSIONS "
                                                     "(or whose admission has no patient) were dropped"),
}


def _quirk_messages(quirks: dict, files: dict[str, Path], texts: dict[str, tuple[str, str]] = _QUIRK_TEXT) -> list[str]:
    """One line per non-zero quirk: `texts` maps each quirk to (table, what happened)."""
    return [
        f"{files[table].name}: {quirks[key]} {text.format(cap=AGE_CAP)}"
        for key, (table, text) in texts.items()
        if quirks[key]
    ]
