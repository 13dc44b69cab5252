"""Issue 17's data layer: the time fields (stay_days, gap_days, hospital_death, death_days) read from
MIMIC-III, MIMIC-IV and MEDS folders, their quirks, and the writers' round trips.

The demo figures are computed here from the demo tables with plain pandas (`demo_expected`),
never with the reader's helpers; the demo is read in place and only rewritten into tmp_path.
The hand-built folders hold one of each quirk, one patient each.
"""

from __future__ import annotations

import json

import datasets
import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.table import InMemoryTable

from promptehr_hf.datasets_scripts.cohort_io import (
    dataset_to_patients,
    patients_to_dataset,
    write_mimic3_csvs,
    write_mimic4_csvs,
    write_parquet,
)
from promptehr_hf.datasets_scripts.meds_io import read_meds, write_meds
from promptehr_hf.datasets_scripts.mimic3 import TIME_QUIRKS, read_mimic3
from promptehr_hf.datasets_scripts.mimic4 import read_mimic4
from promptehr_hf.datasets_scripts.prepare import format_summary, load_prepared, prepare
from promptehr_hf.datasets_scripts.schema import NO_TIMES, PATIENT_FEATURES, TIME_FIELDS, float32_times, with_times

DAY = pd.Timedelta(days=1)
TIMES = ("stay_days", "gap_days", "hospital_death", "death_days")


def f32(x: float) -> float:
    return float(np.float32(x))


def times_of(patients: list[dict]) -> list[dict]:
    return [{"subject_id": p["subject_id"], **{k: p[k] for k in TIMES}} for p in patients]


def without_times(patients: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k not in TIME_FIELDS} for p in patients]


# --------------------------------------------------------------------------- the demo


def demo_expected(demo_dir) -> dict:
    """The demo's times, deaths and time quirks by the documented rules, from its tables alone."""
    adm = pd.read_csv(demo_dir / "ADMISSIONS.csv.gz", parse_dates=["admittime", "dischtime", "deathtime"])
    pat = pd.read_csv(demo_dir / "PATIENTS.csv.gz", parse_dates=["dob", "dod"]).set_index("subject_id")
    diag = pd.read_csv(demo_dir / "DIAGNOSES_ICD.csv.gz", dtype={"icd9_code": str})
    coded = adm["hadm_id"].isin(diag["hadm_id"][diag["icd9_code"].notna()])
    kept = adm[coded].sort_values(["subject_id", "admittime", "hadm_id"])
    by = kept.groupby("subject_id")
    stay = (kept["dischtime"] - kept["admittime"]) / DAY
    gap = ((kept["admittime"] - by["dischtime"].shift()) / DAY).fillna(0.0)
    last = by.tail(1).set_index("subject_id")
    died = (adm["hospital_expire_flag"] == 1) | adm["deathtime"].notna()
    hospital = (last["hospital_expire_flag"] == 1) | last["deathtime"].notna()
    dod = pat["dod"].reindex(last.index)
    outside_days = (dod.dt.normalize() - last["dischtime"].dt.normalize()) / DAY
    patients = {}
    for s in last.index:
        rows = kept["subject_id"] == s
        patients[s] = {"subject_id": int(s), "stay_days": [f32(x) for x in stay[rows]],
                       "gap_days": [f32(x) for x in gap[rows]], "hospital_death": bool(hospital[s]),
                       "death_days": None if hospital[s] or pd.isna(dod[s]) else f32(max(outside_days[s], 0))}
    last_hadm = set(last["hadm_id"])
    hours = (adm["deathtime"] - adm["dischtime"]) / pd.Timedelta(hours=1)
    quirks = {
        "missing_dischtimes": int(kept["dischtime"].isna().sum()),
        "inverted_stays": int((kept["dischtime"] < kept["admittime"]).sum()),
        "overlapping_stays": int((gap < 0).sum()),
        "expire_flag_without_deathtime": int(((adm["hospital_expire_flag"] == 1) & adm["deathtime"].isna()).sum()),
        "deathtime_without_expire_flag": int(((adm["hospital_expire_flag"] != 1) & adm["deathtime"].notna()).sum()),
        "deathtime_before_discharge": int((hours < -6).sum()),
        "deathtime_after_discharge": int((hours > 6).sum()),
        "hospital_deaths_before_last_visit": int((died & coded & ~adm["hadm_id"].isin(last_hadm)).sum()),
        "deaths_at_dropped_admissions": int((died & ~coded & adm["subject_id"].isin(last.index)).sum()),
        "dod_before_last_discharge": int((~hospital & (outside_days < 0)).sum()),
        "dod_not_at_hospital_death": int((hospital & (dod.dt.normalize() != last["deathtime"].fillna(
            last["dischtime"]).dt.normalize())).sum()),
        "expire_flag_without_dod": int(((pat["expire_flag"] == 1) & pat["dod"].isna()).sum()),
        "dod_without_expire_flag": int(((pat["expire_flag"] == 0) & pat["dod"].notna()).sum()),
    }
    return {"patients": patients, "quirks": quirks, "admissions": int(coded.sum()),
            "hospital_deaths": int(hospital.sum()), "with_dod": int(pat["dod"].notna().sum()),
            "outside": int((~hospital & dod.notna()).sum()), "long_gap": gap.max(),
            "long_gap_subject": int(kept["subject_id"][gap.idxmax()])}


