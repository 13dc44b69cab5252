"""Procedures and medications in the data layer (issue 18): code tables, readers, writers, round trips.

The demo is read in place (`demo_dir`); small fixture folders are written into tmp_path.
"""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import datetime
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from promptehr_hf.datasets_scripts import medications
from promptehr_hf.datasets_scripts.cohort import load_cohort
from promptehr_hf.datasets_scripts.cohort_io import (
    dataset_to_patients,
    patients_to_dataset,
    with_time_columns,
    write_mimic3_csvs,
    write_mimic4_csvs,
    write_parquet,
)
from promptehr_hf.datasets_scripts.meds_io import read_meds, write_meds
from promptehr_hf.datasets_scripts.mimic3 import Mimic3Error, file_fingerprints, read_mimic3
from promptehr_hf.datasets_scripts.mimic4 import read_mimic4
from promptehr_hf.datasets_scripts.prepare import load_prepared, prepare
from promptehr_hf.datasets_scripts.procedures import ICD9PROC, ICD10PCS, procedure_system
from promptehr_hf.datasets_scripts.schema import MODALITY_FIELDS, PATIENT_FEATURES, float32_times, with_modalities

# --------------------------------------------------------------------------- the demo, exactly


@pytest.fixture(scope="module")
def demo(demo_dir):
    return read_mimic3(demo_dir)


def test_demo_procedures_read_exactly(demo):
    patients, s = demo
    proc = s["procedures"]
    assert (proc["code_system"], proc["file"], proc["rows_read"]) == ("icd9proc", "PROCEDURES_ICD.csv.gz", 506)
    assert proc["quirks"] == {"empty_codes": 0, "invalid_codes": 2, "rows_without_admission": 0,
                              "rows_at_dropped_admissions": 0, "duplicate_codes": 20}
    # 36.01 and 36.05 (coronary angioplasty) were deleted from ICD-9-CM in 2005-2006; MIMIC-III keeps them.
    assert [(e["code"], e["rows"], e["first_data_row"]) for e in proc["invalid_code_examples"]] == [
        ("3605", 1, 1), ("3601", 1, 73)]
    assert (proc["rows"], proc["distinct_codes"], proc["visits_with_codes"], proc["non_billable_distinct_codes"]) == (
        484, 162, 113, 1)
    assert 506 - 2 - 20 == 484 == sum(len(v) for p in patients for v in p["procedures"])
    assert all(len(p["procedures"]) == len(p["visits"]) for p in patients)
    visits = [v for p in patients for v in p["procedures"]]
    assert all(len(set(v)) == len(v) and all(ICD9PROC.is_valid(c) for c in v) for v in visits)
    first = next(p for p in patients if p["subject_id"] == 10006)
    assert first["procedures"][0][:3] == ["9749", "5491", "3895"]  # seq_num order


def test_demo_prescriptions_read_exactly(demo):
    patients, s = demo
    med = s["medications"]
    assert (med["code_system"], med["file"], med["rows_read"]) == ("drug_formulary", "PRESCRIPTIONS.csv.gz", 10398)
    assert med["quirks"] == {"base_fluid_rows": 2617, "empty_drug_names": 0, "missing_formulary_codes": 1,
                             "rows_without_admission": 0, "rows_at_dropped_admissions": 0, "duplicate_codes": 3330}
    assert (med["rows"], med["distinct_codes"], med["visits_with_codes"]) == (4451, 837, 122)
    assert 10398 - 2617 - 3330 == 4451 == sum(len(v) for p in patients for v in p["medications"])
    codes = {c for p in patients for v in p["medications"] for c in v}
    assert all(medications.is_valid(c) for c in codes)
    assert "TARCEVA//UNK" in codes  # the row without a formulary_drug_cd, kept
    assert not {c for c in codes if medications.category(c) in ("D5W", "NS", "SW")}  # base fluids dropped


