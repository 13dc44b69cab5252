"""MIMIC-IV folder -> patient cohort in ICD-10-CM (the schema of `schema.PATIENT_FEATURES`).

Reads `patients`, `admissions` and `diagnoses_icd` of MIMIC-IV's hospital module, from a `hosp/`
sub-folder or from the folder itself (`.csv` or `.csv.gz`, file names and headers in any case;
`mimic3.find_tables`), into one record per patient::

    {"subject_id": int, "age": float, "sex": "F" | "M", "visits": list[list[str]], "stay_days": [...],
     "gap_days": [...], "hospital_death": bool, "death_days": float | None}

The cohort is in one code system, ICD-10-CM (`code_system` "icd10cm" in the summary). Rules
(every departure from a clean table is counted in the summary, never dropped silently):

- age at an admission = anchor_age + (year(admittime) - anchor_year), in whole years: MIMIC-IV
  has no date of birth, so a cohort read from it has whole-year ages. The patient's age is that
  at the first admission kept. anchor_age 91 is MIMIC-IV's "over 89": every admission of such a
  patient, and any other age above 90, is set to 90 and counted (`ages_capped`); an age below 0
  is set to 0 and counted (`ages_negative`).
- visits in `admittime` order (ties by `hadm_id`); codes in `seq_num` order (missing last, then
  file order), dotless.
- ICD-10 rows (`icd_version` 10): codes that are not ICD-10-CM codes (`icd10.is_valid`) are
  dropped and counted (`invalid_codes`).
- ICD-9 rows (`icd_version` 9), `icd9_rows="map"` (the default): each code is replaced by its
  ICD-10-CM codes under the CMS General Equivalence Mappings (`icd10.from_icd9`, looked up once
  per distinct code), in the mapping's order, at the row's place; a code with no mapping is
  dropped and counted (`icd9_codes_unmapped`). `icd9_rows="drop"`: every admission with an
  ICD-9 row is dropped, its ICD-10 rows too, and counted (`icd9_admissions_dropped`).
- a code repeated inside one admission keeps its first place: repeated as read (same code and
  version) -> `duplicate_codes`; repeated only once ICD-9 codes are mapped ->
  `icd9_mapping_duplicates`.
- empty codes, admissions without any diagnosis row or left without a code, patients without
  admissions or left without a visit, admissions of unknown patients and diagnoses of unknown
  admissions are dropped and counted.
- times and deaths: as `mimic3.read_mimic3` (its rules, its quirks but the PATIENTS
  expire_flag ones: MIMIC-IV has no expire_flag), from admissions' `dischtime`, `deathtime`,
  `hospital_expire_flag` and patients' `dod` (a date).
- procedures_icd and prescriptions, when present: as `mimic3.read_modalities` (rules and counts:
  `modalities`); procedures in ICD-10-PCS (`procedures.ICD10PCS`): the icd_version 9 rows are
  dropped and counted (`icd9_rows`), since no ICD-9 -> ICD-10-PCS mapping is shipped;
  prescriptions ordered by `starttime`.
- a missing file or column, an empty or unreadable table, duplicated `subject_id` or `hadm_id`,
  and an unparseable id, year, age, date, sex or `icd_version` (other than 9 or 10) raise
  Mimic3Error, one line naming the file, the column and the first bad data row.

The scan is vectorised (pandas/numpy over all rows; Python only once per distinct code), so a
full MIMIC-IV `diagnoses_icd` (~5 million rows) reads in seconds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from promptehr_hf.datasets_scripts import icd9, icd10
from promptehr_hf.datasets_scripts.mimic3 import (
    _QUIRK_TEXT,
    _TIME_QUIRK_TEXT,
    N_EXAMPLES,
    TIME_QUIRKS,
    _assemble,
    _bad,
    _int_column,
    _optional_date_column,
    _quirk_messages,
    _read_admissions,
    _read_table,
    _time_messages,
    _unique_key,
    find_tables,
    read_modalities,
    read_times,
    time_summary,
)
from promptehr_hf.datasets_scripts.procedures import ICD10PCS
from promptehr_hf.datasets_scripts.schema import AGE_CAP, SEXES

logger = logging.getLogger(__name__)

ICD9_ROWS = ("map", "drop")  # what the ICD-9 rows of a MIMIC-IV folder become (read_mimic4)
OVER_89 = 91  # MIMIC-IV's anchor_age of every patient over 89

_MIMIC4_QUIRK_TEXT = {
    "ages_capped": ("ADMISSIONS", "admissions at an age over {cap:g} (anchor_age 91: MIMIC-IV's over 89) "
                                  "set to {cap:g}"),
    "ages_negative": ("ADMISSIONS", "admissions before the year of birth (anchor_age + year offset < 0): age set to 0"),
    **{key: _QUIRK_TEXT[key] for key in ("admissions_without_diagnoses", "admissions_without_valid_codes",
                                         "empty_codes")},
    "duplicate_codes": _QUIRK_TEXT["duplicate_codes"],
    "icd9_mapping_duplicates": ("DIAGNOSES_ICD", "codes repeated inside one admission once ICD-9 codes were mapped "
                                                 "to ICD-10-CM were dropped (first kept)"),
    "icd9_admissions_dropped": ("ADMISSIONS", "admissions coded in ICD-9 were dropped (icd9_rows='drop')"),
    "patients_without_admissions": _QUIRK_TEXT["patients_without_admissions"],
    "patients_without_diagnoses": ("PATIENTS", "patients left without any admission with a code were dropped"),
    **{key: _QUIRK_TEXT[key] for key in ("admissions_without_patient", "diagnoses_without_admission")},
}
# Dropped codes, reported with examples: quirk -> message.
_DROPPED_CODES = {
    "invalid_codes": "{rows} ICD-10 rows ({distinct} distinct codes) that are not ICD-10-CM codes were dropped",
    "icd9_codes_unmapped": "{rows} ICD-9 rows ({distinct} distinct codes) with no ICD-10-CM mapping (CMS GEMs) "
                           "were dropped",
}
PATIENTS_EXPIRE_FLAG_QUIRKS = ("expire_flag_without_dod", "dod_without_expire_flag")  # MIMIC-IV has no expire_flag
QUIRKS = ("ages_capped", "ages_negative", "admissions_without_diagnoses", "admissions_without_valid_codes",
          "empty_codes", "invalid_codes", "duplicate_codes", "icd9_codes_unmapped", "icd9_mapping_duplicates",
          "icd9_admissions_dropped", "patients_without_admissions", "patients_without_diagnoses",
          "admissions_without_patient", "diagnoses_without_admission",
          *(q for q in TIME_QUIRKS if q not in PATIENTS_EXPIRE_FLAG_QUIRKS))
_MIMIC4_TIME_QUIRK_TEXT = {k: v for k, v in _TIME_QUIRK_TEXT.items() if k in QUIRKS}


def read_mimic4(mimic_dir: str | os.PathLike, *, icd9_rows: str = "map") -> tuple[list[dict], dict]:
    """Read a MIMIC-IV folder into ICD-10-CM patients (the schema of `schema.PATIENT_FEATURES`) and a summary.

    `icd9_rows`: "map" (ICD-9 codes become their ICD-10-CM GEM codes) or "drop" (admissions
    coded in ICD-9 are dropped); see the module docstring. Returns `(patients, summary)`:
    patients sorted by subject_id; the summary (JSON-ready) holds `format` ("mimic4"),
    `code_system` ("icd10cm"), `icd9_rows`, `patients`, `admissions`, `diagnosis_rows` (codes
    loaded), `distinct_codes`, `non_billable_distinct_codes`, `rows_read` per table,
    `diagnosis_rows_by_icd_version` ({"9": n, "10": n}, as read), `icd9_mapping` (`rows_mapped`
    and `distinct_codes_mapped`: ICD-9 rows and codes with a mapping; `icd10_codes_from_mapping`:
    the codes those rows became, before duplicates are dropped; `distinct_codes_unmapped`;
    `unmapped_examples`), `quirks` (each count, zero included), `invalid_code_examples`,
    `files` and `messages` (one readable line per non-zero quirk, naming the file).
    Raises ValueError for a bad `icd9_rows`, Mimic3Error for a folder that cannot be read.
    """
    if icd9_rows not in ICD9_ROWS:
        raise ValueError(f"icd9_rows={icd9_rows!r}: expected one of {', '.join(ICD9_ROWS)}")
    files = find_tables(mimic_dir)
    quirks = dict.fromkeys(QUIRKS, 0)

    path_p = files["PATIENTS"]
    pat = _read_table(path_p, "PATIENTS", ["subject_id", "gender", "anchor_age", "anchor_year"], optional=("dod",))
    pat_rows_read = len(pat)
    absent_p = [] if "dod" in pat.columns else ["dod"]
    pat["dod"] = _optional_date_column(pat, "dod", path_p)
    for col in ("subject_id", "anchor_age", "anchor_year"):
        pat[col] = _int_column(pat, col, path_p)
    _unique_key(pat["subject_id"], "subject_id", path_p)
    if (pat["anchor_age"] < 0).any():
        raise _bad(path_p, "anchor_age", pat["anchor_age"] < 0, pat["anchor_age"], "negative")
    sex = pat["gender"].str.strip().str.upper()
    bad_sex = ~sex.isin(SEXES)
    if bad_sex.any():
        raise _bad(path_p, "gender", bad_sex, pat["gender"], f"missing or unknown (not {'/'.join(SEXES)}) sex")
    pat["sex"] = sex

    path_a = files["ADMISSIONS"]
    adm, adm_rows_read, absent = _read_admissions(path_a)

    path_d = files["DIAGNOSES_ICD"]
    diag = _read_table(path_d, "DIAGNOSES_ICD", ["hadm_id", "seq_num", "icd_code", "icd_version"],
                       str_cols=("icd_code",))
    hadm_d = _int_column(diag, "hadm_id", path_d).to_numpy()
    seq_d = _int_column(diag, "seq_num", path_d, allow_missing=True).to_numpy(dtype=np.float64, na_value=np.inf)
    version = _int_column(diag, "icd_version", path_d)
    bad_version = ~version.isin((9, 10))
    if bad_version.any():
        raise _bad(path_d, "icd_version", bad_version, diag["icd_version"], "unknown (not 9 or 10) icd_version")
    is9 = (version == 9).to_numpy()
    rows_by_version = {"9": int(is9.sum()), "10": int((~is9).sum())}

    # Admissions <-> patients, ages.
    has_patient = adm["subject_id"].isin(pat["subject_id"])
    quirks["admissions_without_patient"] = int((~has_patient).sum())
    adm = adm.loc[has_patient].merge(pat[["subject_id", "anchor_age", "anchor_year"]], on="subject_id", how="left")
    quirks["patients_without_admissions"] = int((~pat["subject_id"].isin(adm["subject_id"])).sum())
    age = (adm["anchor_age"] + adm["admittime"].dt.year - adm["anchor_year"]).to_numpy()
    over = (adm["anchor_age"].to_numpy() >= OVER_89) | (age > AGE_CAP)
    quirks["ages_capped"] = int(over.sum())
    quirks["ages_negative"] = int((age < 0).sum())
    adm["age"] = np.where(over, AGE_CAP, np.clip(age, 0, None)).astype(np.float64)
    adm = adm.sort_values(["subject_id", "admittime", "hadm_id"], kind="stable", ignore_index=True)

    # Diagnoses <-> admissions (as positions in `adm`, -1: none).
    pos_d = pd.Index(adm["hadm_id"]).get_indexer(hadm_d)
    linked = pos_d >= 0
    quirks["diagnoses_without_admission"] = int((~linked).sum())
    with_rows = np.zeros(len(adm), dtype=bool)
    with_rows[pos_d[linked]] = True
    quirks["admissions_without_diagnoses"] = int((~with_rows).sum())
    dropped = np.zeros(len(adm), dtype=bool)
    if icd9_rows == "drop":
        dropped[pos_d[linked & is9]] = True
        quirks["icd9_admissions_dropped"] = int(dropped.sum())
    rows = np.flatnonzero(linked)
    rows = rows[~dropped[pos_d[rows]]]

    # Each distinct (code as written, version) is normalised, checked and mapped once.
    raw_id, raw_names = pd.factorize(diag["icd_code"])  # missing -> -1, the "" appended below
    raw_names = [*raw_names, ""]
    pair_d, pair_keys = pd.factorize(np.where(raw_id < 0, len(raw_names) - 1, raw_id) * 2 + is9)
    table = _CodeTable([(raw_names[k // 2], bool(k % 2)) for k in pair_keys.tolist()])
    pr = pair_d[rows]
    empty, invalid, unmapped = table.empty[pr], table.invalid[pr], table.unmapped[pr]
    quirks["empty_codes"] = int(empty.sum())
    quirks["invalid_codes"] = int(invalid.sum())
    quirks["icd9_codes_unmapped"] = int(unmapped.sum())
    mapped = ~empty & ~invalid & ~unmapped & is9[rows]
    invalid_examples = _examples(rows[invalid], table.read_id[pr[invalid]], table.read_names)
    unmapped_examples = _examples(rows[unmapped], table.read_id[pr[unmapped]], table.read_names)
    rows = rows[~empty & ~invalid & ~unmapped]

    # Visit order, seq_num (missing last), file row; a code read twice in one admission kept once.
    pos = pos_d[rows]
    order = np.lexsort((rows, seq_d[rows], pos))
    rows, pos = rows[order], pos[order]
    dup = pd.DataFrame({"pos": pos, "code": table.read_id[pair_d[rows]]}).duplicated().to_numpy()
    quirks["duplicate_codes"] = int(dup.sum())
    rows, pos = rows[~dup], pos[~dup]

    # Each row -> its ICD-10-CM codes (one for an ICD-10 row); then repeats the mapping made.
    p = pair_d[rows]
    n_out = table.n_codes[p]
    shift = np.repeat(table.first[p] - (np.cumsum(n_out) - n_out), n_out)  # output index -> index in table.codes
    code = table.codes[shift + np.arange(int(n_out.sum()))]
    pos = np.repeat(pos, n_out)
    dup = pd.DataFrame({"pos": pos, "code": code}).duplicated().to_numpy()
    quirks["icd9_mapping_duplicates"] = int(dup.sum())
    pos, code = pos[~dup], code[~dup]

    has_code = np.zeros(len(adm), dtype=bool)
    has_code[pos] = True
    quirks["admissions_without_valid_codes"] = int((with_rows & ~dropped & ~has_code).sum())
    subj = adm["subject_id"].to_numpy()
    quirks["patients_without_diagnoses"] = int(len(np.setdiff1d(subj, subj[has_code])))

    times = "dischtime" not in absent
    outcomes = None
    if times:
        flags = None if "hospital_expire_flag" in absent else adm["expire"].to_numpy()
        adm, outcomes = read_times(adm, has_code, flags, pat, None, quirks, deathtimes="deathtime" not in absent,
                                   dods=not absent_p)
    patients = _assemble(pos, table.names[code], adm, pat, outcomes)
    tables, table_messages = read_modalities(files, adm, has_code, patients, ICD10PCS, icd_versions=True)
    missing_cols = {t: cols for t, cols in (("ADMISSIONS", absent), ("PATIENTS", absent_p)) if cols}
    distinct = table.names[np.unique(code)]
    messages = [
        f"{path_d.name}: {_DROPPED_CODES[key].format(rows=quirks[key], distinct=len(np.unique(ids)))}, e.g. "
        + ", ".join(f"{e['code']} (x{e['rows']}, data row {e['first_data_row']})" for e in examples)
        for key, ids, examples in (("invalid_codes", table.read_id[pr[invalid]], invalid_examples),
                                   ("icd9_codes_unmapped", table.read_id[pr[unmapped]], unmapped_examples))
        if quirks[key]
    ]
    summary = {
        "source": str(Path(mimic_dir).resolve()),
        "format": "mimic4",
        "code_system": "icd10cm",
        "icd9_rows": icd9_rows,
        "files": {t: path.relative_to(mimic_dir).as_posix() for t, path in files.items()},
        "patients": len(patients),
        "admissions": int(has_code.sum()),
        **time_summary(patients, times, missing_cols),
        "diagnosis_rows": len(code),
        "distinct_codes": len(distinct),
        "non_billable_distinct_codes": int(sum(not icd10.is_billable(c) for c in distinct)),
        "rows_read": {"PATIENTS": pat_rows_read, "ADMISSIONS": adm_rows_read, "DIAGNOSES_ICD": len(diag)},
        "diagnosis_rows_by_icd_version": rows_by_version,
        "icd9_mapping": {
            "rows_mapped": int(mapped.sum()),
            "distinct_codes_mapped": len(np.unique(table.read_id[pr[mapped]])),
            "icd10_codes_from_mapping": int(table.n_codes[pr[mapped]].sum()),
            "distinct_codes_unmapped": len(np.unique(table.read_id[pr[unmapped]])),
            "unmapped_examples": unmapped_examples,
        },
        "quirks": quirks,
        "invalid_code_examples": invalid_examples,
        **tables,
        "messages": messages + _quirk_messages(quirks, files, _MIMIC4_QUIRK_TEXT)
                    + _quirk_messages(quirks, files, _MIMIC4_TIME_QUIRK_TEXT) + _time_messages(missing_cols, files)
                    + table_messages,
    }
    for line in summary["messages"]:
        logger.warning(line)
    return patients, summary


class _CodeTable:
    """The distinct (code as written, is ICD-9) pairs of a diagnoses table, normalised and mapped.

    Per pair: `read_id` (the normalised code and its version, as an id into `read_names`,
    e.g. "9:4019"), `empty`, `invalid` (an ICD-10 code not in ICD-10-CM), `unmapped` (an ICD-9
    code without GEM codes), and its ICD-10-CM codes `codes[first : first + n_codes]`, ids into
    `names` (none for an empty, invalid or unmapped code).
    """

    def __init__(self, pairs: list[tuple[str, bool]]):
        read: dict[tuple[str, bool], int] = {}
        names: dict[str, int] = {}
        gem: dict[str, tuple[str, ...]] = {}
        read_id, n_codes, codes, kind = [], [], [], []
        for raw, v9 in pairs:
            code = (icd9 if v9 else icd10).normalize(raw)
            read_id.append(read.setdefault((code, v9), len(read)))
            if not code:
                out, k = (), "empty"
            elif v9:
                if code not in gem:
                    gem[code] = tuple(icd10.from_icd9(code))
                out, k = gem[code], "ok" if gem[code] else "unmapped"
            else:
                out, k = ((code,), "ok") if icd10.is_valid(code) else ((), "invalid")
            kind.append(k)
            n_codes.append(len(out))
            codes.extend(names.setdefault(c, len(names)) for c in out)
        kind = np.array(kind)
        self.read_id = np.array(read_id, dtype=np.int64)
        self.read_names = np.array([f"{9 if v9 else 10}:{c}" for c, v9 in read], dtype=object)
        self.empty, self.invalid, self.unmapped = (kind == "empty"), (kind == "invalid"), (kind == "unmapped")
        self.n_codes = np.array(n_codes, dtype=np.int64)
        self.first = np.cumsum(self.n_codes) - self.n_codes
        self.codes = np.array(codes, dtype=np.int64)
        self.names = np.array(list(names), dtype=object)


def _examples(bad_rows: np.ndarray, ids: np.ndarray, names: np.ndarray) -> list[dict]:
    """The most frequent codes among dropped rows: [{"code", "icd_version", "rows", "first_data_row"}]."""
    if len(bad_rows) == 0:
        return []
    order = np.argsort(bad_rows, kind="stable")
    bad_rows, ids = bad_rows[order], ids[order]
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    top = np.lexsort((first, -counts))[:N_EXAMPLES]
    out = []
    for i in top:
        version, code = names[uniq[i]].split(":", 1)
        out.append({"code": code, "icd_version": int(version), "rows": int(counts[i]),
                    "first_data_row": int(bad_rows[first[i]]) + 1})
    return out