def test_demo_times_and_deaths_match_the_tables(demo_dir):
    patients, s = read_mimic3(demo_dir)
    e = demo_expected(demo_dir)
    # Exact figures (issue 17): 129 admissions kept, 40 deaths in hospital, 100 patients with a dod,
    # 60 deaths after discharge, and one deathtime a day after its dischtime.
    assert (e["admissions"], e["hospital_deaths"], e["with_dod"], e["outside"]) == (129, 40, 100, 60)
    assert (s["admissions"], s["hospital_deaths"], s["deaths_after_discharge"]) == (129, 40, 60)
    assert s["times"] is True and s["time_columns_missing"] == {}
    assert {k: s["quirks"][k] for k in TIME_QUIRKS} == e["quirks"]
    assert e["quirks"] == {**dict.fromkeys(TIME_QUIRKS, 0), "deathtime_after_discharge": 1}
    assert "ADMISSIONS.csv.gz: 1 admissions with a deathtime over 6 h after the dischtime" in "\n".join(s["messages"])
    assert times_of(patients) == [e["patients"][p["subject_id"]] for p in patients]
    # A few checked to the day: the demo's longest gap (a readmission decades later), and stays.
    p = next(p for p in patients if p["subject_id"] == e["long_gap_subject"])
    assert round(max(p["gap_days"])) == round(e["long_gap"]) and e["long_gap"] > 365
    assert all(len(p["stay_days"]) == len(p["gap_days"]) == len(p["visits"]) for p in patients)
    assert all(p["gap_days"][0] == 0.0 for p in patients)
    assert all(x >= 0 for p in patients for x in p["stay_days"] + p["gap_days"])
    assert all(p["death_days"] is None for p in patients if p["hospital_death"])
    assert all(p["death_days"] == int(p["death_days"]) for p in patients if p["death_days"] is not None)


def test_demo_round_trips_keep_the_times(demo_dir, tmp_path):
    patients, _ = read_mimic3(demo_dir)
    back3, s3 = read_mimic3(write_mimic3_csvs(patients, tmp_path / "m3", seed=11)["PATIENTS"].parent)
    assert back3 == patients  # times to the second, death_days in whole days: exact
    assert not any(s3["quirks"][k] for k in TIME_QUIRKS)  # the writer's tables are consistent
    write_mimic4_csvs(patients, tmp_path / "m4", seed=12, code_system="icd9cm")
    back4, s4 = read_mimic4(tmp_path / "m4")
    by_id = {p["subject_id"]: p for p in back4}
    assert len(back4) == len(patients)  # every visit keeps a mapped code, so the visits line up
    assert times_of([by_id[p["subject_id"]] for p in patients]) == times_of(patients)
    assert not any(v for k, v in s4["quirks"].items() if k in TIME_QUIRKS)
    back_meds, sm = read_meds(write_meds(patients, tmp_path / "meds", seed=13))
    assert back_meds == patients
    assert (sm["hospital_deaths"], sm["deaths_after_discharge"]) == (40, 60)