def test_demo_diagnoses_unchanged_and_messages(demo):
    patients, s = demo
    assert (s["patients"], s["admissions"], s["diagnosis_rows"], s["distinct_codes"]) == (100, 129, 1761, 581)
    assert "PROCEDURES_ICD.csv.gz: 20 repeated codes inside one admission were dropped (first kept)" in s["messages"]
    assert "PRESCRIPTIONS.csv.gz: 2617 rows of drug_type BASE (IV base solutions) were dropped" in s["messages"]
    assert set(file_fingerprints(s["source"])) == {"PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD", "PROCEDURES_ICD",
                                                   "PRESCRIPTIONS"}


def test_folder_without_the_new_tables_reads_as_before(demo, demo_dir, tmp_path):
    for name in ("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD"):
        shutil.copy(demo_dir / f"{name}.csv.gz", tmp_path / f"{name}.csv.gz")
    patients, s = read_mimic3(tmp_path)
    assert s["procedures"] is None and s["medications"] is None
    assert not any(k in p for p in patients for k in MODALITY_FIELDS)
    assert patients == [{k: v for k, v in p.items() if k not in MODALITY_FIELDS} for p in demo[0]]
    ds, _ = load_cohort(tmp_path, cache_dir=tmp_path.parent / "cache")
    assert ds["train"].features == PATIENT_FEATURES
    assert all(r["procedures"] is None and r["medications"] is None for r in ds["train"].to_list())


# --------------------------------------------------------------------------- round trips


def test_mimic3_writer_round_trip_carries_all_three_tables(demo, tmp_path):
    patients, _ = demo
    paths = write_mimic3_csvs(patients, tmp_path / "csv", seed=4)
    assert set(paths) == {"PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD", "PROCEDURES_ICD", "PRESCRIPTIONS"}
    back, s = read_mimic3(tmp_path / "csv")
    assert back == patients
    assert s["procedures"]["quirks"] == dict.fromkeys(s["procedures"]["quirks"], 0)
    # TARCEVA//UNK is written with an empty FORMULARY_DRUG_CD, as MIMIC has it, and read back the same.
    assert s["medications"]["quirks"] == {**dict.fromkeys(s["medications"]["quirks"], 0), "missing_formulary_codes": 1}
    rx = pd.read_csv(tmp_path / "csv" / "PRESCRIPTIONS.csv", dtype=str)
    assert list(rx.columns) == ["ROW_ID", "SUBJECT_ID", "HADM_ID", "STARTDATE", "ENDDATE", "DRUG_TYPE", "DRUG",
                                "FORMULARY_DRUG_CD"]
    assert len(rx) == 4451 and (rx["DRUG_TYPE"] == "MAIN").all()

    # A cohort without them, written over the same folder, removes the tables it does not have.
    write_mimic3_csvs([{k: v for k, v in p.items() if k != "medications"} for p in patients], tmp_path / "csv")
    assert not (tmp_path / "csv" / "PRESCRIPTIONS.csv").exists()
    back, s = read_mimic3(tmp_path / "csv")
    assert s["medications"] is None and all("medications" not in p for p in back)


def test_mimic4_writer_round_trip_with_icd10_pcs(tmp_path):
    patients = [
        {"subject_id": 1, "age": 40.0, "sex": "F", "visits": [["I10"], ["E119", "I10"]],
         "procedures": [["0UT90ZZ", "0DTJ4ZZ"], []], "medications": [["VANCOMYCIN//VANC1F"], ["HEPARIN//UNK"]]},
        {"subject_id": 2, "age": 90.0, "sex": "M", "visits": [["N179"]], "procedures": [["0VT00ZZ"]],
         "medications": [[]]},
    ]
    paths = write_mimic4_csvs(patients, tmp_path, seed=2)
    assert sorted(paths) == ["admissions", "diagnoses_icd", "patients", "prescriptions", "procedures_icd"]
    back, s = read_mimic4(tmp_path)
    assert [{k: p[k] for k in ("visits", "procedures", "medications")} for p in back] == [
        {k: p[k] for k in ("visits", "procedures", "medications")} for p in patients]
    assert s["procedures"]["code_system"] == "icd10pcs" and s["procedures"]["rows"] == 3
    proc = pd.read_csv(tmp_path / "hosp" / "procedures_icd.csv.gz", dtype=str)
    assert list(proc.columns) == ["subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version"]
    assert (proc["icd_version"] == "10").all()


