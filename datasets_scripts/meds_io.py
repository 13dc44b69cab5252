"""MEDS (Medical Event Data Standard, the `meds` package, schema 0.4) datasets <-> patient cohorts.

`write_meds(patients, out_dir)` writes a MEDS folder; `read_meds(meds_dir)` reads one back into
patients (`schema.PATIENT_FEATURES`) and a summary. `read_meds(write_meds(patients))` gives the same
patients (ages to the readers' 0.01 year; 90 stays 90; times: see `cohort_io`).

Layout written (paths and split names are the `meds` package's constants)::

    data/<split>/<k>.parquet        subject_id, time, code, numeric_value (all null), hadm_id
    metadata/codes.parquet          code, description (ICD-9-CM titles, else null), parent_codes (null)
    metadata/dataset.json           dataset_name, etl_name, etl_version, meds_version, created_at, ...
    metadata/subject_splits.parquet subject_id, split
    .promptehr-manifest.json        what `file_utils.replace_folder` writes in every output folder

Events per patient, named as the public MIMIC-IV MEDS extraction (MIMIC_IV_MEDS, its
`event_configs.yaml`) names them, dates from `cohort_io.timeline` (the same dates and hadm_ids
as the MIMIC-III CSV writer for the same seed):

- `GENDER//F` or `GENDER//M`: static, null time (the ETL writes gender with `time: null`);
- `MEDS_BIRTH` (`meds.birth_code`) at the date of birth (an age of 90 is written MIMIC's way,
  300 years before the first admission; the reader caps it back to 90);
- per visit, `HOSPITAL_ADMISSION//UNK//UNK` at the admission time, one
  `DIAGNOSIS//ICD//9//4019` (`//10//I10` for ICD-10-CM) row per code at the discharge time in
  `seq_num` order (the ETL times diagnoses at discharge), then the visit's procedures
  (`PROCEDURE//ICD//9//3893`, `//10//0DTJ4ZZ` with ICD-10-CM) and medications
  (`MEDICATION//START//<NAME>//<FORMULARY>`) in list order at the same time, when the cohort
  has them, then `HOSPITAL_DISCHARGE//UNK` at the
  discharge time. The ETL writes `HOSPITAL_ADMISSION//<admission_type>//<admission_location>` and
  `HOSPITAL_DISCHARGE//<discharge_location>`, rendering a missing component as `UNK`: we have none;
- `MEDS_DEATH` (`meds.death_code`) at the time of death (no hadm_id): the last discharge for a
  death in hospital, `death_days` after it for one outside (a second after it at least: at the
  discharge itself it would read as a death in hospital). A patient's own stays and gaps are
  `timeline`'s, to the second (see `cohort_io` for what a round trip keeps). MEDS holds times
  only: a visit of no length (stay 0) admitted at the previous discharge (gap 0) has every event
  at that time, and the reader gives its codes to the previous visit (counted as an admission
  without diagnoses); the MIMIC writers keep it apart by hadm_id.

Rows are sorted by subject, then time (static rows first); within one time: birth, admission,
diagnoses, discharge. `hadm_id` (an extra column, as in the ETL; listed in the dataset metadata's
`raw_source_id_columns`) is set on admission, diagnosis and discharge rows. A shard holds at most
`subjects_per_shard` subjects, all of one split; each subject is in exactly one shard.

Reading (`read_meds`): every `data/**/*.parquet` is validated with `meds.DataSchema` (the exact
column types, no null `subject_id` or `code`); a subject may not appear in two files. The rows
are then read as they would be from a MIMIC-IV extraction:

- a patient is a subject with `MEDS_BIRTH` (the earliest one), one of `GENDER//F` /
  `GENDER//M` and at least one admission holding a diagnosis; the others are dropped and
  counted by reason (first reason that applies: no birth, no sex, both sexes, admissions that do
  not pair with discharges, no admission with a diagnosis);
- admissions: the k-th `HOSPITAL_ADMISSION//...` of a subject (in time order) pairs with its k-th
  `HOSPITAL_DISCHARGE//...` (nested stays, rare, would be paired wrongly; overlaps are counted);
- a `DIAGNOSIS//ICD//<9|10>//<code>` row belongs to the admission with the earliest discharge at
  or after its time whose admission is at or before it; rows in no admission are dropped; within a
  visit codes keep their (time, file) order, a repeated code is dropped; codes are taken as written
  (not normalised or checked against the ICD tables);
- visits are the admissions that hold a diagnosis, in admission time order; age is the time from
  birth to the first visit in years of 365.25 days, rounded to 0.01, clipped to [0, 90];
- `code_system=None` infers the system from the diagnosis codes and refuses a dataset holding both
  ICD-9 and ICD-10 diagnoses (MIMIC-IV does); `code_system="icd9cm"` / `"icd10cm"` keeps that
  system's rows and counts the others;
- times: stay = discharge - admission of each visit, gap = admission - the previous visit's
  discharge (0 for the first; an overlap gives 0, counted `overlapping_stays`), in float32 days;
- the earliest `MEDS_DEATH` (several: counted `several_deaths`) inside the last visit's stay
  (admission <= time <= discharge) is a death in hospital (`hospital_death`); after the last
  discharge, `death_days` = its time - that discharge; before the last admission, death_days 0
  (`deaths_before_last_visit`). No MEDS_DEATH: hospital_death false, death_days null. A death
  recorded as a date (at midnight, as an ETL writing a date of death does) on the last
  discharge's day falls inside that stay and reads as a death in hospital;
- procedures (`PROCEDURE//ICD//<9|10>//<code>`, the version that goes with the diagnoses; the
  other version's rows counted) and medications (`MEDICATION//START//<drug>[//<product>]`, the
  last component taken as the formulary code, `UNK` when absent: the public extraction puts an
  NDC there, or nothing) are placed in visits as diagnoses are (a procedure may also fall on the
  admission's day before its time: the ETL times them at their chart date), repeated codes
  dropped; each field is left out of the patients when the dataset has no such row (summary
  `procedures` / `medications`: None);
- every other code (labs, `MEDICATION//STOP//...`, `GENDER//UNK`, ...) is ignored and counted by
  its first `//` component; time-less birth, admission, discharge or diagnosis rows are dropped and
  counted;
- `metadata/dataset.json`, `codes.parquet` and `subject_splits.parquet` are validated with their
  schemas when present and reported in the summary.

Every error `read_meds` raises on a folder (`MedsError`, a ValueError) is one line naming the file
or folder; `write_meds` raises ValueError naming the subject_id for a cohort it cannot write.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset

from promptehr_hf.datasets_scripts import icd9, medications, modalities
from promptehr_hf.datasets_scripts.cohort_io import SECONDS_PER_YEAR, Timeline, timeline
from promptehr_hf.datasets_scripts.mimic3 import AGE_DECIMALS, _assemble, visit_times
from promptehr_hf.datasets_scripts.procedures import FOR_DIAGNOSES, PROCEDURE_SYSTEMS
from promptehr_hf.datasets_scripts.schema import AGE_CAP
from promptehr_hf.file_utils import replace_folder

logger = logging.getLogger(__name__)

ICD_VERSIONS = {"icd9cm": "9", "icd10cm": "10"}  # code system -> <version> in DIAGNOSIS//ICD//<version>//<code>
SPLITS = (meds.train_split, meds.tuning_split, meds.held_out_split)
GENDER_PREFIX = "GENDER//"
ADMISSION_CODE = "HOSPITAL_ADMISSION//UNK//UNK"
DISCHARGE_CODE = "HOSPITAL_DISCHARGE//UNK"
SUBJECTS_PER_SHARD = 10_000
US_PER_SECOND = 1_000_000
# Dotless code shapes, loose on purpose: they catch a cohort written under the wrong system, not
# invalid codes (ICD-9-CM: a digit, V or E, then 2-4 digits; ICD-10-CM: a letter, a digit, 1-5 more).
_CODE_SHAPES = {"icd9cm": re.compile(r"[0-9VE]\d{2,4}"), "icd10cm": re.compile(r"[A-Z]\d[0-9A-Z]{1,5}")}
_BATCH_ROWS = 1 << 20  # rows read at a time: MIMIC-IV shards hold tens of millions of lab rows
# Row kinds the reader uses; anything else is OTHER (ignored, counted).
BIRTH, FEMALE, MALE, ADMISSION, DISCHARGE, DIAG9, DIAG10, DEATH, OTHER, PROC9, PROC10, MEDICATION = range(12)
US_PER_DAY = 86400 * US_PER_SECOND
_DIAG_KIND = {"9": DIAG9, "10": DIAG10}
_PROC_KIND = {"9": PROC9, "10": PROC10}
MEDICATION_PREFIX = "MEDICATION//START//"  # + "<NAME>//<FORMULARY>": the MIMIC-IV MEDS prescription start
MODALITY_QUIRKS = ("other_system_rows", "rows_outside_admissions", "rows_at_dropped_admissions", "duplicate_codes")


class MedsError(ValueError):
    """A MEDS folder that cannot be read; the message (one line) names the file and the problem."""


def _version(code_system: str, who: str) -> str:
    if code_system not in ICD_VERSIONS:
        raise ValueError(f"{who}: code_system must be one of {', '.join(ICD_VERSIONS)}, not {code_system!r}")
    return ICD_VERSIONS[code_system]


def diagnosis_prefix(code_system: str) -> str:
    """'icd9cm' -> 'DIAGNOSIS//ICD//9//', 'icd10cm' -> 'DIAGNOSIS//ICD//10//' (the MIMIC-IV MEDS names)."""
    return f"DIAGNOSIS//ICD//{_version(code_system, 'diagnosis_prefix')}//"


def procedure_prefix(code_system: str) -> str:
    """The procedure codes that go with a diagnosis system: 'icd9cm' -> 'PROCEDURE//ICD//9//' (ICD-9-CM
    volume 3), 'icd10cm' -> 'PROCEDURE//ICD//10//' (ICD-10-PCS), as the MIMIC-IV MEDS extraction names them."""
    return f"PROCEDURE//ICD//{_version(code_system, 'procedure_prefix')}//"


# --------------------------------------------------------------------------- writing


def write_meds(patients: Sequence[dict] | Dataset, out_dir: str | os.PathLike, *, code_system: str = "icd9cm",
               seed: int = 0, splits: Mapping[int, str] | None = None,
               dataset_name: str = "promptehr-hf synthetic cohort", subjects_per_shard: int = SUBJECTS_PER_SHARD,
               command: str = "write_meds") -> Path:
    """Write patients as a MEDS folder (layout and event names: see the module docstring); return it, resolved.

    Args:
        patients: [n] patient dicts (or a Dataset with PATIENT_FEATURES), dotless codes of `code_system`.
        out_dir: the folder; built beside it and swapped in whole by `file_utils.replace_folder`, so an
            error leaves an existing `out_dir` as it was. An existing `out_dir` must be empty or an
            earlier output of the same `command` (else `OutputFolderError`).
        code_system: "icd9cm" or "icd10cm"; codes not shaped like that system's are refused.
        seed: draws the dates and hadm_ids (`cohort_io.timeline`).
        splits: subject_id -> "train" / "tuning" / "held_out" for every patient (no other ids);
            None puts every patient in "train".
        dataset_name: `dataset_name` in metadata/dataset.json.
        subjects_per_shard: the most subjects in one data file.
        command: the command recorded in the folder's manifest (`promptehr <command>` may replace it).

    Raises ValueError (naming the subject_id) for an empty cohort, a patient `timeline` refuses, a
    visit without codes, an empty, badly shaped or repeated (within a visit) code, or bad `splits`.
    Every table is validated with its `meds` schema before the folder is swapped in.
    """
    _version(code_system, "write_meds")
    if subjects_per_shard < 1:
        raise ValueError(f"write_meds: subjects_per_shard must be >= 1, not {subjects_per_shard}")
    if len(patients) == 0:  # before timeline, which fails on an empty cohort
        raise ValueError("write_meds: no patients to write")
    tl = timeline(patients, seed, writer="write_meds")
    _check_codes(tl, code_system)
    split_rank = _split_rank(tl.subject, splits)
    data, offsets, p_order = _events(tl, code_system, split_rank)

    files: dict[str, pa.Table] = {}
    rank_sorted = split_rank[p_order]
    for r, name in enumerate(SPLITS):
        first, end = np.searchsorted(rank_sorted, r), np.searchsorted(rank_sorted, r, side="right")
        for k, a in enumerate(range(first, end, subjects_per_shard)):
            b = min(a + subjects_per_shard, end)
            files[f"{meds.data_subdirectory}/{name}/{k}.parquet"] = data.slice(offsets[a], offsets[b] - offsets[a])
    codes = pc.unique(data["code"]).to_pylist()
    files[meds.code_metadata_filepath] = _code_metadata(sorted(codes), code_system)
    files[meds.subject_splits_filepath] = pa.table({
        "subject_id": pa.array(tl.subject[p_order], pa.int64()),
        "split": pa.array(np.array(SPLITS)[rank_sorted], pa.string()),
    }).sort_by("subject_id")
    schemas = {meds.code_metadata_filepath: meds.CodeMetadataSchema,
               meds.subject_splits_filepath: meds.SubjectSplitSchema}
    for rel, table in files.items():
        _validate(schemas.get(rel, meds.DataSchema), table, rel, "table")
    dataset = {"dataset_name": dataset_name, "etl_name": __name__, "meds_version": meds.__version__,
               "created_at": datetime.now(timezone.utc).isoformat(), "raw_source_id_columns": ["hadm_id"]}
    try:
        dataset["etl_version"] = metadata.version("promptehr-hf")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        pass
    _validate(meds.DatasetMetadataSchema, dataset, meds.dataset_metadata_filepath, "dataset metadata")

    arguments = {"code_system": code_system, "seed": seed, "patients": len(tl.subject),
                 "subjects_per_shard": subjects_per_shard, "dataset_name": dataset_name}
    with replace_folder(out_dir, command, arguments) as tmp:
        for rel, table in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
        (tmp / meds.dataset_metadata_filepath).write_text(json.dumps(dataset, indent=1) + "\n", encoding="utf-8")
    return Path(out_dir).resolve()


def _subject_of_code_row(tl: Timeline, n_codes: np.ndarray, row: int) -> int:
    """subject_id of code row `row` of per-visit counts `n_codes`."""
    visit = int(np.searchsorted(np.cumsum(n_codes), row, side="right"))
    return int(tl.subject[tl.patient[visit]])


def _check_codes(tl: Timeline, code_system: str) -> None:
    """Refuse an empty visit and a code that is empty, not shaped like its system's (diagnoses:
    `code_system`; procedures: the procedure system that goes with it; medications:
    ``<NAME>//<FORMULARY>``), or repeated within its visit: the reader would drop them."""
    if (tl.n_codes == 0).any():
        raise ValueError(f"write_meds: subject_id {tl.subject[tl.patient[tl.n_codes == 0][0]]} has a visit "
                         "without codes")
    proc_system = PROCEDURE_SYSTEMS[FOR_DIAGNOSES[code_system]]
    checks = [("code", tl.n_codes, tl.codes, _CODE_SHAPES[code_system].fullmatch,
               f"not shaped like a dotless {code_system} code (wrong code_system?)")]
    if tl.procedures is not None:
        checks.append(("procedure", tl.procedures.n_codes, tl.procedures.codes, proc_system.shape.fullmatch,
                       f"not shaped like a {proc_system.label} code (wrong code_system?)"))
    if tl.medications is not None:
        checks.append(("medication", tl.medications.n_codes, tl.medications.codes, medications.is_valid,
                       "not a normalised '<NAME>//<FORMULARY>' medication code"))
    for what, n_codes, array, ok, why in checks:
        codes = pd.Series(array.to_numpy(zero_copy_only=False), dtype=object)
        bad = {c for c in codes.unique() if not (isinstance(c, str) and ok(c))}
        if bad:
            row = int(np.flatnonzero(codes.isin(bad))[0])
            raise ValueError(f"write_meds: subject_id {_subject_of_code_row(tl, n_codes, row)} has the {what} "
                             f"{codes[row]!r}, {why}")
        visit = np.repeat(np.arange(len(n_codes)), n_codes)
        dup = pd.DataFrame({"visit": visit, "code": codes}).duplicated().to_numpy()
        if dup.any():
            row = int(np.flatnonzero(dup)[0])
            raise ValueError(f"write_meds: subject_id {_subject_of_code_row(tl, n_codes, row)} has the {what} "
                             f"{codes[row]!r} twice in one visit")