# --------------------------------------------------------------------------- one of each quirk (MIMIC-III)


def quirk_tables() -> dict[str, pd.DataFrame]:
    """One patient per time quirk; every admission has code 4019, but subject 9's second (99999)."""
    E = ""
    # subject, admittime, dischtime, deathtime, hospital_expire_flag
    adm = [
        (1, "2150-01-01 08:00:00", E, E, 0),  # 1: no dischtime -> stay 0, gap from its admission
        (1, "2150-01-11 08:00:00", "2150-01-13 20:00:00", E, 0),
        (2, "2150-01-05 00:00:00", "2150-01-03 00:00:00", E, 0),  # 2: discharged before admitted
        (3, "2150-01-01 00:00:00", "2150-01-10 00:00:00", E, 0),  # 3: the second begins before the first ends
        (3, "2150-01-05 00:00:00", "2150-01-12 00:00:00", E, 0),
        (4, "2150-01-01 00:00:00", "2150-01-03 00:00:00", "2150-01-03 00:00:00", 1),  # 4: dies, then readmitted
        (4, "2150-02-01 00:00:00", "2150-02-04 06:00:00", E, 0),
        (5, "2150-01-01 00:00:00", "2150-01-04 12:00:00", E, 1),  # 5: flag without deathtime
        (6, "2150-01-01 00:00:00", "2150-01-02 00:00:00", "2150-01-02 00:00:00", 0),  # 6: deathtime, flag 0
        (7, "2150-01-01 00:00:00", "2150-01-05 22:00:00", "2150-01-05 12:00:00", 1),  # 7: death 10 h before
        (8, "2150-01-01 00:00:00", "2150-01-05 12:00:00", "2150-01-06 12:00:00", 1),  # 8: death 24 h after
        (9, "2150-01-01 00:00:00", "2150-01-03 00:00:00", E, 0),  # 9: dies at an admission with no valid code
        (9, "2150-03-01 00:00:00", "2150-03-02 06:00:00", "2150-03-02 06:00:00", 1),
        (10, "2150-01-01 00:00:00", "2150-01-08 10:00:00", E, 0),  # 10: dod days before the discharge
        (11, "2150-01-01 00:00:00", "2150-01-03 00:00:00", "2150-01-03 00:00:00", 1),  # 11: no dod
        (12, "2150-01-01 00:00:00", "2150-01-02 18:00:00", E, 0),  # 12: dod with expire_flag 0
        (13, "2150-01-01 00:00:00", "2150-01-02 00:00:00", E, 0),  # 13: alive
        (14, "2150-01-01 00:00:00", "2150-01-02 15:30:00", E, 0),  # 14: dies at home the day of discharge
    ]
    admissions = pd.DataFrame(adm, columns=["subject_id", "admittime", "dischtime", "deathtime",
                                            "hospital_expire_flag"])
    admissions.insert(1, "hadm_id", range(100, 100 + len(adm)))
    dod = {1: E, 2: E, 3: E, 4: "2150-02-07", 5: "2150-01-04", 6: "2150-01-02", 7: "2150-01-05", 8: "2150-01-06",
           9: "2150-03-02", 10: "2150-01-02", 11: E, 12: "2150-01-12", 13: E, 14: "2150-01-02"}
    expire = {s: int(bool(d)) for s, d in dod.items()} | {11: 1, 12: 0}
    patients = pd.DataFrame({"subject_id": list(dod), "gender": ["F", "M"] * 7, "dob": "2100-01-01 00:00:00",
                             "dod": [d and f"{d} 00:00:00" for d in dod.values()],
                             "expire_flag": [expire[s] for s in dod]})
    codes = ["99999" if (s, h) == (9, 112) else "4019" for s, h in zip(admissions["subject_id"], admissions["hadm_id"])]
    diagnoses = pd.DataFrame({"subject_id": admissions["subject_id"], "hadm_id": admissions["hadm_id"],
                              "seq_num": 1, "icd9_code": codes})
    return {"PATIENTS": patients, "ADMISSIONS": admissions, "DIAGNOSES_ICD": diagnoses}