def test_meds_round_trip_carries_all_three(demo, tmp_path):
    patients, _ = demo
    back, s = read_meds(write_meds(patients, tmp_path / "meds", seed=5))
    assert back == [float32_times(p) for p in patients]
    assert (s["procedures"]["rows"], s["medications"]["rows"], s["rows_ignored"]) == (484, 4451, 0)
    codes = pq.read_table(tmp_path / "meds" / "metadata" / "codes.parquet").to_pylist()
    titles = {r["code"]: r["description"] for r in codes}
    assert titles["PROCEDURE//ICD//9//3893"] == ICD9PROC.title("3893")
    assert "MEDICATION//START//TARCEVA//UNK" in titles


def test_parquet_and_prepare_round_trip(demo, demo_dir, tmp_path):
    patients, _ = demo
    write_parquet(patients, tmp_path / "p.parquet")
    table = with_time_columns(pq.read_table(tmp_path / "p.parquet"))
    assert table.schema.names == list(PATIENT_FEATURES)
    no_age = [{k: v for k, v in p.items() if k != "age"} for p in dataset_to_patients(patients_to_dataset(patients))]
    assert no_age == [{k: v for k, v in float32_times(p).items() if k != "age"} for p in patients]
    summary = prepare(demo_dir, tmp_path / "out")
    assert summary["procedures"]["rows"] == 484 and summary["medications"]["rows"] == 4451
    prepared = load_prepared(tmp_path / "out")
    back = sorted((p for name in prepared for p in dataset_to_patients(prepared[name])), key=lambda p: p["subject_id"])
    assert [(p["procedures"], p["medications"]) for p in back] == [(p["procedures"], p["medications"])
                                                                    for p in patients]
    # An old Parquet file without the two columns reads them as null.
    old = pq.read_table(tmp_path / "p.parquet").drop_columns(list(MODALITY_FIELDS))
    assert with_time_columns(old).column("procedures").null_count == len(patients)


def test_with_modalities_and_old_dicts():
    old = {"subject_id": 1, "age": 3.0, "sex": "F", "visits": [["4019"]]}
    assert with_modalities(old) == {**old, "procedures": None, "medications": None}
    assert dataset_to_patients(patients_to_dataset([old]))[0].keys() == {
        "subject_id", "age", "sex", "visits", "stay_days", "gap_days", "hospital_death", "death_days"}


# --------------------------------------------------------------------------- quirks, one of each


def tiny_folder(folder: Path, procedures: pd.DataFrame | None = None, prescriptions: pd.DataFrame | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"subject_id": [1, 2], "gender": ["F", "M"],
                  "dob": ["2100-01-01 00:00:00", "2100-01-01 00:00:00"]}).to_csv(folder / "PATIENTS.csv", index=False)
    pd.DataFrame({"subject_id": [1, 1, 2], "hadm_id": [10, 11, 20],
                  "admittime": ["2150-01-01 00:00:00", "2150-06-01 00:00:00", "2150-01-01 00:00:00"],
                  "dischtime": ["2150-01-05 00:00:00", "2150-06-03 00:00:00", "2150-01-02 00:00:00"]}
                 ).to_csv(folder / "ADMISSIONS.csv", index=False)
    # Admission 20 has only an invalid code: it is no visit.
    pd.DataFrame({"hadm_id": [10, 11, 20], "seq_num": [1, 1, 1], "icd9_code": ["4019", "486", "99999"]}
                 ).to_csv(folder / "DIAGNOSES_ICD.csv", index=False)
    if procedures is not None:
        procedures.to_csv(folder / "PROCEDURES_ICD.csv", index=False)
    if prescriptions is not None:
        prescriptions.to_csv(folder / "PRESCRIPTIONS.csv", index=False)
    return folder


