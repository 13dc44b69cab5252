"""MIMIC-III cohort builder, `promptehr prepare`, and the MIMIC-III CSV writer (issue 2).

Small fixture folders are written by the tests into tmp_path; the real demo is read in place
(`demo_dir`) and only ever rewritten into tmp_path.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from promptehr_hf import cli
from promptehr_hf.datasets_scripts import prepare as prepare_mod
from promptehr_hf.datasets_scripts.cohort import CohortBuilder, load_cohort, split_patients
from promptehr_hf.datasets_scripts.cohort_io import (
    dataset_to_patients,
    patients_to_dataset,
    write_mimic3_csvs,
    write_parquet,
)
from promptehr_hf.datasets_scripts.mimic3 import Mimic3Error, file_fingerprints, fingerprint, read_mimic3
from promptehr_hf.datasets_scripts.prepare import load_prepared, prepare, stale_reasons
from promptehr_hf.datasets_scripts.schema import NO_TIMES, PATIENT_FEATURES, TIME_FIELDS, with_times

# --------------------------------------------------------------------------- a tiny folder


def tiny_tables() -> dict[str, pd.DataFrame]:
    """3 patients with one of each quirk (lower-case MIMIC headers, as in the demo)."""
    patients = pd.DataFrame({
        "row_id": [1, 2, 3],
        "subject_id": [1, 2, 3],
        "gender": ["F", "M", "F"],
        "dob": ["2100-01-01 00:00:00", "1850-06-01 00:00:00", "2120-01-01 00:00:00"],  # 2: the >89 shift
    })
    admissions = pd.DataFrame({
        "row_id": [1, 2, 3, 4],
        "subject_id": [1, 1, 2, 2],
        "hadm_id": [30, 20, 10, 40],  # hadm order is not time order
        "admittime": ["2150-03-01 10:00:00", "2150-01-01 08:00:00", "2150-05-05 12:00:00", "2151-01-01 00:00:00"],
    })
    diagnoses = pd.DataFrame({
        "row_id": range(1, 9),
        "subject_id": [1, 1, 1, 1, 1, 2, 2, 2],
        "hadm_id": [20, 20, 20, 20, 30, 10, 10, 10],
        "seq_num": [2, 1, 3, 4, 1, 1, 2, 3],
        #           out of order, dotted, duplicate once normalised, empty; ...; invalid 99999
        "icd9_code": ["25000", "401.9", "4019", "", "486", "V3000", "E8800", "99999"],
    })
    return {"PATIENTS": patients, "ADMISSIONS": admissions, "DIAGNOSES_ICD": diagnoses}


# The tiny ADMISSIONS has no dischtime: a cohort without times (the time fields null).
TINY_PATIENTS = [
    {"subject_id": 1, "age": 50.0, "sex": "F", "visits": [["4019", "25000"], ["486"]], **NO_TIMES},
    {"subject_id": 2, "age": 90.0, "sex": "M", "visits": [["V3000", "E8800"]], **NO_TIMES},
]


def without_times(patients: list[dict]) -> list[dict]:
    """The patients without their time fields (a time-free cohort is written with drawn times)."""
    return [{k: v for k, v in p.items() if k not in TIME_FIELDS} for p in patients]


def write_folder(folder: Path, tables: dict[str, pd.DataFrame], upper: bool = False, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        out = df.rename(columns=str.upper) if upper else df
        out.to_csv(folder / f"{name}.csv{'.gz' if gz else ''}", index=False)
    return folder


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_folder(tmp_path / "mimic", tiny_tables())


# --------------------------------------------------------------------------- the demo


def test_demo_figures(demo_dir):
    patients, s = read_mimic3(demo_dir)
    assert (s["patients"], s["admissions"], s["diagnosis_rows"], s["distinct_codes"]) == (100, 129, 1761, 581)
    assert len(patients) == 100 and sum(len(v) for p in patients for v in p["visits"]) == 1761
    assert s["quirks"]["ages_capped"] == 9
    assert s["non_billable_distinct_codes"] == 20
    # All other quirks are counted (as zero), not absent.
    assert set(s["quirks"]) >= {"admissions_without_diagnoses", "empty_codes", "invalid_codes", "duplicate_codes",
                                "patients_without_admissions"}
    assert s["quirks"]["deathtime_after_discharge"] == 1  # the demo's one deathtime a day after its dischtime
    assert all(v == 0 for k, v in s["quirks"].items() if k not in ("ages_capped", "deathtime_after_discharge"))
    ages = np.array([p["age"] for p in patients])
    assert ages.max() == 90.0 and ages.min() >= 0
    assert {p["sex"] for p in patients} == {"F", "M"}
    first = next(p for p in patients if p["subject_id"] == 10006)
    assert first["visits"][0][:3] == ["99591", "99662", "5672"]  # seq_num order
    assert all(len(set(v)) == len(v) for p in patients for v in p["visits"])


def test_demo_upper_case_plain_csv_is_identical_and_builder_caches(demo_dir, tmp_path):
    # Rewrite the demo verbatim (every cell as text) with upper-case headers, plain .csv.
    upper = tmp_path / "upper"
    upper.mkdir()
    for name in ("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD", "PROCEDURES_ICD", "PRESCRIPTIONS"):
        df = pd.read_csv(demo_dir / f"{name}.csv.gz", dtype=str, keep_default_na=False)
        df.rename(columns=str.upper).to_csv(upper / f"{name}.csv", index=False)
    assert "SUBJECT_ID" in (upper / "PATIENTS.csv").read_text().splitlines()[0]

    cache = str(tmp_path / "cache")
    ds_lower, s_lower = load_cohort(demo_dir, cache_dir=cache)
    ds_upper, s_upper = load_cohort(upper, cache_dir=cache)
    assert set(ds_lower) == {"train", "validation", "test"}
    for split in ds_lower:
        assert ds_lower[split].features == PATIENT_FEATURES
        assert ds_lower[split].to_list() == ds_upper[split].to_list()
    assert [len(ds_lower[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    ids = [set(ds_lower[s]["subject_id"]) for s in ds_lower]
    assert len(ids[0] | ids[1] | ids[2]) == 100
    for key in ("patients", "admissions", "diagnosis_rows", "distinct_codes", "quirks", "splits"):
        assert s_lower[key] == s_upper[key]
    for key in ("procedures", "medications"):
        assert {**s_lower[key], "file": None} == {**s_upper[key], "file": None}

    # A fresh builder on the same folder reads the cache (and still has the summary).
    again = CohortBuilder(source_dir=str(demo_dir), cache_dir=cache)
    assert os.path.isdir(again.cache_dir)
    again.download_and_prepare()
    assert again.summary["quirks"]["ages_capped"] == 9
    assert again.as_dataset()["test"].to_list() == ds_lower["test"].to_list()


def test_split_is_deterministic_and_order_free():
    patients = [{"subject_id": i, "age": 1.0, "sex": "F", "visits": [["486"]]} for i in range(1000, 1200)]
    a = split_patients(patients, seed=3)
    b = split_patients(patients[::-1], seed=3)
    assert a == b
    assert [len(a[s]) for s in ("train", "validation", "test")] == [160, 20, 20]
    c = split_patients(patients, seed=4)
    assert {p["subject_id"] for p in c["test"]} != {p["subject_id"] for p in a["test"]}
    with pytest.raises(ValueError):
        split_patients(patients, val_frac=0.6, test_frac=0.5)


# --------------------------------------------------------------------------- quirks


def test_tiny_folder_quirks_are_counted(tiny):
    patients, s = read_mimic3(tiny)
    assert patients == TINY_PATIENTS
    q = s["quirks"]
    assert q["ages_capped"] == 2  # both admissions of subject 2
    assert q["empty_codes"] == 1
    assert q["invalid_codes"] == 1
    assert q["duplicate_codes"] == 1
    assert q["admissions_without_diagnoses"] == 1
    assert q["patients_without_admissions"] == 1
    assert (s["patients"], s["admissions"], s["diagnosis_rows"], s["distinct_codes"]) == (2, 3, 5, 5)
    assert s["rows_read"] == {"PATIENTS": 3, "ADMISSIONS": 4, "DIAGNOSES_ICD": 8}
    text = "\n".join(s["messages"])
    assert "PATIENTS.csv.gz: 1 patients without any admission" in text
    assert "DIAGNOSES_ICD.csv.gz: 1 repeated codes" in text
    assert s["times"] is False and s["time_columns_missing"] == {
        "ADMISSIONS": ["dischtime", "deathtime", "hospital_expire_flag"], "PATIENTS": ["dod", "expire_flag"]}
    assert "ADMISSIONS.csv.gz: no dischtime, deathtime, hospital_expire_flag columns: the cohort has no times" in text


def test_invalid_codes_are_counted_reported_and_the_rest_loaded(tmp_path):
    t = tiny_tables()
    t["DIAGNOSES_ICD"].loc[t["DIAGNOSES_ICD"]["icd9_code"] == "486", "icd9_code"] = "0000"
    folder = write_folder(tmp_path / "mimic", t)
    patients, s = read_mimic3(folder)
    assert s["quirks"]["invalid_codes"] == 2
    assert {e["code"] for e in s["invalid_code_examples"]} == {"99999", "0000"}
    assert next(e for e in s["invalid_code_examples"] if e["code"] == "99999")["first_data_row"] == 8
    msg = next(m for m in s["messages"] if "not ICD-9-CM" in m)
    assert msg.startswith("DIAGNOSES_ICD.csv.gz: 2 rows") and "99999" in msg and "0000" in msg
    # Subject 1's second admission had only the invalid code: dropped and counted.
    assert patients[0]["visits"] == [["4019", "25000"]] and patients[1] == TINY_PATIENTS[1]
    assert s["quirks"]["admissions_without_valid_codes"] == 1

    summary = prepare(folder, tmp_path / "out")  # reported, not fatal
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["quirks"]["invalid_codes"] == summary["quirks"]["invalid_codes"] == 2
    assert saved["invalid_code_examples"][0]["code"] in {"99999", "0000"}


# --------------------------------------------------------------------------- bad input


def assert_prepare_fails_cleanly(folder: Path, tmp_path: Path, *needles: str) -> None:
    """prepare() raises an error containing every needle and leaves no folder behind."""
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(Mimic3Error) as e:
        prepare(folder, tmp_path / "out")
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert sorted(os.listdir(tmp_path)) == before  # no out/, no temporary folder


def test_missing_file(tiny, tmp_path):
    (tiny / "ADMISSIONS.csv.gz").unlink()
    assert_prepare_fails_cleanly(tiny, tmp_path, "missing file ADMISSIONS.csv", str(tiny))


def test_missing_column(tmp_path):
    t = tiny_tables()
    t["PATIENTS"] = t["PATIENTS"].drop(columns="dob")
    folder = write_folder(tmp_path / "mimic", t)
    assert_prepare_fails_cleanly(folder, tmp_path, "PATIENTS.csv.gz", "missing column dob")


def test_icd10_codes_are_refused(tmp_path):
    t = tiny_tables()
    t["DIAGNOSES_ICD"]["icd9_code"] = ["I10", "E119", "N179", "", "J189", "Z66", "I10", "E119"]
    folder = write_folder(tmp_path / "mimic", t)
    assert_prepare_fails_cleanly(folder, tmp_path, "DIAGNOSES_ICD.csv.gz", "ICD-10", "E119, I10")


def test_mimic_iv_icd_version_column_is_refused(tmp_path):
    t = tiny_tables()
    d = t["DIAGNOSES_ICD"].rename(columns={"icd9_code": "icd_code"})
    d["icd_version"] = [9, 9, 9, 9, 10, 9, 9, 9]
    t["DIAGNOSES_ICD"] = d
    folder = write_folder(tmp_path / "mimic", t)
    assert_prepare_fails_cleanly(folder, tmp_path, "DIAGNOSES_ICD.csv.gz", "icd_version", "ICD-10")


def test_empty_table(tmp_path):
    t = tiny_tables()
    t["ADMISSIONS"] = t["ADMISSIONS"].iloc[:0]
    folder = write_folder(tmp_path / "mimic", t)
    assert_prepare_fails_cleanly(folder, tmp_path, "ADMISSIONS.csv.gz", "no rows")
    # A zero-byte file (not even a header) too.
    with gzip.open(folder / "ADMISSIONS.csv.gz", "wb"):
        pass
    assert_prepare_fails_cleanly(folder, tmp_path, "ADMISSIONS.csv.gz", "empty")


def test_truncated_gzip(tmp_path):
    t = tiny_tables()
    big = pd.concat([t["DIAGNOSES_ICD"]] * 2000, ignore_index=True)  # large enough to cut mid-stream
    folder = write_folder(tmp_path / "mimic", {**t, "DIAGNOSES_ICD": big})
    data = (folder / "DIAGNOSES_ICD.csv.gz").read_bytes()
    (folder / "DIAGNOSES_ICD.csv.gz").write_bytes(data[: len(data) // 2])
    assert_prepare_fails_cleanly(folder, tmp_path, "DIAGNOSES_ICD.csv.gz", "truncated or corrupt")


def test_bad_values_name_the_row(tmp_path):
    t = tiny_tables()
    t["ADMISSIONS"].loc[2, "admittime"] = "yesterday"
    folder = write_folder(tmp_path / "mimic", t)
    assert_prepare_fails_cleanly(folder, tmp_path, "ADMISSIONS.csv.gz", "admittime", "data row 3", "'yesterday'")


def test_failure_never_clobbers_a_good_output(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(tiny, out)
    good = {p.name: p.read_bytes() for p in out.iterdir()}

    # A failure while writing (after one split is on disk) leaves the old folder intact.
    real = prepare_mod.write_parquet
    calls = []

    def flaky(patients, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(patients, path)

    monkeypatch.setattr(prepare_mod, "write_parquet", flaky)
    with pytest.raises(OSError, match="disk full"):
        prepare(tiny, out, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good
    assert sorted(os.listdir(tmp_path)) == ["mimic", "out"]

    # A bad folder leaves it intact too; a foreign non-empty folder is never replaced.
    monkeypatch.setattr(prepare_mod, "write_parquet", real)
    (tiny / "PATIENTS.csv.gz").unlink()
    with pytest.raises(Mimic3Error):
        prepare(tiny, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        prepare(tmp_path / "mimic", foreign)
    assert os.listdir(foreign) == ["notes.txt"]


# --------------------------------------------------------------------------- prepare, load, CLI


def test_prepare_and_load_prepared(tiny, tmp_path):
    out = tmp_path / "out"
    summary = prepare(tiny, out, seed=0, val_frac=0.0, test_frac=0.5)
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [  # (hidden: the output manifest)
        "summary.json", "test.parquet", "train.parquet", "validation.parquet"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["splits"] == {"train": 1, "validation": 0, "test": 1}
    ds = load_prepared(out)
    assert ds["train"].features == PATIENT_FEATURES
    assert all(not ds[split].cache_files for split in ds)  # in memory: no Arrow copy anywhere
    loaded = sorted(dataset_to_patients(ds["train"]) + dataset_to_patients(ds["test"]), key=lambda p: p["subject_id"])
    assert loaded == TINY_PATIENTS
    # Replacing a previous prepare output is allowed (and complete).
    prepare(tiny, out, seed=5)
    assert json.loads((out / "summary.json").read_text())["seed"] == 5


def test_cli_prepare(demo_dir, tmp_path):
    out = tmp_path / "prepared"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "promptehr_hf.cli", "prepare", "--mimic-dir", str(demo_dir),
         "--out", str(out), "--seed", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patients"] == 100 and summary["seed"] == 1
    assert "diagnosis rows" in r.stdout and "1,761" in r.stdout and "quirk: ages capped" in r.stdout


def test_cli_prepare_error_exit_code(tiny, tmp_path, capsys):
    (tiny / "DIAGNOSES_ICD.csv.gz").unlink()
    assert cli.main(["prepare", "--mimic-dir", str(tiny), "--out", str(tmp_path / "out")]) == 2
    assert "missing file DIAGNOSES_ICD.csv" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the writer


def test_write_mimic3_csvs_round_trip(demo_dir, tmp_path):
    patients, s = read_mimic3(demo_dir)
    paths = write_mimic3_csvs(patients, tmp_path / "csv", seed=7)
    assert sorted(p.name for p in paths.values()) == ["ADMISSIONS.csv", "DIAGNOSES_ICD.csv", "PATIENTS.csv",
                                                      "PRESCRIPTIONS.csv", "PROCEDURES_ICD.csv"]
    lines = (tmp_path / "csv" / "DIAGNOSES_ICD.csv").read_text().splitlines()
    assert lines[0] == '"ROW_ID","SUBJECT_ID","HADM_ID","SEQ_NUM","ICD9_CODE"'  # quoted, as MIMIC-III v1.4
    assert lines[1].endswith(',1,"99591"')  # dotless code, leading zeros kept as text
    back, s2 = read_mimic3(tmp_path / "csv")
    assert back == patients
    assert s2["quirks"]["ages_capped"] >= 9  # age 90 is written as MIMIC's >89 shift


def test_writer_ages_visits_and_dataset_input(tmp_path):
    patients = [
        {"subject_id": 5, "age": 0.0, "sex": "M", "visits": [["V3000", "7742"]]},
        {"subject_id": 6, "age": 45.678, "sex": "F", "visits": [["4019"], ["25000", "4019"], ["486"]]},
        {"subject_id": 7, "age": 90.0, "sex": "F", "visits": [["4280", "42731"]]},
        {"subject_id": 8, "age": 89.99, "sex": "M", "visits": [["41401"]]},
    ]
    ds = patients_to_dataset(patients)
    assert ds.features == PATIENT_FEATURES
    write_mimic3_csvs(ds, tmp_path / "a", seed=1)
    back, s = read_mimic3(tmp_path / "a")
    assert [p["age"] for p in back] == [0.0, 45.68, 90.0, 89.99]  # to the reader's 0.01 year
    assert [p["visits"] for p in back] == [p["visits"] for p in patients]
    assert s["quirks"]["ages_negative"] == 0
    # A cohort without times is written with drawn stays (1-15 days) and gaps (>= 1 day), no death.
    assert all(len(p["stay_days"]) == len(p["visits"]) and p["gap_days"][0] == 0 for p in back)
    assert all(1 <= d < 15 for p in back for d in p["stay_days"])
    assert all(g >= 1 for p in back for g in p["gap_days"][1:])
    assert not any(p["hospital_death"] for p in back) and all(p["death_days"] is None for p in back)
    assert all(v == 0 for k, v in s["quirks"].items() if k != "ages_capped")
    adm = pd.read_csv(tmp_path / "a" / "ADMISSIONS.csv")
    times = pd.to_datetime(adm["ADMITTIME"])
    assert (pd.to_datetime(adm["DISCHTIME"]) > times).all()
    assert list(adm.columns[:4]) == ["ROW_ID", "SUBJECT_ID", "HADM_ID", "ADMITTIME"]
    pats = pd.read_csv(tmp_path / "a" / "PATIENTS.csv")
    assert pats["DOB"].str.endswith("00:00:00").all()
    # A different seed gives different dates, the same patients.
    write_mimic3_csvs(patients, tmp_path / "b", seed=2)
    assert without_times(read_mimic3(tmp_path / "b")[0]) == without_times(back)
    assert (tmp_path / "a" / "ADMISSIONS.csv").read_text() != (tmp_path / "b" / "ADMISSIONS.csv").read_text()
    with pytest.raises(ValueError, match="no visit"):
        write_mimic3_csvs([{"subject_id": 1, "age": 3.0, "sex": "F", "visits": []}], tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.csv"))


def test_write_parquet_round_trip(tmp_path):
    patients = [{"subject_id": 1, "age": 33.5, "sex": "F", "visits": [["650"], ["V270", "64891"]]}]
    path = write_parquet(patients, tmp_path / "x" / "p.parquet")
    assert [f.name for f in path.parent.iterdir()] == ["p.parquet"]
    assert dataset_to_patients(patients_to_dataset(patients)) == [with_times(p) for p in patients]  # None
    table = pd.read_parquet(path)
    assert table["visits"].iloc[0][1].tolist() == ["V270", "64891"]


def test_builder_needs_a_folder(tmp_path):
    with pytest.raises(ValueError, match="source_dir"):
        CohortBuilder(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cache_dir"):  # never the global datasets cache
        CohortBuilder(source_dir=str(tmp_path))
    with pytest.raises(Mimic3Error, match="not a folder"):
        CohortBuilder(source_dir=str(tmp_path / "nope"), cache_dir=str(tmp_path))


def test_empty_split_is_an_empty_dataset(tiny, tmp_path):
    ds, summary = load_cohort(tiny, val_frac=0.0, test_frac=0.5, cache_dir=str(tmp_path / "cache"))
    assert summary["splits"] == {"train": 1, "validation": 0, "test": 1}
    assert len(ds["validation"]) == 0 and ds["validation"].features == PATIENT_FEATURES
    assert sorted(dataset_to_patients(ds["train"]) + dataset_to_patients(ds["test"]),
                  key=lambda p: p["subject_id"]) == TINY_PATIENTS


# --------------------------------------------------------------------------- one path, fingerprints


def test_prepare_reads_through_the_builder_and_leaves_no_cache(tiny, tmp_path, monkeypatch):
    calls = []
    real = CohortBuilder.download_and_prepare

    def spy(self, *args, **kwargs):
        calls.append(Path(self.cache_dir))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CohortBuilder, "download_and_prepare", spy)
    out = tmp_path / "out"
    summary = prepare(tiny, out, seed=0, val_frac=0.0, test_frac=0.5)
    assert len(calls) == 1
    # the builder's Arrow cache was inside the folder being written, and is gone from the output
    inside = calls[0].relative_to(tmp_path).parts  # (.out.tmp-..., .builder_cache, ...)
    assert inside[0].startswith(".out.tmp-") and inside[1] == prepare_mod.BUILDER_CACHE
    assert not calls[0].exists()
    assert sorted(os.listdir(tmp_path)) == ["mimic", "out"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "summary.json", "test.parquet", "train.parquet", "validation.parquet"]
    assert summary["reader_version"] == str(CohortBuilder.VERSION)
    assert summary["input_files"] == file_fingerprints(tiny) and summary["fingerprint"] == fingerprint(tiny)
    assert (summary["seed"], summary["val_frac"], summary["test_frac"]) == (0, 0.0, 0.5)


def test_fingerprint_sees_a_row_edited_in_place(tmp_path):
    folder = write_folder(tmp_path / "mimic", tiny_tables(), gz=False)
    out = tmp_path / "out"
    prepare(folder, out)
    assert stale_reasons(out, folder) == []
    assert stale_reasons(out, folder, seed=1) == ["seed was 0, now 1"]
    before = fingerprint(folder)
    # One code changed, same size, modification time restored: only the content hash sees it.
    path = folder / "DIAGNOSES_ICD.csv"
    st = path.stat()
    text = path.read_text()
    assert text.count(",486") == 1
    path.write_text(text.replace(",486", ",485"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert fingerprint(folder) != before
    assert stale_reasons(out, folder) == ["DIAGNOSES_ICD.csv changed (content)"]
    os.utime(path)
    assert stale_reasons(out, folder) == ["DIAGNOSES_ICD.csv changed (modification time, content)"]
    assert stale_reasons(tmp_path / "nothing", folder) == [f"no prepared cohort in {tmp_path / 'nothing'}"]