def _split_rank(subject: np.ndarray, splits: Mapping[int, str] | None) -> np.ndarray:
    """[n] index in SPLITS of each patient's split."""
    if splits is None:
        return np.zeros(len(subject), dtype=np.int64)
    given = pd.Series({int(k): v for k, v in splits.items()}, dtype=object)
    split = given.reindex(subject)
    if split.isna().any():
        raise ValueError(f"write_meds: splits has no split for subject_id {subject[split.isna().to_numpy()][0]}")
    extra = given.index.difference(subject)
    if len(extra):
        raise ValueError(f"write_meds: splits names subject_id {extra[0]}, which is not in the cohort")
    unknown = ~split.isin(SPLITS)
    if unknown.any():
        raise ValueError(f"write_meds: subject_id {subject[unknown.to_numpy()][0]} has the split "
                         f"{split[unknown].iloc[0]!r}; MEDS splits are {', '.join(SPLITS)}")
    return pd.Categorical(split, categories=SPLITS).codes.astype(np.int64)


def _events(tl: Timeline, code_system: str, split_rank: np.ndarray) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The data rows of every patient, sorted by (split, subject, time, kind, code order).

    Returns (table [rows], offsets [n + 1]: first row of each patient in `p_order` and the end,
    p_order [n]: patients sorted by (split, subject_id)).
    """
    n, v = len(tl.subject), len(tl.admit)
    dead = np.flatnonzero(tl.has_death)
    # A death outside hospital at the discharge itself is written a second after it (at the
    # discharge time it would read as a death in hospital).
    last_disch = tl.disch[np.cumsum(tl.n_visits) - 1]
    death = np.where(tl.hospital_death, tl.death, np.maximum(tl.death, last_disch + 1))[dead]
    # Per visit code blocks, each timed at its visit's discharge: diagnoses, procedures, medications.
    coded = [(diagnosis_prefix(code_system), tl.n_codes, tl.codes)]
    for prefix, modality in ((procedure_prefix(code_system), tl.procedures), (MEDICATION_PREFIX, tl.medications)):
        empty = pa.array([], pa.string())
        coded.append((prefix, np.zeros(v, np.int64), empty) if modality is None
                     else (prefix, modality.n_codes, modality.codes))
    code_visits = [np.repeat(np.arange(v), n_codes) for _, n_codes, _ in coded]
    # Blocks: gender, birth, admissions, the code blocks, discharges, deaths; `rank` orders rows of one time.
    sizes = [n, n, v, *(len(cv) for cv in code_visits), v, len(dead)]
    patient = np.concatenate([np.arange(n), np.arange(n), tl.patient, *(tl.patient[cv] for cv in code_visits),
                              tl.patient, dead])
    time = np.concatenate([np.zeros(n, np.int64), tl.dob, tl.admit, *(tl.disch[cv] for cv in code_visits),
                           tl.disch, death]) * US_PER_SECOND
    hadm = np.concatenate([np.zeros(2 * n, np.int64), tl.hadm, *(tl.hadm[cv] for cv in code_visits), tl.hadm,
                           np.zeros(len(dead), np.int64)])
    rank = np.repeat(np.arange(len(sizes)), sizes)
    code = pa.concat_arrays([
        pc.binary_join_element_wise(GENDER_PREFIX, tl.sex, ""),
        pa.repeat(meds.birth_code, n),
        pa.repeat(ADMISSION_CODE, v),
        *(pc.binary_join_element_wise(prefix, codes, "") for prefix, _, codes in coded),
        pa.repeat(DISCHARGE_CODE, v),
        pa.repeat(meds.death_code, len(dead)),
    ])
    static = rank == 0
    row_subject = tl.subject[patient]
    order = np.lexsort((np.arange(len(rank)), rank, np.where(static, np.iinfo(np.int64).min, time), row_subject,
                        split_rank[patient]))
    table = pa.table({
        "subject_id": pa.array(row_subject[order], pa.int64()),
        "time": pa.array(time[order], pa.int64(), mask=static[order]).cast(pa.timestamp("us")),
        "code": code.take(pa.array(order)),
        "numeric_value": pa.nulls(len(order), pa.float32()),
        "hadm_id": pa.array(hadm[order], pa.int64(), mask=(rank[order] < 2) | (rank[order] == len(sizes) - 1)),
    })
    p_order = np.lexsort((tl.subject, split_rank))
    rows = np.bincount(patient, minlength=n)
    return table, np.r_[0, np.cumsum(rows[p_order])], p_order


def _code_metadata(codes: list[str], code_system: str) -> pa.Table:
    """codes.parquet: every code written; ICD-9-CM diagnoses and billable procedure codes carry their
    title (ICD-10-CM diagnoses: none here)."""
    prefix, proc_prefix = diagnosis_prefix(code_system), procedure_prefix(code_system)
    proc_system = PROCEDURE_SYSTEMS[FOR_DIAGNOSES[code_system]]

    def title(code: str) -> str | None:
        bare = code.removeprefix(prefix)
        if code_system == "icd9cm" and code.startswith(prefix) and icd9.is_valid(bare):
            return icd9.title(bare)
        bare = code.removeprefix(proc_prefix)
        if code.startswith(proc_prefix) and proc_system.is_valid(bare):
            return proc_system.title(bare)
        return None

    return pa.table({
        "code": pa.array(codes, pa.string()),
        "description": pa.array([title(c) for c in codes], pa.string()),
        "parent_codes": pa.nulls(len(codes), pa.list_(pa.string())),
    })


def _validate(schema, obj, where, what: str) -> None:
    """`schema.validate(obj)` (a `meds` schema); MedsError naming `where` when it fails."""
    try:
        schema.validate(obj)
    except Exception as e:  # flexible_schema / jsonschema raise their own classes; the cause says more
        detail = getattr(e.__cause__, "message", None) or str(e)
        raise MedsError(f"{where}: not a valid MEDS {what}: {' '.join(str(detail).split())}") from e


# --------------------------------------------------------------------------- reading


def read_subject_splits(meds_dir: str | os.PathLike) -> dict[int, str] | None:
    """metadata/subject_splits.parquet as {subject_id: split}; None when the file is absent."""
    path = Path(meds_dir) / meds.subject_splits_filepath
    if not path.is_file():
        return None
    table = _read_metadata_table(path, meds.SubjectSplitSchema, "subject split file")
    ids = table["subject_id"].to_numpy()
    _, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        raise MedsError(f"{path}: subject_id {ids[first[counts > 1][0]]} has more than one split")
    return dict(zip(ids.tolist(), table["split"].to_pylist()))


def _read_metadata_table(path: Path, schema, what: str) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise MedsError(f"{path}: cannot read the MEDS {what} as Parquet: {' '.join(str(e).split())}") from e
    _validate(schema, table, path, what)
    return table


def _classify(name: str, code_ids: dict[str, int]) -> tuple[int, int]:
    """A code string -> (kind, id in `code_ids` of its ICD code, else -1); new ICD codes are added."""
    if name == meds.birth_code:
        return BIRTH, -1
    if name == meds.death_code:
        return DEATH, -1
    if name in (GENDER_PREFIX + "F", GENDER_PREFIX + "M"):
        return (FEMALE if name.endswith("F") else MALE), -1
    parts = name.split("//")
    if parts[0] == "HOSPITAL_ADMISSION":
        return ADMISSION, -1
    if parts[0] == "HOSPITAL_DISCHARGE":
        return DISCHARGE, -1
    if len(parts) == 4 and parts[:2] == ["DIAGNOSIS", "ICD"] and parts[2] in _DIAG_KIND and parts[3]:
        return _DIAG_KIND[parts[2]], code_ids.setdefault(parts[3], len(code_ids))
    if len(parts) == 4 and parts[:2] == ["PROCEDURE", "ICD"] and parts[2] in _PROC_KIND and parts[3]:
        return _PROC_KIND[parts[2]], code_ids.setdefault(parts[3], len(code_ids))
    if len(parts) >= 3 and name.startswith(MEDICATION_PREFIX):
        rest = name.removeprefix(MEDICATION_PREFIX)
        drug, _, product = rest.rpartition("//") if "//" in rest else (rest, "", "")
        if medications.normalize_name(drug):
            return MEDICATION, code_ids.setdefault(medications.make_code(drug, product or None), len(code_ids))
    return OTHER, -1


def _read_events(files: list[Path]) -> tuple[list[pd.DataFrame], list[np.ndarray], Counter, int, dict[str, int]]:
    """Validate and read every data file, keeping the rows `read_meds` uses.

    Returns (event frames: subject, time (int64 us), untimed, kind, code (id, -1 if none), seq (row
    in the files' concatenation), the distinct subject_ids of each file, ignored rows by first code
    component, rows read, {ICD code: id}).
    """
    code_ids: dict[str, int] = {}
    parts, file_subjects, ignored, offset = [], [], Counter(), 0
    for path in files:
        subjects = [np.zeros(0, np.int64)]
        try:
            pf = pq.ParquetFile(path)
            _validate(meds.DataSchema, pf.schema_arrow, path, "data file")
            for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=["subject_id", "time", "code"]):
                table = pa.Table.from_batches([batch])
                _validate(meds.DataSchema, table, path, "data file")
                subject = table["subject_id"].to_numpy()
                time = table["time"].combine_chunks()
                enc = table["code"].combine_chunks().dictionary_encode()
                idx = enc.indices.to_numpy()
                names = enc.dictionary.to_pylist()
                classified = [_classify(c, code_ids) for c in names]
                kind = np.array([k for k, _ in classified], dtype=np.int64)
                code = np.array([c for _, c in classified], dtype=np.int64)
                other = kind[idx] == OTHER
                for name, count in zip(names, np.bincount(idx[other], minlength=len(names)).tolist()):
                    if count:
                        ignored[name.split("//", 1)[0]] += count
                keep = np.flatnonzero(~other)
                parts.append(pd.DataFrame({
                    "subject": subject[keep],
                    "time": pc.fill_null(time.cast(pa.int64()), 0).to_numpy()[keep],
                    "untimed": time.is_null().to_numpy(zero_copy_only=False)[keep],
                    "kind": kind[idx[keep]], "code": code[idx[keep]], "seq": offset + keep,
                }))
                subjects.append(np.unique(subject))
                offset += len(subject)
        except (OSError, pa.ArrowException) as e:
            raise MedsError(f"{path}: cannot read the MEDS data file as Parquet: {' '.join(str(e).split())}") from e
        file_subjects.append(np.unique(np.concatenate(subjects)))
    return parts, file_subjects, ignored, offset, code_ids


def _check_one_file_per_subject(files: list[Path], file_subjects: list[np.ndarray]) -> np.ndarray:
    """All subject_ids, sorted; MedsError when one is in two files."""
    ids = np.concatenate(file_subjects)
    owner = np.repeat(np.arange(len(files)), [len(s) for s in file_subjects])
    order = np.argsort(ids, kind="stable")
    ids, owner = ids[order], owner[order]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if dup.size:
        j = dup[0]
        raise MedsError(f"{files[owner[j]]} and {files[owner[j + 1]]} both hold subject_id {ids[j]}; "
                        "MEDS keeps each subject's rows in one file")
    return ids


def _pair_admissions(adm: pd.DataFrame, dis: pd.DataFrame, subjects: np.ndarray):
    """Pair each subject's k-th admission row with its k-th discharge row (both in time order).

    Returns (subject, admission time, discharge time) [n_paired], sorted by (subject, admission
    time), and `unpaired` [len(subjects)]: the subject's admission and discharge counts differ, or
    a discharge precedes its admission (such subjects' admissions are not returned).
    """
    adm = adm.sort_values(["subject", "time", "seq"])
    dis = dis.sort_values(["subject", "time", "seq"])
    n_adm = adm["subject"].value_counts().reindex(subjects, fill_value=0).to_numpy()
    n_dis = dis["subject"].value_counts().reindex(subjects, fill_value=0).to_numpy()
    unpaired = n_adm != n_dis
    a_subject, a_time = adm["subject"].to_numpy(), adm["time"].to_numpy()
    keep = ~np.isin(a_subject, subjects[unpaired])
    a_subject, a_time = a_subject[keep], a_time[keep]
    d_time = dis["time"].to_numpy()[~np.isin(dis["subject"].to_numpy(), subjects[unpaired])]
    unpaired |= np.isin(subjects, a_subject[d_time < a_time])
    keep = ~np.isin(a_subject, subjects[unpaired])
    return a_subject[keep], a_time[keep], d_time[keep], unpaired


def _visit_codes(diag: pd.DataFrame, v_subject: np.ndarray, v_admit: np.ndarray, v_disch: np.ndarray):
    """Diagnosis rows -> (admission position, code id) in visit order, duplicates within a visit dropped.

    A row goes to its subject's admission with the earliest discharge at or after its time, when that
    admission started by then (diagnoses are timed at discharge). Returns (pos [k], code [k], rows
    outside every admission, repeated rows dropped).
    """
    stays = pd.DataFrame({"subject": v_subject, "disch": v_disch, "pos": np.arange(len(v_subject))})
    matched = pd.merge_asof(diag[["subject", "time", "seq", "code"]].sort_values("time", kind="stable"),
                            stays.sort_values("disch", kind="stable"),
                            left_on="time", right_on="disch", by="subject", direction="forward")
    pos = matched["pos"].to_numpy(dtype=np.float64, na_value=np.nan)
    inside = ~np.isnan(pos)
    inside[inside] = v_admit[pos[inside].astype(np.int64)] <= matched["time"].to_numpy()[inside]
    matched, pos = matched.loc[inside], pos[inside].astype(np.int64)
    order = np.lexsort((matched["seq"].to_numpy(), matched["time"].to_numpy(), pos))
    pos, code = pos[order], matched["code"].to_numpy()[order]
    dup = pd.DataFrame({"pos": pos, "code": code}).duplicated().to_numpy()
    return pos[~dup], code[~dup], int((~inside).sum()), int(dup.sum())


def read_meds(meds_dir: str | os.PathLike, *, code_system: str | None = None) -> tuple[list[dict], dict]:
    """Read a MEDS folder into patients (`schema.PATIENT_FEATURES`) and a summary (rules: module docstring).

    Args:
        meds_dir: the folder holding data/**/*.parquet (and optionally metadata/).
        code_system: None (infer: ICD-9 diagnoses -> "icd9cm", ICD-10 -> "icd10cm", both -> MedsError),
            "icd9cm" or "icd10cm" (keep that system's diagnoses, count the others).

    Returns `(patients, summary)`: patients sorted by subject_id; the summary (JSON-ready) holds
    `source`, `code_system`, `data_files`, `rows_read`, `rows_ignored`, `ignored_codes` (ignored
    rows by first code component), `subjects_read`, `patients`, `admissions`, `diagnosis_rows`,
    `distinct_codes`, `subjects_dropped` and `quirks` (each count, zero included), `splits` (kept
    patients per split of metadata/subject_splits.parquet, else None), `dataset` (dataset.json,
    else None), `code_metadata_rows` (else None) and `messages` (one line per non-zero count).
    Raises MedsError (one line, naming the file or folder) for a folder that cannot be read.
    """
    folder = Path(meds_dir)
    if code_system is not None:
        _version(code_system, "read_meds")
    if not folder.is_dir():
        raise MedsError(f"{folder}: not a folder (expected a MEDS folder with {meds.data_subdirectory}/*.parquet)")
    files = sorted((folder / meds.data_subdirectory).rglob("*.parquet"))
    if not files:
        raise MedsError(f"{folder}: no {meds.data_subdirectory}/**/*.parquet file (not a MEDS folder?)")
    dataset, split_of = _read_dataset_metadata(folder), read_subject_splits(folder)
    codes_path = folder / meds.code_metadata_filepath
    code_metadata_rows = (_read_metadata_table(codes_path, meds.CodeMetadataSchema, "code metadata").num_rows
                          if codes_path.is_file() else None)
    parts, file_subjects, ignored, rows_read, code_ids = _read_events(files)
    if not rows_read:
        raise MedsError(f"{folder}: the {meds.data_subdirectory} files hold no rows")
    ev = pd.concat(parts, ignore_index=True)
    subjects = _check_one_file_per_subject(files, file_subjects)
    code_names = np.array(list(code_ids), dtype=object)
    quirks = dict.fromkeys(("untimed_events", "other_system_diagnoses", "diagnoses_outside_admissions",
                            "duplicate_codes", "admissions_without_diagnoses", "overlapping_admissions",
                            "several_births", "ages_capped", "ages_negative", "overlapping_stays",
                            "several_deaths", "deaths_before_last_visit"), 0)

    untimed = ev["untimed"].to_numpy() & ~ev["kind"].isin([FEMALE, MALE]).to_numpy()
    quirks["untimed_events"] = int(untimed.sum())
    ev = ev.loc[~untimed]

    kind = ev["kind"].to_numpy()
    n9, n10 = int((kind == DIAG9).sum()), int((kind == DIAG10).sum())
    if code_system is None:
        if n9 and n10:
            ex9, ex10 = (code_names[ev["code"].to_numpy()[kind == k][0]] for k in (DIAG9, DIAG10))
            raise MedsError(
                f"{folder}: diagnoses in both ICD-9 ({n9} rows, e.g. {diagnosis_prefix('icd9cm')}{ex9}) and ICD-10 "
                f"({n10} rows, e.g. {diagnosis_prefix('icd10cm')}{ex10}); pass code_system='icd9cm' or 'icd10cm' "
                "to read one system (the other's rows are then dropped and counted)")
        if not (n9 or n10):
            raise MedsError(f"{folder}: no DIAGNOSIS//ICD//9//... or DIAGNOSIS//ICD//10//... rows; nothing to read")
        code_system = "icd9cm" if n9 else "icd10cm"
    diag_kind = _DIAG_KIND[ICD_VERSIONS[code_system]]
    quirks["other_system_diagnoses"] = n9 + n10 - int((kind == diag_kind).sum())

    # Subjects: birth, sex, admissions paired with discharges.
    births = ev.loc[kind == BIRTH].groupby("subject")["time"].agg(["min", "size"])
    quirks["several_births"] = int((births["size"] > 1).sum())
    female = np.isin(subjects, ev["subject"].to_numpy()[kind == FEMALE])
    male = np.isin(subjects, ev["subject"].to_numpy()[kind == MALE])
    v_subject, v_admit, v_disch, unpaired = _pair_admissions(ev.loc[kind == ADMISSION], ev.loc[kind == DISCHARGE],
                                                             subjects)
    reasons = {"no_birth": ~np.isin(subjects, births.index.to_numpy()), "no_sex": ~(female | male),
               "conflicting_sex": female & male, "unpaired_admissions": unpaired}
    dropped = np.zeros(len(subjects), dtype=bool)
    subjects_dropped = {}
    for reason, mask in reasons.items():
        subjects_dropped[reason] = int((mask & ~dropped).sum())
        dropped |= mask
    eligible = subjects[~dropped]

    # Visits: the eligible subjects' admissions that hold a diagnosis, in (subject, admission time) order.
    in_cohort = np.isin(v_subject, eligible)
    v_subject, v_admit, v_disch = v_subject[in_cohort], v_admit[in_cohort], v_disch[in_cohort]
    same = v_subject[1:] == v_subject[:-1]
    quirks["overlapping_admissions"] = int((same & (v_admit[1:] < v_disch[:-1])).sum())
    diag = ev.loc[(kind == diag_kind) & np.isin(ev["subject"].to_numpy(), eligible)]
    pos, code, outside, duplicates = _visit_codes(diag, v_subject, v_admit, v_disch)
    quirks["diagnoses_outside_admissions"], quirks["duplicate_codes"] = outside, duplicates
    has_code = np.zeros(len(v_subject), dtype=bool)
    has_code[pos] = True
    quirks["admissions_without_diagnoses"] = int((~has_code).sum())
    subjects_dropped["no_admission_with_diagnosis"] = int(len(np.setdiff1d(eligible, v_subject[has_code])))

    # Age at each admission; counted at each patient's first visit.
    birth = births["min"].reindex(v_subject).to_numpy()
    age = (v_admit - birth) / US_PER_SECOND / SECONDS_PER_YEAR
    first_visit = np.flatnonzero(has_code)[np.unique(v_subject[has_code], return_index=True)[1]]
    quirks["ages_capped"] = int((age[first_visit] > AGE_CAP).sum())
    quirks["ages_negative"] = int((age[first_visit] < 0).sum())
    scratch = dict(quirks)  # missing and inverted discharges cannot occur here (unpaired subjects are dropped)
    stay, gap, _, last = visit_times(v_subject, v_admit, v_disch, np.zeros(len(v_subject), dtype=bool), has_code,
                                     scratch, per_day=US_PER_DAY)
    quirks["overlapping_stays"] = scratch["overlapping_stays"]
    outcomes = _deaths(ev.loc[kind == DEATH], v_subject, v_admit, v_disch, last, quirks)
    visits = pd.DataFrame({"subject_id": v_subject, "age": np.round(np.clip(age, 0.0, AGE_CAP), AGE_DECIMALS),
                           "stay_days": stay, "gap_days": gap})
    sexes = pd.DataFrame({"subject_id": eligible, "sex": np.where(female[~dropped], "F", "M")})
    patients = _assemble(pos, code_names[code], visits, sexes, outcomes)
    tables, table_lines = _read_modalities(ev, eligible, code_system, (v_subject, v_admit, v_disch), has_code,
                                           patients, code_names, folder.name)

    splits = None
    if split_of is not None:
        kept = pd.Series([p["subject_id"] for p in patients], dtype=np.int64)
        splits = {k: int(v) for k, v in kept.map(split_of).fillna("(none)").value_counts().items()}
    summary = {
        "source": str(folder.resolve()),
        "code_system": code_system,
        "data_files": len(files),
        "rows_read": rows_read,
        "rows_ignored": sum(ignored.values()),
        "ignored_codes": dict(ignored.most_common()),
        "subjects_read": len(subjects),
        "patients": len(patients),
        "admissions": int(has_code.sum()),
        "times": True,
        "hospital_deaths": sum(p["hospital_death"] for p in patients),
        "deaths_after_discharge": sum(p["death_days"] is not None for p in patients),
        "diagnosis_rows": len(code),
        "distinct_codes": len(np.unique(code)),
        "subjects_dropped": subjects_dropped,
        "quirks": quirks,
        "splits": splits,
        "dataset": dataset,
        "code_metadata_rows": code_metadata_rows,
        **tables,
    }
    summary["messages"] = _messages(folder.name, summary) + table_lines
    for line in summary["messages"]:
        logger.warning(line)
    return patients, summary


def _read_modalities(ev: pd.DataFrame, eligible: np.ndarray, code_system: str, stays: tuple, has_code: np.ndarray,
                     patients: list[dict], code_names: np.ndarray, name: str) -> tuple[dict, list[str]]:
    """Procedures and medications of the eligible subjects into the patients (in place), as
    `_visit_codes` places diagnoses; a field whose rows the dataset does not have at all is left
    out (its summary None).

    Procedures (`PROCEDURE//ICD//<9|10>//<code>`, the version that goes with `code_system`; the
    other's rows are counted) may be timed at their chart date, a midnight: an admission takes them
    from the start of its day. Medications: `MEDICATION//START//<drug>[//<product>]`.
    stays: (subject, admission time, discharge time) of the paired admissions; has_code: which
    are visits. Returns ({"procedures": summary or None, "medications": ...}, messages).
    """
    v_subject, v_admit, v_disch = stays
    kind = ev["kind"].to_numpy()
    in_cohort = np.isin(ev["subject"].to_numpy(), eligible)
    proc_kind = _PROC_KIND[ICD_VERSIONS[code_system]]
    out, lines = {}, []
    for field, kinds, keep, admit, system in (
            ("procedures", (PROC9, PROC10), proc_kind, v_admit // US_PER_DAY * US_PER_DAY, FOR_DIAGNOSES[code_system]),
            ("medications", (MEDICATION,), MEDICATION, v_admit, medications.SYSTEM)):
        present = np.isin(kind, kinds)
        if not present.any():
            out[field] = None
            continue
        quirks = dict.fromkeys(MODALITY_QUIRKS if field == "procedures" else MODALITY_QUIRKS[1:], 0)
        if field == "procedures":
            quirks["other_system_rows"] = int((present & (kind != keep)).sum())
        pos, code, quirks["rows_outside_admissions"], dup = _visit_codes(ev.loc[(kind == keep) & in_cohort],
                                                                         v_subject, admit, v_disch)
        at_visit = has_code[pos]
        quirks["rows_at_dropped_admissions"] = int((~at_visit).sum())
        quirks["duplicate_codes"] = dup
        pos, code = pos[at_visit], code[at_visit]
        modalities.attach(patients, field, pos, code, code_names, has_code)
        out[field], more = modalities.table_summary(name, int(present.sum()), pos, code, code_names, quirks, system,
                                                    system)
        lines += more
    return out, lines


def _deaths(deaths: pd.DataFrame, v_subject: np.ndarray, v_admit: np.ndarray, v_disch: np.ndarray,
            last: np.ndarray, quirks: dict) -> pd.DataFrame:
    """Per patient (indexed by subject_id): hospital_death, death_days (NaN: none), from its
    earliest MEDS_DEATH: in hospital inside its last visit's stay, else days after its discharge;
    a death before the last admission is counted (`deaths_before_last_visit`), death_days 0.
    `several_deaths` counts patients with more than one MEDS_DEATH."""
    p_subject = v_subject[last]
    first = deaths.groupby("subject")["time"].agg(["min", "size"]).reindex(p_subject)
    quirks["several_deaths"] = int((first["size"] > 1).sum())
    t = first["min"].to_numpy(dtype=np.float64)
    known = ~np.isnan(t)
    hospital = known & (t >= v_admit[last]) & (t <= v_disch[last])
    before = known & (t < v_admit[last])
    quirks["deaths_before_last_visit"] = int(before.sum())
    days = np.where(known & ~hospital, np.clip(t - v_disch[last], 0, None) / US_PER_DAY, np.nan)
    return pd.DataFrame({"hospital_death": hospital, "death_days": days.astype(np.float32)}, index=p_subject)


def _read_dataset_metadata(folder: Path) -> dict | None:
    path = folder / meds.dataset_metadata_filepath
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MedsError(f"{path}: cannot read the MEDS dataset metadata as JSON: {' '.join(str(e).split())}") from e
    _validate(meds.DatasetMetadataSchema, obj, path, "dataset metadata")
    return obj


_TEXT = {
    "no_birth": "subjects without MEDS_BIRTH were dropped",
    "no_sex": "subjects without GENDER//F or GENDER//M were dropped",
    "conflicting_sex": "subjects with both GENDER//F and GENDER//M were dropped",
    "unpaired_admissions": "subjects whose HOSPITAL_ADMISSION rows do not pair with their HOSPITAL_DISCHARGE rows "
                           "were dropped",
    "no_admission_with_diagnosis": "subjects without an admission holding a diagnosis were dropped",
    "untimed_events": "birth, admission, discharge or diagnosis rows without a time were dropped",
    "other_system_diagnoses": "diagnosis rows of the other ICD version were dropped",
    "diagnoses_outside_admissions": "diagnosis rows outside every admission were dropped",
    "duplicate_codes": "repeated codes inside one admission were dropped (first kept)",
    "admissions_without_diagnoses": "admissions without a diagnosis were dropped",
    "overlapping_admissions": "admissions start before the previous one's discharge (paired in time order)",
    "several_births": "subjects have several MEDS_BIRTH rows (the earliest kept)",
    "ages_capped": "patients over {cap:g} at their first visit were capped at {cap:g}",
    "ages_negative": "patients whose first visit precedes their birth got age 0",
    "overlapping_stays": "visits start before the previous visit's discharge: gap set to 0",
    "several_deaths": "patients have several MEDS_DEATH rows (the earliest kept)",
    "deaths_before_last_visit": "patients have a MEDS_DEATH before their last admission: death_days set to 0",
}


def _messages(name: str, summary: dict) -> list[str]:
    counts = {**summary["subjects_dropped"], **summary["quirks"]}
    lines = [f"{name}: {counts[key]} {text.format(cap=AGE_CAP)}" for key, text in _TEXT.items() if counts[key]]
    if summary["rows_ignored"]:
        shown = ", ".join(f"{k} {v}" for k, v in list(summary["ignored_codes"].items())[:5])
        more = ", ..." if len(summary["ignored_codes"]) > 5 else ""
        lines.append(f"{name}: {summary['rows_ignored']} rows of other codes were ignored ({shown}{more})")
    return lines


__all__ = ["ICD_VERSIONS", "MedsError", "diagnosis_prefix", "read_meds", "read_subject_splits", "write_meds"]