def test_procedure_quirks_counted(tmp_path):
    proc = pd.DataFrame({
        "hadm_id": [10, 10, 10, 10, 10, 99, 20, 11],
        "seq_num": [3, 1, 2, 4, 5, 1, 1, 1],
        #             dotted, later seq,  first, empty, invalid, repeat of 3893, no admission, dropped admission
        "icd9_code": ["38.93", "9904", "", "0000", "3893", "3893", "3893", "0040"],
    })
    patients, s = read_mimic3(tiny_folder(tmp_path / "f", procedures=proc))
    assert s["procedures"]["quirks"] == {"empty_codes": 1, "invalid_codes": 1, "rows_without_admission": 1,
                                         "rows_at_dropped_admissions": 1, "duplicate_codes": 1}
    assert patients[0]["procedures"] == [["9904", "3893"], ["0040"]]
    assert s["procedures"]["invalid_code_examples"] == [{"code": "0000", "rows": 1, "first_data_row": 4}]


def test_prescription_quirks_counted_and_order(tmp_path):
    rx = pd.DataFrame({
        "hadm_id": [10, 10, 10, 10, 10, 10, None, 98, 20, 11],
        "startdate": ["2150-01-03", "2150-01-01", "2150-01-02", "2150-01-01", "2150-01-04", "2150-01-01",
                      "2150-01-01", "2150-01-01", "2150-01-01", None],
        "drug_type": ["MAIN", "MAIN", "BASE", "ADDITIVE", "MAIN", "MAIN", "MAIN", "MAIN", "MAIN", "MAIN"],
        "drug": ["Heparin", "CefePIME", "D5W", "Potassium  Chloride", "  ", "Cefepime", "Aspirin", "Aspirin",
                 "Aspirin", "Tarceva"],
        "formulary_drug_cd": ["HEPA5I", "CEFE2I", "D5W250", "KCL20P", "X", "CEFE2I", "ASA81", "ASA81", "ASA81", None],
    })
    patients, s = read_mimic3(tiny_folder(tmp_path / "f", prescriptions=rx))
    assert s["medications"]["quirks"] == {"base_fluid_rows": 1, "empty_drug_names": 1, "missing_formulary_codes": 1,
                                          "rows_without_admission": 2, "rows_at_dropped_admissions": 1,
                                          "duplicate_codes": 1}
    # Start order (then file order); tall-man lettering and spaces normalised, so CefePIME == Cefepime.
    assert patients[0]["medications"] == [["CEFEPIME//CEFE2I", "POTASSIUM CHLORIDE//KCL20P", "HEPARIN//HEPA5I"],
                                          ["TARCEVA//UNK"]]
    assert s["procedures"] is None and "procedures" not in patients[0]


def test_empty_optional_table_and_errors(tmp_path):
    folder = tiny_folder(tmp_path / "f", procedures=pd.DataFrame({"hadm_id": [], "seq_num": [], "icd9_code": []}))
    patients, s = read_mimic3(folder)
    assert patients[0]["procedures"] == [[], []] and s["procedures"]["rows_read"] == 0
    (folder / "PROCEDURES_ICD.csv").write_text("hadm_id,seq_num,icd9_code\nten,1,3893\n")
    with pytest.raises(Mimic3Error, match=r"PROCEDURES_ICD.csv: column hadm_id has 1 missing or non-integer value"):
        read_mimic3(folder)
    (folder / "PROCEDURES_ICD.csv").write_text("hadm_id,seq_num\n10,1\n")
    with pytest.raises(Mimic3Error, match=r"PROCEDURES_ICD.csv: missing column icd9_code"):
        read_mimic3(folder)
    (folder / "PROCEDURES_ICD.csv.gz").write_bytes(b"")
    with pytest.raises(Mimic3Error, match="PROCEDURES_ICD is present more than once"):
        read_mimic3(folder)