def write_tables(folder, tables: dict[str, pd.DataFrame], upper: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        (df.rename(columns=str.upper) if upper else df).to_csv(folder / f"{name}.csv.gz", index=False)
    return folder


QUIRK_TIMES = {  # subject -> (stay_days, gap_days, hospital_death, death_days)
    1: ([0.0, f32(2.5)], [0.0, 10.0], False, None),
    2: ([0.0], [0.0], False, None),
    3: ([9.0, 7.0], [0.0, 0.0], False, None),
    4: ([2.0, f32(3.25)], [0.0, 29.0], False, 3.0),  # the first death ignored; dod 3 days after
    5: ([3.5], [0.0], True, None),
    6: ([1.0], [0.0], True, None),
    7: ([f32(4 + 22 / 24)], [0.0], True, None),
    8: ([4.5], [0.0], True, None),
    9: ([2.0], [0.0], False, 58.0),  # its death at the dropped admission, 58 d 6 h after: 58 days by the dates
    10: ([f32(7 + 10 / 24)], [0.0], False, 0.0),
    11: ([2.0], [0.0], True, None),
    12: ([1.75], [0.0], False, 10.0),
    13: ([1.0], [0.0], False, None),
    14: ([f32(1 + 15.5 / 24)], [0.0], False, 0.0),
}


def test_one_of_each_quirk(tmp_path):
    folder = write_tables(tmp_path / "mimic", quirk_tables())
    patients, s = read_mimic3(folder)
    assert {p["subject_id"]: tuple(p[k] for k in TIMES) for p in patients} == QUIRK_TIMES
    assert {k: s["quirks"][k] for k in TIME_QUIRKS} == dict.fromkeys(TIME_QUIRKS, 1)
    assert (s["quirks"]["invalid_codes"], s["quirks"]["admissions_without_valid_codes"]) == (1, 1)
    assert (s["hospital_deaths"], s["deaths_after_discharge"]) == (5, 5)
    text = "\n".join(s["messages"])
    for line in ("ADMISSIONS.csv.gz: 1 visits without a dischtime: stay set to 0",
                 "ADMISSIONS.csv.gz: 1 visits discharged before their admission: stay set to 0",
                 "ADMISSIONS.csv.gz: 1 visits admitted before the previous visit's discharge: gap set to 0",
                 "ADMISSIONS.csv.gz: 1 deaths in hospital at a visit that is not the patient's last were ignored",
                 "ADMISSIONS.csv.gz: 1 deaths in hospital at an admission dropped for having no code",
                 "PATIENTS.csv.gz: 1 patients whose dod is a day before their last discharge: death_days set to 0",
                 "PATIENTS.csv.gz: 1 patients with expire_flag 1 but no dod"):
        assert line in text, line

    # Written back, the same patients and no quirk: the writer's tables are consistent by construction.
    write_mimic3_csvs(patients, tmp_path / "back", seed=1)
    back, s2 = read_mimic3(tmp_path / "back")
    assert back == patients and not any(s2["quirks"][k] for k in TIME_QUIRKS)
    adm = pd.read_csv(tmp_path / "back" / "ADMISSIONS.csv", parse_dates=["ADMITTIME", "DISCHTIME", "DEATHTIME"])
    pat = pd.read_csv(tmp_path / "back" / "PATIENTS.csv", parse_dates=["DOD", "DOD_HOSP", "DOD_SSN"])
    adm = adm.sort_values(["SUBJECT_ID", "ADMITTIME"])
    assert (adm["DISCHTIME"] >= adm["ADMITTIME"]).all()
    assert (adm["ADMITTIME"] >= adm.groupby("SUBJECT_ID")["DISCHTIME"].shift().fillna(adm["ADMITTIME"])).all()
    last = adm.groupby("SUBJECT_ID").tail(1)
    dead_here = adm["HOSPITAL_EXPIRE_FLAG"] == 1
    assert adm["DEATHTIME"].notna().equals(dead_here)
    assert set(adm["HADM_ID"][dead_here]) <= set(last["HADM_ID"])  # no admission after a death in hospital
    assert (adm["DEATHTIME"][dead_here] == adm["DISCHTIME"][dead_here]).all()
    assert set(adm["SUBJECT_ID"][dead_here]) == {p["subject_id"] for p in patients if p["hospital_death"]}
    assert pat["EXPIRE_FLAG"].eq(pat["DOD"].notna().astype(int)).all()
    assert set(pat["SUBJECT_ID"][pat["DOD_HOSP"].notna()]) == set(adm["SUBJECT_ID"][dead_here])
    assert pat["DOD_SSN"].notna().sum() == s["deaths_after_discharge"]
    assert (pat["DOD"].dropna().dt.normalize() == pat["DOD"].dropna()).all()  # a date


def test_bad_time_cells_are_one_line_errors(tmp_path):
    t = quirk_tables()
    t["ADMISSIONS"].loc[3, "dischtime"] = "soon"
    with pytest.raises(ValueError, match=r"ADMISSIONS.csv.gz: column dischtime .* data row 4: 'soon'"):
        read_mimic3(write_tables(tmp_path / "a", t, upper=False))
    t = quirk_tables()
    t["ADMISSIONS"]["hospital_expire_flag"] = t["ADMISSIONS"]["hospital_expire_flag"].replace(1, 2)
    with pytest.raises(ValueError, match=r"column hospital_expire_flag .* non-0/1"):
        read_mimic3(write_tables(tmp_path / "b", t, upper=False))


def test_without_death_columns_deaths_are_unknown(tmp_path):
    t = quirk_tables()
    t["ADMISSIONS"] = t["ADMISSIONS"].drop(columns=["deathtime", "hospital_expire_flag"])
    t["PATIENTS"] = t["PATIENTS"].drop(columns=["dod", "expire_flag"])
    patients, s = read_mimic3(write_tables(tmp_path / "m", t))
    assert s["times"] is True and s["time_columns_missing"] == {
        "ADMISSIONS": ["deathtime", "hospital_expire_flag"], "PATIENTS": ["dod", "expire_flag"]}
    assert not any(p["hospital_death"] for p in patients) and all(p["death_days"] is None for p in patients)
    assert next(p for p in patients if p["subject_id"] == 4)["stay_days"] == [2.0, f32(3.25)]
    assert "ADMISSIONS.csv.gz: no deathtime, hospital_expire_flag columns" in "\n".join(s["messages"])


# --------------------------------------------------------------------------- MIMIC-IV


def test_mimic4_reads_deaths_and_dod_dates(tmp_path):
    t = quirk_tables()
    adm = t["ADMISSIONS"].copy()
    pat = pd.DataFrame({"subject_id": t["PATIENTS"]["subject_id"], "gender": t["PATIENTS"]["gender"],
                        "anchor_age": 50, "anchor_year": 2150, "anchor_year_group": "2008 - 2010",
                        "dod": t["PATIENTS"]["dod"].str[:10]})  # MIMIC-IV: a date
    diag = t["DIAGNOSES_ICD"].rename(columns={"icd9_code": "icd_code"}).assign(
        icd_code=lambda d: d["icd_code"].replace({"4019": "I10", "99999": "Z99999"}), icd_version=10)
    hosp = tmp_path / "m4" / "hosp"
    hosp.mkdir(parents=True)
    for name, df in (("patients", pat), ("admissions", adm), ("diagnoses_icd", diag)):
        df.to_csv(hosp / f"{name}.csv.gz", index=False)
    patients, s = read_mimic4(tmp_path / "m4")
    assert {p["subject_id"]: tuple(p[k] for k in TIMES) for p in patients} == QUIRK_TIMES
    mimic4_quirks = [k for k in TIME_QUIRKS if k not in ("expire_flag_without_dod", "dod_without_expire_flag")]
    assert len(mimic4_quirks) == 11
    assert {k: s["quirks"][k] for k in mimic4_quirks} == dict.fromkeys(mimic4_quirks, 1)
    assert "expire_flag_without_dod" not in s["quirks"]  # MIMIC-IV has no expire_flag
    # Its writer's folder reads back the same times (ages: whole years).
    write_mimic4_csvs(patients, tmp_path / "w4", seed=3)
    back, s2 = read_mimic4(tmp_path / "w4")
    assert back == patients and not any(s2["quirks"][k] for k in mimic4_quirks)
    written = pd.read_csv(tmp_path / "w4" / "hosp" / "patients.csv.gz", dtype=str, keep_default_na=False)
    assert written["dod"].str.fullmatch(r"(\d{4}-\d\d-\d\d)?").all()


# --------------------------------------------------------------------------- MEDS


def meds_folder(tmp_path, rows: list[tuple]):
    table = pa.table({
        "subject_id": pa.array([r[0] for r in rows], pa.int64()),
        "time": pa.array([r[1] and pd.Timestamp(r[1]).to_pydatetime() for r in rows], pa.timestamp("us")),
        "code": pa.array([r[2] for r in rows], pa.string()),
        "numeric_value": pa.nulls(len(rows), pa.float32()),
    })
    path = tmp_path / "meds" / meds.data_subdirectory / "0.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    return tmp_path / "meds"


def person(s: int, admit: str, disch: str, *extra: tuple) -> list[tuple]:
    return [(s, None, "GENDER//F"), (s, "2000-01-01", meds.birth_code), (s, admit, "HOSPITAL_ADMISSION//X"),
            (s, disch, "DIAGNOSIS//ICD//9//4019"), (s, disch, "HOSPITAL_DISCHARGE//X"), *extra]


def test_meds_deaths(tmp_path):
    folder = meds_folder(tmp_path, [
        *person(1, "2050-01-01 00:00", "2050-01-03 12:00", (1, "2050-01-03 12:00", meds.death_code)),  # in
        *person(2, "2050-01-01 00:00", "2050-01-03 12:00", (2, "2050-01-02 00:00", meds.death_code)),  # in, earlier
        *person(3, "2050-01-01 00:00", "2050-01-03 12:00", (3, "2050-01-13 18:00", meds.death_code),
                (3, "2050-02-01 00:00", meds.death_code)),  # outside, twice
        *person(4, "2050-01-01 00:00", "2050-01-03 12:00", (4, "2049-12-01 00:00", meds.death_code)),  # before
        *person(5, "2050-01-01 00:00", "2050-01-03 12:00", (5, None, meds.death_code)),  # no time
        *person(6, "2050-01-01 00:00", "2050-01-03 12:00"),
    ])
    patients, s = read_meds(folder)
    got = {p["subject_id"]: (p["stay_days"], p["hospital_death"], p["death_days"]) for p in patients}
    assert got == {1: ([2.5], True, None), 2: ([2.5], True, None), 3: ([2.5], False, 10.25),
                   4: ([2.5], False, 0.0), 5: ([2.5], False, None), 6: ([2.5], False, None)}
    q = s["quirks"]
    assert (q["several_deaths"], q["deaths_before_last_visit"], q["untimed_events"]) == (1, 1, 1)
    assert meds.death_code not in s["ignored_codes"]
    assert (s["hospital_deaths"], s["deaths_after_discharge"]) == (2, 2)


# --------------------------------------------------------------------------- given times through every layout


GIVEN = [  # own times (not whole seconds), deaths of each kind
    {"subject_id": 1, "age": 40.0, "sex": "F", "visits": [["4019"], ["25000"], ["486"]],
     "stay_days": [2.3, 0.0, 14.123456], "gap_days": [0.0, 0.5, 0.0], "hospital_death": True, "death_days": None},
    {"subject_id": 2, "age": 70.5, "sex": "M", "visits": [["41401"]], "stay_days": [200.0001], "gap_days": [0.0],
     "hospital_death": False, "death_days": 12.7},
    {"subject_id": 3, "age": 90.0, "sex": "F", "visits": [["4280"], ["42731"]], "stay_days": [1.0, 3.0],
     "gap_days": [0.0, 4000.5], "hospital_death": False, "death_days": 0.0},
    {"subject_id": 4, "age": 0.0, "sex": "M", "visits": [["V3000"]], "stay_days": [3.0], "gap_days": [0.0],
     "hospital_death": False, "death_days": None},
]


def to_second(days: float) -> float:
    return f32(round(days * 86400) / 86400)


def test_given_times_round_trip_to_what_each_layout_holds(tmp_path):
    want = [float32_times({**p, "stay_days": [to_second(x) for x in p["stay_days"]],
                           "gap_days": [to_second(x) for x in p["gap_days"]],
                           "death_days": None if p["death_days"] is None else to_second(p["death_days"])})
            for p in GIVEN]
    # MEDS: to the second, but a death outside hospital at the discharge is written a second after it.
    back, s = read_meds(write_meds(GIVEN, tmp_path / "meds", seed=2))
    assert times_of(back) == times_of([{**w, "death_days": f32(1 / 86400)} if w["subject_id"] == 3 else w
                                       for w in want])
    assert not any(s["quirks"].values()) or set(k for k, v in s["quirks"].items() if v) == {"ages_capped"}
    # MIMIC-III: to the second; death_days as whole days between the dates (so depends on the hour).
    write_mimic3_csvs(GIVEN, tmp_path / "m3", seed=2)
    back3, s3 = read_mimic3(tmp_path / "m3")
    assert [{k: p[k] for k in ("stay_days", "gap_days", "hospital_death")} for p in back3] == [
        {k: w[k] for k in ("stay_days", "gap_days", "hospital_death")} for w in want]
    assert back3[0]["death_days"] is None and back3[2]["death_days"] == 0.0 and back3[3]["death_days"] is None
    assert back3[1]["death_days"] in (12.0, 13.0)
    assert not any(s3["quirks"][k] for k in TIME_QUIRKS)
    # Read back once, the times are whole seconds and whole days: the next round trip is exact.
    assert read_mimic3(write_mimic3_csvs(back3, tmp_path / "again", seed=9)["PATIENTS"].parent)[0] == back3
    again = read_meds(write_meds(back3, tmp_path / "again_meds", seed=9))[0]
    assert again[:2] + again[3:] == back3[:2] + back3[3:]
    assert again[2] == {**back3[2], "death_days": f32(1 / 86400)}  # the death at the discharge, a second later


def test_meds_cannot_tell_an_empty_stay_at_the_previous_discharge(tmp_path):
    """MEDS has times only: a visit of no length admitted at the previous discharge has all its
    events at that discharge's time, and its codes join the previous visit (documented, counted)."""
    p = {"subject_id": 1, "age": 50.0, "sex": "F", "visits": [["4019"], ["486"]], "stay_days": [2.0, 0.0],
         "gap_days": [0.0, 0.0], "hospital_death": False, "death_days": None}
    back, s = read_meds(write_meds([p], tmp_path / "meds"))
    assert back[0]["visits"] == [["4019", "486"]] and s["quirks"]["admissions_without_diagnoses"] == 1
    back3, _ = read_mimic3(write_mimic3_csvs([p], tmp_path / "m3")["PATIENTS"].parent)  # hadm_ids: kept apart
    assert back3 == [p]


def test_the_writer_refuses_inconsistent_times(tmp_path):
    base = {"subject_id": 1, "age": 50.0, "sex": "F", "visits": [["4019"], ["486"]]}
    cases = [
        ({"stay_days": [1.0, 2.0]}, "only one of stay_days and gap_days"),
        ({"stay_days": [1.0], "gap_days": [0.0]}, "has 1 stay_days for 2 visits"),
        ({"stay_days": [1.0, -2.0], "gap_days": [0.0, 1.0]}, "stay_days value that is negative"),
        ({"stay_days": [1.0, 2.0], "gap_days": [0.0, float("nan")]}, "gap_days value that is negative, NaN"),
        ({"hospital_death": True, "death_days": 3.0}, "both hospital_death and death_days"),
        ({"death_days": -1.0}, "death_days that is negative"),
    ]
    for extra, match in cases:
        with pytest.raises(ValueError, match=match):
            write_mimic3_csvs([{**base, **extra}], tmp_path / "x")
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("*.csv"))


