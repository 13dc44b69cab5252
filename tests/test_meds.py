"""MEDS in and out (datasets_scripts/meds_io.py): write_meds, read_meds and their round trip."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from promptehr_hf import cli
from promptehr_hf.datasets_scripts import icd9, meds_io
from promptehr_hf.datasets_scripts.cohort import folder_format
from promptehr_hf.datasets_scripts.cohort_io import dataset_to_patients, write_mimic3_csvs
from promptehr_hf.datasets_scripts.meds_io import MedsError, read_meds, read_subject_splits, write_meds
from promptehr_hf.datasets_scripts.mimic3 import read_mimic3
from promptehr_hf.datasets_scripts.prepare import load_prepared, prepare, stale_reasons
from promptehr_hf.datasets_scripts.schema import TIME_FIELDS, float32_times
from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.file_utils import OutputFolderError

ICD10_PATIENTS = [
    {"subject_id": 7, "age": 0.0, "sex": "F", "visits": [["Z3800"]]},
    {"subject_id": 3, "age": 90.0, "sex": "M", "visits": [["I10", "E119"], ["E119", "N179", "I10"]]},
    {"subject_id": 5, "age": 45.67, "sex": "F", "visits": [["O80"]]},
]


def by_id(patients: list[dict]) -> list[dict]:
    return sorted(patients, key=lambda p: p["subject_id"])


def comparable(back: list[dict], given: list[dict]) -> tuple[list[dict], list[dict]]:
    """(back, given sorted by subject_id) as a round trip must match them: times in float32 (what
    the readers return); a given patient without times is compared without them (the writer draws
    its stays and gaps, see test_time_outcome_data)."""
    given = by_id(given)

    def view(p: dict, ref: dict) -> dict:
        if ref.get("stay_days") is None:
            return {k: v for k, v in p.items() if k not in TIME_FIELDS}
        return float32_times(p)

    return [view(b, g) for b, g in zip(back, given)], [view(g, g) for g in given]


def assert_same(back: list[dict], given: list[dict]) -> None:
    assert len(back) == len(given)
    got, want = comparable(back, given)
    assert got == want


def data_files(folder: Path) -> list[Path]:
    return sorted((folder / meds.data_subdirectory).rglob("*.parquet"))


def meds_table(rows: list[tuple]) -> pa.Table:
    """rows: (subject_id, 'YYYY-MM-DD HH:MM' or None, code[, numeric_value]) -> a MEDS data table."""
    return pa.table({
        "subject_id": pa.array([r[0] for r in rows], pa.int64()),
        "time": pa.array([r[1] and datetime.fromisoformat(r[1]) for r in rows], pa.timestamp("us")),
        "code": pa.array([r[2] for r in rows], pa.string()),
        "numeric_value": pa.array([r[3] if len(r) > 3 else None for r in rows], pa.float32()),
    })


def write_shards(folder: Path, shards: dict[str, list[tuple]]) -> Path:
    for name, rows in shards.items():
        path = folder / meds.data_subdirectory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(meds_table(rows), path)
    return folder


@pytest.fixture(scope="module")
def simulated() -> list[dict]:
    # Diagnoses only: these tests count the diagnosis rows and codes (procedures and medications
    # through MEDS: tests/test_multimodal_data.py).
    return simulate(200, seed=0, modalities=("diagnoses",))


# --------------------------------------------------------------------------- round trips


def test_simulated_cohort_round_trip(simulated, tmp_path):
    ages = [p["age"] for p in simulated]
    assert 0.0 in ages and 90.0 in ages
    out = write_meds(simulated, tmp_path / "meds", seed=3)
    assert out == (tmp_path / "meds").resolve()
    back, s = read_meds(out)
    assert_same(back, simulated)  # subject_id, sex, visits, times exactly; ages at 0.01 as given; 90 stays 90
    assert (s["code_system"], s["patients"], s["subjects_read"], s["rows_ignored"]) == ("icd9cm", 200, 200, 0)
    assert s["diagnosis_rows"] == sum(len(v) for p in simulated for v in p["visits"])
    assert not any(s["subjects_dropped"].values())
    assert s["quirks"]["ages_capped"] == ages.count(90.0)  # written as MIMIC's >89 shift, capped back
    assert not any(v for k, v in s["quirks"].items() if k != "ages_capped")
    assert s["splits"] == {meds.train_split: 200}
    assert s["dataset"]["meds_version"] == meds.__version__
    # + GENDER//F, GENDER//M, birth, admission, discharge (and MEDS_DEATH when someone died)
    assert s["code_metadata_rows"] == s["distinct_codes"] + 5 + (s["hospital_deaths"] + s["deaths_after_discharge"] > 0)


def test_icd10_round_trip_and_code_system(tmp_path):
    out = write_meds(ICD10_PATIENTS, tmp_path / "meds", code_system="icd10cm")
    back, s = read_meds(out)  # inferred from the codes
    assert_same(back, ICD10_PATIENTS)
    assert s["code_system"] == "icd10cm"
    codes = set(pq.read_table(data_files(out)[0])["code"].to_pylist())
    assert {"DIAGNOSIS//ICD//10//I10", "DIAGNOSIS//ICD//10//E119", "DIAGNOSIS//ICD//10//Z3800"} <= codes
    assert pq.read_table(out / meds.code_metadata_filepath)["description"].null_count == len(codes)
    # Asking for the other system keeps no diagnosis: every row is counted, every subject dropped.
    none, s9 = read_meds(out, code_system="icd9cm")
    assert none == [] and s9["quirks"]["other_system_diagnoses"] == 7
    assert s9["subjects_dropped"]["no_admission_with_diagnosis"] == 3


def test_demo_round_trip(demo_dir, tmp_path):
    patients, _ = read_mimic3(demo_dir)
    back, s = read_meds(write_meds(patients, tmp_path / "meds", seed=5))
    assert back == patients
    assert s["patients"] == len(patients) and s["quirks"]["ages_capped"] == sum(p["age"] == 90 for p in patients)


# --------------------------------------------------------------------------- what is written


def test_event_names_times_and_hadm_ids_agree_with_the_mimic3_writer(tmp_path):
    patients = [{"subject_id": 1, "age": 50.0, "sex": "F", "visits": [["4019", "25000"], ["486"]]},
                {"subject_id": 2, "age": 0.0, "sex": "M", "visits": [["V3000"]]}]
    out = write_meds(patients, tmp_path / "meds", seed=4)
    rows = pq.read_table(data_files(out)[0]).to_pandas()
    one = rows[rows["subject_id"] == 1]
    assert one["code"].tolist() == [
        "GENDER//F", meds.birth_code, "HOSPITAL_ADMISSION//UNK//UNK",
        "DIAGNOSIS//ICD//9//4019", "DIAGNOSIS//ICD//9//25000", "HOSPITAL_DISCHARGE//UNK",
        "HOSPITAL_ADMISSION//UNK//UNK", "DIAGNOSIS//ICD//9//486", "HOSPITAL_DISCHARGE//UNK",
    ]
    assert rows.loc[rows["subject_id"] == 2, "code"].tolist() == [
        "GENDER//M", "MEDS_BIRTH", "HOSPITAL_ADMISSION//UNK//UNK", "DIAGNOSIS//ICD//9//V3000",
        "HOSPITAL_DISCHARGE//UNK"]
    assert rows["numeric_value"].isna().all()
    # Same seed, same dates and hadm_ids as the MIMIC-III CSVs (one shared timeline).
    write_mimic3_csvs(patients, tmp_path / "csv", seed=4)
    adm = pd.read_csv(tmp_path / "csv" / "ADMISSIONS.csv", parse_dates=["ADMITTIME", "DISCHTIME"])
    dob = pd.read_csv(tmp_path / "csv" / "PATIENTS.csv", parse_dates=["DOB"])["DOB"]
    times = one["time"].tolist()
    assert pd.isna(times[0]) and times[1] == dob.iloc[0]
    a1 = adm[adm["SUBJECT_ID"] == 1].sort_values("ADMITTIME")
    assert [times[2], times[6]] == a1["ADMITTIME"].tolist()
    assert times[3:6] == [a1["DISCHTIME"].iloc[0]] * 3 and times[7:] == [a1["DISCHTIME"].iloc[1]] * 2
    assert one["hadm_id"].iloc[2:].tolist() == [a1["HADM_ID"].iloc[0]] * 4 + [a1["HADM_ID"].iloc[1]] * 3
    assert one["hadm_id"].iloc[:2].isna().all()


def test_written_folder_passes_the_meds_schemas(simulated, tmp_path):
    cohort = simulated[:60]
    names = (meds.train_split, meds.tuning_split, meds.held_out_split)
    splits = {p["subject_id"]: names[i % 3] for i, p in enumerate(cohort)}
    out = write_meds(cohort, tmp_path / "meds", splits=splits, subjects_per_shard=8, dataset_name="sim")
    files = data_files(out)
    assert len(files) == 9  # 20 subjects per split, 8 per shard
    seen = []
    for path in files:
        table = pq.read_table(path)
        meds.DataSchema.validate(table)
        df = table.to_pandas()
        ids = df["subject_id"].unique()
        assert len(ids) <= 8 and {splits[i] for i in ids} == {path.parent.name}
        assert (np.diff(df["subject_id"].to_numpy()) >= 0).all()  # subjects contiguous and sorted
        for _, rows in df.groupby("subject_id"):
            t = rows["time"]
            assert t.isna().tolist() == [True] + [False] * (len(t) - 1)  # the static row first
            assert t.iloc[1:].is_monotonic_increasing
        seen += ids.tolist()
    assert sorted(seen) == sorted(splits)  # each subject in exactly one file
    codes = pq.read_table(out / meds.code_metadata_filepath)
    meds.CodeMetadataSchema.validate(codes)
    assert set(codes["code"].to_pylist()) == {c for f in files for c in pq.read_table(f)["code"].to_pylist()}
    prefix = "DIAGNOSIS//ICD//9//"
    for code, description in zip(codes["code"].to_pylist(), codes["description"].to_pylist()):
        assert description == (icd9.title(code.removeprefix(prefix)) if code.startswith(prefix) else None)
    assert codes["parent_codes"].null_count == len(codes)
    split_table = pq.read_table(out / meds.subject_splits_filepath)
    meds.SubjectSplitSchema.validate(split_table)
    assert set(split_table["split"].to_pylist()) == set(names)
    assert read_subject_splits(out) == splits
    dataset = json.loads((out / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(dataset)
    assert dataset["dataset_name"] == "sim" and dataset["meds_version"] == meds.__version__
    assert datetime.fromisoformat(dataset["created_at"]).tzinfo is not None
    back, s = read_meds(out)
    assert_same(back, cohort)
    assert s["splits"] == {name: 20 for name in names} and s["data_files"] == 9


# --------------------------------------------------------------------------- atomic writes


def test_a_failed_write_leaves_the_old_folder(simulated, tmp_path, monkeypatch):
    out = write_meds(simulated[:30], tmp_path / "meds", subjects_per_shard=10)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_write = pq.write_table
    calls = []

    def fail_on_second(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(meds_io.pq, "write_table", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        write_meds(simulated[30:60], out, subjects_per_shard=10)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["meds"]  # no temporary left beside it
    write_meds(simulated[30:60], out)
    assert_same(read_meds(out)[0], simulated[30:60])
    # A folder holding other files is never replaced.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError):
        write_meds(simulated[:5], tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("kwargs, patients, match", [
    ({"code_system": "icd11"}, None, "code_system must be one of icd9cm, icd10cm"),
    ({}, [{"subject_id": 4, "age": 3.0, "sex": "F", "visits": [["I10"]]}], "subject_id 4 .*'I10'.*wrong code_system"),
    ({"code_system": "icd10cm"}, None, "subject_id 1 .*not shaped like a dotless icd10cm code"),
    ({}, [{"subject_id": 4, "age": 3.0, "sex": "F", "visits": [["4019"], ["486", "4019", "486"]]}],
     "subject_id 4 has the code '486' twice in one visit"),
    ({}, [{"subject_id": 4, "age": 3.0, "sex": "F", "visits": [[""]]}], "subject_id 4 has the code ''"),
    ({}, [{"subject_id": 1, "age": 3.0, "sex": "F", "visits": [["4019"]]},
          {"subject_id": 4, "age": 3.0, "sex": "F", "visits": [["4019"], []]}], "subject_id 4 has a visit without"),
    ({}, [], "no patients"),
    ({"splits": {1: "train"}}, None, "no split for subject_id 2"),
    ({"splits": {1: "train", 2: "validation"}}, None, "subject_id 2 has the split 'validation'; MEDS splits are"),
    ({"splits": {1: "train", 2: "train", 9: "train"}}, None, "subject_id 9, which is not in the cohort"),
    ({"subjects_per_shard": 0}, None, "subjects_per_shard"),
])
def test_the_writer_refuses_bad_input(kwargs, patients, match, tmp_path):
    if patients is None:
        patients = [{"subject_id": 1, "age": 3.0, "sex": "F", "visits": [["4019"]]},
                    {"subject_id": 2, "age": 5.0, "sex": "M", "visits": [["486"]]}]
    with pytest.raises(ValueError, match=match):
        write_meds(patients, tmp_path / "meds", **kwargs)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- reading other MEDS folders


def test_reader_rules_and_counts(tmp_path):
    folder = write_shards(tmp_path / "meds", {
        "train/0.parquet": [
            (10, "2050-01-02 00:00", "LAB//50912//mg/dL", 1.1),  # rows need not be sorted
            (10, "2000-01-01 00:00", "GENDER//F"),  # gender timed at birth: still read
            (10, "2000-01-01 00:00", "MEDS_BIRTH"),
            (10, "2050-01-01 08:00", "HOSPITAL_ADMISSION//EW EMER.//PHYSICIAN REFERRAL"),
            (10, "2050-01-03 09:00", "DIAGNOSIS//ICD//9//486"),  # inside the stay, before the discharge
            (10, "2050-01-05 12:00", "DIAGNOSIS//ICD//9//4019"),
            (10, "2050-01-05 12:00", "DIAGNOSIS//ICD//9//25000"),
            (10, "2050-01-05 12:00", "DIAGNOSIS//ICD//9//4019"),  # repeated
            (10, "2050-01-05 12:00", "HOSPITAL_DISCHARGE//HOME"),
            (10, "2050-03-01 00:00", "DIAGNOSIS//ICD//9//5990"),  # outside every stay
            (10, "2050-06-01 00:00", "HOSPITAL_ADMISSION//URGENT//UNK"),  # no diagnosis
            (10, "2050-06-03 00:00", "HOSPITAL_DISCHARGE//UNK"),
            (10, "2050-06-04 00:00", "LAB//50912//mg/dL", 1.3),
            (10, "2051-01-01 00:00", "MEDS_DEATH"),
            (11, None, "GENDER//M"),  # no birth
            (11, "2050-01-01 00:00", "HOSPITAL_ADMISSION//UNK//UNK"),
            (11, "2050-01-02 00:00", "DIAGNOSIS//ICD//9//486"),
            (11, "2050-01-02 00:00", "HOSPITAL_DISCHARGE//UNK"),
            (12, None, "GENDER//UNK"),  # no usable sex
            (12, "2000-01-01 00:00", "MEDS_BIRTH"),
            (13, None, "GENDER//F"),  # both sexes
            (13, None, "GENDER//M"),
            (13, "2000-01-01 00:00", "MEDS_BIRTH"),
        ],
        "held_out/0.parquet": [
            (14, None, "GENDER//F"),  # an admission without its discharge
            (14, "2000-01-01 00:00", "MEDS_BIRTH"),
            (14, "2050-01-01 00:00", "HOSPITAL_ADMISSION//UNK//UNK"),
            (14, "2050-01-02 00:00", "DIAGNOSIS//ICD//9//486"),
            (15, None, "GENDER//M"),  # no admission
            (15, "2000-01-01 00:00", "MEDS_BIRTH"),
            (16, None, "GENDER//M"),
            (16, "1800-05-05 00:00", "MEDS_BIRTH"),  # MIMIC's >89 shift
            (16, "2100-05-05 10:00", "HOSPITAL_ADMISSION//UNK//UNK"),
            (16, None, "DIAGNOSIS//ICD//9//4280"),  # no time
            (16, "2100-05-09 10:00", "DIAGNOSIS//ICD//9//V3000"),
            (16, "2100-05-09 10:00", "HOSPITAL_DISCHARGE//UNK"),
        ],
    })
    patients, s = read_meds(folder)
    # 10: its first admission (01-01 08:00 -> 01-05 12:00) is its visit; MEDS_DEATH 360.5 days after it.
    assert patients == [{"subject_id": 10, "age": 50.0, "sex": "F", "visits": [["486", "4019", "25000"]],
                         "stay_days": [float(np.float32(4 + 4 / 24))], "gap_days": [0.0], "hospital_death": False,
                         "death_days": 360.5},
                        {"subject_id": 16, "age": 90.0, "sex": "M", "visits": [["V3000"]], "stay_days": [4.0],
                         "gap_days": [0.0], "hospital_death": False, "death_days": None}]
    assert s["subjects_dropped"] == {"no_birth": 1, "no_sex": 1, "conflicting_sex": 1, "unpaired_admissions": 1,
                                     "no_admission_with_diagnosis": 1}
    assert s["quirks"] == {"untimed_events": 1, "other_system_diagnoses": 0, "diagnoses_outside_admissions": 1,
                           "duplicate_codes": 1, "admissions_without_diagnoses": 1, "overlapping_admissions": 0,
                           "several_births": 0, "ages_capped": 1, "ages_negative": 0, "overlapping_stays": 0,
                           "several_deaths": 0, "deaths_before_last_visit": 0}
    assert s["ignored_codes"] == {"LAB": 2, "GENDER": 1} and s["rows_ignored"] == 3  # MEDS_DEATH is read
    assert (s["rows_read"], s["subjects_read"], s["admissions"], s["diagnosis_rows"]) == (35, 7, 2, 4)
    assert (s["splits"], s["dataset"], s["code_metadata_rows"]) == (None, None, None)  # no metadata/
    assert len(s["messages"]) == 11 and all("\n" not in m for m in s["messages"])


def test_overlapping_stays_several_births_negative_ages_and_no_admissions(tmp_path):
    folder = write_shards(tmp_path / "meds", {"0.parquet": [
        (20, None, "GENDER//M"),
        (20, "2001-01-01 00:00", "MEDS_BIRTH"),
        (20, "2000-01-01 00:00", "MEDS_BIRTH"),  # the earliest is kept
        (20, "2050-01-01 00:00", "HOSPITAL_ADMISSION//A"),
        (20, "2050-01-05 00:00", "HOSPITAL_ADMISSION//B"),  # starts before A's discharge
        (20, "2050-01-10 00:00", "DIAGNOSIS//ICD//9//486"),
        (20, "2050-01-10 00:00", "HOSPITAL_DISCHARGE//A"),
        (20, "2050-01-20 00:00", "DIAGNOSIS//ICD//9//4019"),
        (20, "2050-01-20 00:00", "HOSPITAL_DISCHARGE//B"),
        (21, None, "GENDER//F"),
        (21, "2060-01-01 00:00", "MEDS_BIRTH"),  # after the admission
        (21, "2050-01-01 00:00", "HOSPITAL_ADMISSION//UNK//UNK"),
        (21, "2050-01-02 00:00", "DIAGNOSIS//ICD//9//650"),
        (21, "2050-01-02 00:00", "HOSPITAL_DISCHARGE//UNK"),
        (22, None, "GENDER//F"),  # a diagnosis but no admission
        (22, "2000-01-01 00:00", "MEDS_BIRTH"),
        (22, "2050-01-02 00:00", "DIAGNOSIS//ICD//9//650"),
    ]})
    patients, s = read_meds(folder)
    no_death = {"hospital_death": False, "death_days": None}
    assert patients == [{"subject_id": 20, "age": 50.0, "sex": "M", "visits": [["486"], ["4019"]],
                         "stay_days": [9.0, 15.0], "gap_days": [0.0, 0.0], **no_death},  # B began 5 days before A ended
                        {"subject_id": 21, "age": 0.0, "sex": "F", "visits": [["650"]], "stay_days": [1.0],
                         "gap_days": [0.0], **no_death}]
    q = s["quirks"]
    assert (q["overlapping_admissions"], q["several_births"], q["ages_negative"]) == (1, 1, 1)
    assert q["overlapping_stays"] == 1
    assert q["diagnoses_outside_admissions"] == 1 and s["subjects_dropped"]["no_admission_with_diagnosis"] == 1


def test_mixed_icd_versions_need_a_code_system(tmp_path):
    person = [(None, "GENDER//F"), ("2000-01-01 00:00", "MEDS_BIRTH"), ("2050-01-01 00:00", "HOSPITAL_ADMISSION//X"),
              ("2050-01-02 00:00", "HOSPITAL_DISCHARGE//X")]
    folder = write_shards(tmp_path / "meds", {"0.parquet": [
        *[(1, *r) for r in person], (1, "2050-01-02 00:00", "DIAGNOSIS//ICD//9//4019"),
        *[(2, *r) for r in person], (2, "2050-01-02 00:00", "DIAGNOSIS//ICD//10//I10"),
    ]})
    with pytest.raises(MedsError, match=r"both ICD-9 \(1 rows, e.g. DIAGNOSIS//ICD//9//4019\).*pass code_system="):
        read_meds(folder)
    patients, s = read_meds(folder, code_system="icd10cm")
    assert [p["visits"] for p in patients] == [[["I10"]]]
    assert s["quirks"]["other_system_diagnoses"] == 1 and s["subjects_dropped"]["no_admission_with_diagnosis"] == 1


def one_line_error(folder: Path, match: str, **kwargs) -> str:
    with pytest.raises(MedsError, match=match) as err:
        read_meds(folder, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("table, match", [
    (pa.table({"subject_id": pa.array([1], pa.int64()), "time": pa.array([None], pa.timestamp("us"))}),
     "Missing required columns: code"),
    (pa.table({"subject_id": ["1"], "time": pa.array([None], pa.timestamp("us")), "code": ["GENDER//F"]}),
     r"subject_id \(want int64, got string\)"),
    (pa.table({"subject_id": pa.array([1], pa.int64()), "time": pa.array([None], pa.timestamp("us")),
               "code": pa.array([None], pa.string())}), "no nulls but do: code"),
    (pa.table({"subject_id": pa.array([1], pa.int64()), "time": pa.array([0], pa.timestamp("ns")),
               "code": ["MEDS_BIRTH"]}), r"time \(want timestamp\[us\], got timestamp\[ns\]\)"),
    (None, "cannot read the MEDS data file as Parquet"),
])
def test_an_invalid_data_file_is_named(table, match, simulated, tmp_path):
    out = write_meds(simulated[:10], tmp_path / "meds")
    bad = data_files(out)[0]
    if table is None:
        bad.write_bytes(b"PAR1 not really parquet")
    else:
        pq.write_table(table, bad)
    message = one_line_error(out, match)
    assert message.startswith(f"{bad}: ")


def test_folder_level_errors(simulated, tmp_path):
    one_line_error(tmp_path / "missing", "not a folder")
    (tmp_path / "empty" / "data").mkdir(parents=True)
    one_line_error(tmp_path / "empty", "no data/")
    only_labs = write_shards(tmp_path / "labs", {"0.parquet": [(1, "2050-01-01 00:00", "LAB//1//mg", 2.0)]})
    one_line_error(only_labs, "no DIAGNOSIS//ICD//9//... or DIAGNOSIS//ICD//10//... rows")
    with pytest.raises(ValueError, match="code_system must be one of"):
        read_meds(only_labs, code_system="ICD9")
    split = write_shards(tmp_path / "split", {"a.parquet": [(1, None, "GENDER//F")],
                                              "b.parquet": [(2, None, "GENDER//M"), (1, None, "MEDS_BIRTH")]})
    one_line_error(split, r"a.parquet and .*b.parquet both hold subject_id 1")


@pytest.mark.parametrize("name, content, match", [
    (meds.dataset_metadata_filepath, '{"dataset_name": 3}', "not a valid MEDS dataset metadata: 3 is not of type"),
    (meds.dataset_metadata_filepath, "{", "cannot read the MEDS dataset metadata as JSON"),
    (meds.subject_splits_filepath, pa.table({"subject_id": pa.array([1], pa.int64()), "split": ["train"],
                                             "fold": [0]}), "Disallowed extra columns: fold"),
    (meds.subject_splits_filepath, pa.table({"subject_id": pa.array([1, 1], pa.int64()), "split": ["train"] * 2}),
     "subject_id 1 has more than one split"),
    (meds.code_metadata_filepath, pa.table({"code": pa.array([1], pa.int64())}), r"code \(want string"),
])
def test_invalid_metadata_is_named(name, content, match, simulated, tmp_path):
    out = write_meds(simulated[:10], tmp_path / "meds")
    if isinstance(content, str):
        (out / name).write_text(content)
    else:
        pq.write_table(content, out / name)
    assert one_line_error(out, match).startswith(f"{out / name}: ")


# --------------------------------------------------------------------------- prepare from a MEDS folder


def as_read(ds) -> list[dict]:
    """A prepared split as patient dicts (null procedures / medications left out, as the readers
    give them), ages (float32 in Parquet) back to their 0.01 year."""
    return [{**p, "age": round(p["age"], 2)} for p in dataset_to_patients(ds)]


def test_prepare_reads_a_meds_folder_and_keeps_its_splits(simulated, tmp_path, capsys):
    ids = [p["subject_id"] for p in simulated]
    split_of = {i: (meds.train_split, meds.tuning_split, meds.held_out_split)[k % 3] for k, i in enumerate(ids)}
    folder = write_meds(simulated, tmp_path / "meds", splits=split_of, subjects_per_shard=64)
    assert folder_format(folder) == "meds"
    out = tmp_path / "prepared"
    assert cli.main(["prepare", "--meds-dir", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"MEDS folder {folder} (ICD-9-CM; split: meds)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["format"], summary["code_system"], summary["split_source"]) == ("meds", "icd9cm", "meds")
    wanted = {"train": meds.train_split, "validation": meds.tuning_split, "test": meds.held_out_split}
    prepared = load_prepared(out)
    for name, meds_split in wanted.items():
        assert_same(as_read(prepared[name]), [p for p in simulated if split_of[p["subject_id"]] == meds_split])
    # Every data and metadata file is fingerprinted: an edited shard makes the output stale.
    assert set(summary["input_files"]) == {f.relative_to(folder).as_posix() for f in data_files(folder)} | {
        "metadata/codes.parquet", "metadata/dataset.json", "metadata/subject_splits.parquet"}
    assert stale_reasons(out, folder) == []
    shard = data_files(folder)[0]
    pq.write_table(pq.read_table(shard).slice(1), shard)
    assert any(shard.name in r and "content" in r for r in stale_reasons(out, folder))


def test_prepare_splits_a_meds_folder_by_hash_when_its_splits_do_not_cover_it(simulated, tmp_path):
    folder = write_meds(simulated, tmp_path / "meds")  # every subject in "train": kept as train, no validation
    (folder / meds.subject_splits_filepath).unlink()
    summary = prepare(folder, tmp_path / "out", seed=1)
    assert summary["split_source"] == "hash" and summary["splits"] == {"train": 160, "validation": 20, "test": 20}
    prepared = load_prepared(tmp_path / "out")
    assert_same(by_id([p for name in prepared for p in as_read(prepared[name])]), simulated)


def test_prepare_a_mixed_meds_folder_needs_a_code_system(tmp_path):
    folder = write_meds(ICD10_PATIENTS, tmp_path / "meds", code_system="icd10cm")
    extra = meds_table([(99, None, "GENDER//M"), (99, "2000-01-01 00:00", "MEDS_BIRTH"),
                        (99, "2050-01-01 00:00", "HOSPITAL_ADMISSION//X"),
                        (99, "2050-01-02 00:00", "DIAGNOSIS//ICD//9//4019"),
                        (99, "2050-01-02 00:00", "HOSPITAL_DISCHARGE//X")])
    pq.write_table(extra, folder / meds.data_subdirectory / "extra.parquet")
    with pytest.raises(MedsError, match="both ICD-9"):
        prepare(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = prepare(folder, tmp_path / "out", code_system="icd10cm", val_frac=0.0, test_frac=0.0)
    assert (summary["code_system"], summary["patients"], summary["quirks"]["other_system_diagnoses"]) == (
        "icd10cm", 3, 1)
    assert stale_reasons(tmp_path / "out", folder, val_frac=0.0, test_frac=0.0, code_system="icd10cm") == []
    assert stale_reasons(tmp_path / "out", folder, val_frac=0.0, test_frac=0.0, code_system="icd9cm") == [
        "code_system was 'icd10cm', now 'icd9cm'"]