def test_mimic4_icd9_procedure_rows_dropped_and_counted(tmp_path):
    patients = [{"subject_id": 1, "age": 40.0, "sex": "F", "visits": [["I10"]], "procedures": [["0DTJ4ZZ"]]}]
    write_mimic4_csvs(patients, tmp_path, seed=1)
    path = tmp_path / "hosp" / "procedures_icd.csv.gz"
    proc = pd.read_csv(path, dtype=str)
    extra = proc.iloc[[0, 0, 0]].assign(icd_code=["3893", "0DTJ4Z", "0DTJ4ZZ"], icd_version=["9", "10", "10"],
                                        seq_num=["2", "3", "4"])
    with gzip.open(path, "wt") as f:
        pd.concat([proc, extra]).to_csv(f, index=False)
    back, s = read_mimic4(tmp_path)
    assert back[0]["procedures"] == [["0DTJ4ZZ"]]
    assert s["procedures"]["quirks"] == {"icd9_rows": 1, "empty_codes": 0, "invalid_codes": 1,
                                         "rows_without_admission": 0, "rows_at_dropped_admissions": 0,
                                         "duplicate_codes": 1}


def write_meds_rows(folder: Path, rows: list[tuple]) -> Path:
    """rows: (subject_id, 'YYYY-MM-DD HH:MM' or None, code) -> folder/data/train/0.parquet."""
    path = folder / meds.data_subdirectory / "train" / "0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "subject_id": pa.array([r[0] for r in rows], pa.int64()),
        "time": pa.array([r[1] and datetime.fromisoformat(r[1]) for r in rows], pa.timestamp("us")),
        "code": pa.array([r[2] for r in rows], pa.string()),
        "numeric_value": pa.nulls(len(rows), pa.float32()),
    }), path)
    return folder


def test_meds_reads_the_mimic_iv_extraction_names(tmp_path):
    write_meds_rows(tmp_path, [
        (1, None, "GENDER//F"),
        (1, "2000-01-01 00:00", "MEDS_BIRTH"),
        (1, "2050-01-01 10:00", "HOSPITAL_ADMISSION//EW EMER.//UNK"),
        (1, "2050-01-01 00:00", "PROCEDURE//ICD//9//3893"),  # chart date: the admission's day
        (1, "2050-01-01 12:00", "MEDICATION//START//Vancomycin"),  # no product code
        (1, "2050-01-01 13:00", "MEDICATION//START//Heparin//63323026201"),
        (1, "2050-01-01 14:00", "MEDICATION//STOP//Heparin//63323026201"),  # ignored
        (1, "2050-01-02 00:00", "PROCEDURE//ICD//10//0DTJ4ZZ"),  # the other version
        (1, "2050-01-03 10:00", "DIAGNOSIS//ICD//9//4019"),
        (1, "2050-01-03 10:00", "HOSPITAL_DISCHARGE//HOME"),
        (1, "2050-02-01 00:00", "PROCEDURE//ICD//9//9904"),  # outside every admission
    ])
    patients, s = read_meds(tmp_path)
    assert patients[0]["procedures"] == [["3893"]]
    assert patients[0]["medications"] == [["VANCOMYCIN//UNK", "HEPARIN//63323026201"]]
    assert s["procedures"]["quirks"] == {"other_system_rows": 1, "rows_outside_admissions": 1,
                                         "rows_at_dropped_admissions": 0, "duplicate_codes": 0}
    assert s["ignored_codes"] == {"MEDICATION": 1}