# --------------------------------------------------------------------------- cohorts without times


def test_a_cohort_without_times_round_trips_as_before(tmp_path):
    plain = [{"subject_id": 1, "age": 33.5, "sex": "F", "visits": [["650"], ["V270", "64891"]]},
             {"subject_id": 2, "age": 90.0, "sex": "M", "visits": [["4019"]]}]
    # Dicts without the keys load, as null.
    ds = patients_to_dataset(plain)
    assert ds.features == PATIENT_FEATURES
    assert dataset_to_patients(ds) == [{**p, **NO_TIMES} for p in plain] == [with_times(p) for p in plain]
    # The writers draw stays and gaps as before: the same dates as a writer without the time fields.
    write_mimic3_csvs(plain, tmp_path / "a", seed=4)
    write_mimic3_csvs([{**p, **NO_TIMES} for p in plain], tmp_path / "b", seed=4)
    for name in ("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD"):
        assert (tmp_path / "a" / f"{name}.csv").read_bytes() == (tmp_path / "b" / f"{name}.csv").read_bytes()
    back, s = read_mimic3(tmp_path / "a")
    assert without_times(back) == without_times(plain)
    assert s["hospital_deaths"] == s["deaths_after_discharge"] == 0
    adm = pd.read_csv(tmp_path / "a" / "ADMISSIONS.csv", parse_dates=["ADMITTIME"])
    assert (adm["ADMITTIME"].dt.second == 0).all()  # drawn in whole minutes, as before
    back_meds, _ = read_meds(write_meds(plain, tmp_path / "meds", seed=4))
    assert without_times(back_meds) == without_times(plain)
    assert [p["stay_days"] for p in back_meds] == [p["stay_days"] for p in back]  # one shared timeline


def test_old_parquet_and_prepared_folders_read_with_null_times(tmp_path):
    # A prepare output written before the time fields existed: four columns only.
    folder = write_tables(tmp_path / "m", quirk_tables())
    prepare(folder, tmp_path / "out", val_frac=0.0, test_frac=0.0)
    train = pq.read_table(tmp_path / "out" / "train.parquet")
    assert set(TIME_FIELDS) <= set(train.column_names)
    pq.write_table(train.select(["subject_id", "age", "sex", "visits"]), tmp_path / "out" / "train.parquet")
    ds = load_prepared(tmp_path / "out")
    assert ds["train"].features == PATIENT_FEATURES
    rows = dataset_to_patients(ds["train"])
    assert len(rows) == 14 and all(all(p[k] is None for k in TIME_FIELDS) for p in rows)
    # write_parquet keeps the time fields.
    patients, _ = read_mimic3(folder)
    path = write_parquet(patients, tmp_path / "p.parquet")
    assert times_of(dataset_to_patients(load_parquet(path))) == times_of(patients)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["hospital_deaths"] == 5 and summary["quirks"]["overlapping_stays"] == 1
    text = format_summary(summary)
    assert "hospital deaths" in text and "quirk: overlapping stays" in text


def load_parquet(path) -> datasets.Dataset:
    return datasets.Dataset(InMemoryTable(pq.read_table(path)))