def test_writers_refuse_bad_modalities(tmp_path):
    bad_length = [{"subject_id": 7, "age": 3.0, "sex": "F", "visits": [["4019"], ["486"]], "procedures": [["3893"]]}]
    with pytest.raises(ValueError, match="subject_id 7 has 1 procedures lists for 2 visits"):
        write_mimic3_csvs(bad_length, tmp_path / "a")
    empty = [{"subject_id": 8, "age": 3.0, "sex": "F", "visits": [["4019"]], "medications": [[""]]}]
    with pytest.raises(ValueError, match="subject_id 8 has a null or empty code in medications"):
        write_mimic3_csvs(empty, tmp_path / "b")
    shape = [{"subject_id": 9, "age": 3.0, "sex": "F", "visits": [["4019"]], "procedures": [["0DTJ4ZZ"]]}]
    with pytest.raises(ValueError, match="subject_id 9 has the procedure '0DTJ4ZZ', not shaped like"):
        write_meds(shape, tmp_path / "c")
    raw = [{"subject_id": 9, "age": 3.0, "sex": "F", "visits": [["4019"]], "medications": [["Heparin"]]}]
    with pytest.raises(ValueError, match="subject_id 9 has the medication 'Heparin'"):
        write_meds(raw, tmp_path / "d")


# --------------------------------------------------------------------------- code tables


def test_procedure_tables():
    assert len(ICD9PROC.categories()) == 100 and len(ICD9PROC.billable_codes()) == 3882
    assert len(ICD10PCS.categories()) == 905 and len(ICD10PCS.billable_codes()) == 78603
    assert ICD9PROC.normalize("38.93") == "3893" and ICD9PROC.category("3893") == "38"
    assert ICD9PROC.parent("3893") == "389" and ICD9PROC.title("389") is None
    assert ICD9PROC.is_valid("38") and not ICD9PROC.is_billable("38") and not ICD9PROC.is_valid("3605")
    assert ICD10PCS.category("0DTJ4ZZ") == "0DT" and ICD10PCS.parent("0DTJ4ZZ") == "0DT"
    assert ICD10PCS.title("0DTJ4ZZ") == "Resection of Appendix, Percutaneous Endoscopic Approach"
    assert ICD9PROC.check("605", 60, "F") == "sex_male_only" and ICD9PROC.check("605", 60, "M") is None
    assert ICD10PCS.edits_of("0UT90ZZ") == ("sex_female_only",)
    got = ICD10PCS.violations(["0UT90ZZ", "0VT00ZZ", "0DTJ4ZZ"], [30, 30, 30], ["M", "F", "M"])
    assert got.tolist() == ["sex_female_only", "sex_male_only", ""]
    assert procedure_system("icd9proc") is ICD9PROC
    with pytest.raises(ValueError, match="unknown procedure code system"):
        procedure_system("cpt")


def test_procedure_data_files_are_deterministic_gzip(repo_root):
    data = repo_root / "datasets_scripts" / "data"
    for stem, n_nodes in (("icd9proc_v32", 4651), ("icd10pcs_fy2024", 79508)):
        raw = (data / f"{stem}.json.gz").read_bytes()
        assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0: a rebuild gives the same bytes
        doc = json.loads(gzip.decompress(raw))
        assert len(doc["nodes"]) == n_nodes and doc["meta"]["built_by"] == "scripts/build_procedure_tables.py"
    edits = json.loads(gzip.decompress((data / "icd10pcs_fy2024_edits.json.gz").read_bytes()))
    assert edits["meta"]["codes_not_valid_in_fy2021"] == 643 and edits["age_ranges"] == {}


def test_medication_codes():
    assert medications.make_code(" CefePIME ", "cefe2i") == "CEFEPIME//CEFE2I"
    assert medications.make_code("Tarceva", None) == "TARCEVA//UNK"
    assert medications.category("VANCOMYCIN//VANC1F") == "VANCOMYCIN"
    assert medications.formulary("VANCOMYCIN//VANC1F") == "VANC1F"
    assert medications.normalize_name("Sodium Chloride 0.9%  Flush") == "SODIUM CHLORIDE 0.9% FLUSH"
    assert not medications.is_valid("Vancomycin//VANC1F") and not medications.is_valid("VANCOMYCIN")
    with pytest.raises(ValueError, match="empty drug name"):
        medications.make_code("  ", "X")
    assert np.all([medications.is_valid(medications.make_code(n, "A//B")) for n in ("a//b", "x")])