def test_a_history_of_decades_is_written_before_2250(tmp_path):
    """A newborn readmitted 70 and 85 years later would run past the last date pandas parses
    (2262) from a first admission in 2200: the patient starts earlier, and reads back the same."""
    long = [{"subject_id": 1, "age": 0.0, "sex": "F", "visits": [["V3000"], ["4019"], ["4280"]],
             "stay_days": [3.0, 5.0, 7.0], "gap_days": [0.0, 70 * 365.25, 15 * 365.25],
             "hospital_death": False, "death_days": 400.0}] + [
        {"subject_id": k, "age": 40.0, "sex": "M", "visits": [["4019"]], "stay_days": [2.0], "gap_days": [0.0],
         "hospital_death": False, "death_days": None} for k in range(2, 200)]
    for seed in range(8):  # first admissions fall in 2100-2200: most seeds put this one past 2165
        write_mimic3_csvs(long, tmp_path / f"m3_{seed}", seed=seed)
        admissions = pd.read_csv(tmp_path / f"m3_{seed}" / "ADMISSIONS.csv", parse_dates=["ADMITTIME", "DISCHTIME"])
        assert admissions["DISCHTIME"].max() < pd.Timestamp("2250-01-01")
    back, summary = read_mimic3(tmp_path / "m3_7")
    assert back[0]["gap_days"] == [0.0, pytest.approx(70 * 365.25), pytest.approx(15 * 365.25)]
    assert back[0]["death_days"] in (400.0, 401.0)
    assert not any(summary["quirks"][k] for k in TIME_QUIRKS)
