"""MIMIC-IV reader (ICD-10-CM cohort, ICD-9 rows mapped or dropped), its writer, and `prepare` on MIMIC-IV.

The main fixture is built at run time, into tmp_path, from the real MIMIC-III demo
(`../shared/mimic3demo`, or MIMIC3_DEMO_DIR): MIMIC-IV columns and anchors, admissions after
CUT written in ICD-10-CM (their codes mapped with `icd10.from_icd9`), the others in ICD-9. The
expected figures are computed here from the demo tables with plain pandas and loops, never with
the reader's helpers. No demo row is ever written into the repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from promptehr_hf import cli
from promptehr_hf.datasets_scripts import icd10
from promptehr_hf.datasets_scripts.cohort import folder_format, load_cohort
from promptehr_hf.datasets_scripts.cohort_io import write_mimic4_csvs
from promptehr_hf.datasets_scripts.mimic3 import Mimic3Error, file_fingerprints, find_tables, read_mimic3
from promptehr_hf.datasets_scripts.mimic4 import read_mimic4
from promptehr_hf.datasets_scripts.prepare import format_summary, prepare, stale_reasons

# Admissions from here on are written in ICD-10-CM: about half of the demo's, and between the two
# admissions of subject 10059 (the demo shifts dates per patient, so few patients straddle a date).
CUT = pd.Timestamp("2150-08-15")
TABLES = ("patients", "admissions", "diagnoses_icd")


# --------------------------------------------------------------------------- the demo as MIMIC-IV


def demo_tables(demo_dir: Path) -> dict[str, pd.DataFrame]:
    """The three demo tables, every cell as text (lower-case headers, as in the demo)."""
    return {name.lower(): pd.read_csv(demo_dir / f"{name}.csv.gz", dtype=str, keep_default_na=False)
            for name in ("PATIENTS", "ADMISSIONS", "DIAGNOSES_ICD")}


def anchors(demo: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per subject: anchor_year = year of the last admission, anchor_age = whole years from DOB to
    it by the calendar (91 over 89, MIMIC-IV's way). The last admission, not the first, so that
    the reader's year offset matters for patients with several."""
    adm = demo["admissions"].assign(t=pd.to_datetime(demo["admissions"]["admittime"]))
    last = adm.groupby("subject_id")["t"].max()
    dob = pd.to_datetime(demo["patients"].set_index("subject_id")["dob"]).reindex(last.index)
    before_birthday = (last.dt.month < dob.dt.month) | ((last.dt.month == dob.dt.month) & (last.dt.day < dob.dt.day))
    age = last.dt.year - dob.dt.year - before_birthday.astype(int)
    return pd.DataFrame({"anchor_age": np.where(age > 89, 91, age), "anchor_year": last.dt.year})


def demo_as_mimic4(demo_dir: Path, folder: Path, *, hosp: bool = True, gz: bool = True) -> Path:
    """Write the demo as a MIMIC-IV folder (see the module docstring); returns `folder`."""
    demo = demo_tables(demo_dir)
    anc = anchors(demo)
    pat = demo["patients"]
    patients = pd.DataFrame({
        "subject_id": pat["subject_id"], "gender": pat["gender"],
        "anchor_age": anc["anchor_age"].reindex(pat["subject_id"]).to_numpy(),
        "anchor_year": anc["anchor_year"].reindex(pat["subject_id"]).to_numpy(),
        "anchor_year_group": "2008 - 2010", "dod": pat["dod"].str[:10],
    })
    adm = demo["admissions"]
    admissions = adm[["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                      "hospital_expire_flag"]]
    icd10_adm = set(adm["hadm_id"][pd.to_datetime(adm["admittime"]) >= CUT])
    rows = []
    for hadm, d in demo["diagnoses_icd"].groupby("hadm_id", sort=False):
        d = d.sort_values("seq_num", key=lambda s: s.astype(int))
        if hadm in icd10_adm:
            codes = [c for code in d["icd9_code"] for c in icd10.from_icd9(code)]
            rows += [(d["subject_id"].iloc[0], hadm, i, c, 10) for i, c in enumerate(codes, 1)]
        else:
            rows += [(s, hadm, int(q), c, 9) for s, q, c in zip(d["subject_id"], d["seq_num"], d["icd9_code"])]
    diagnoses = pd.DataFrame(rows, columns=["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"])
    out = folder / "hosp" if hosp else folder
    out.mkdir(parents=True, exist_ok=True)
    for name, df in zip(TABLES, (patients, admissions, diagnoses)):
        df.to_csv(out / f"{name}.csv{'.gz' if gz else ''}", index=False)
    return folder


def expected(demo_dir: Path, icd9_rows: str) -> dict:
    """What read_mimic4 must give on demo_as_mimic4's folder, from the demo tables alone."""
    demo = demo_tables(demo_dir)
    anc = anchors(demo)
    adm = demo["admissions"].assign(t=pd.to_datetime(demo["admissions"]["admittime"]))
    adm = adm.sort_values(["t", "hadm_id"])
    codes9 = {h: list(d.sort_values("seq_num", key=lambda s: s.astype(int))["icd9_code"])
              for h, d in demo["diagnoses_icd"].groupby("hadm_id")}
    e = {"rows9": 0, "rows10": 0, "rows_mapped": 0, "from_mapping": 0, "unmapped": 0, "dup10": 0, "dup_mapping": 0,
         "adm9": 0, "adm10": 0, "adm_no_rows": 0, "adm_no_codes": 0, "capped": 0, "mapped9": set(), "unmapped9": set()}
    visits: dict[str, list] = {}
    died_after: dict[str, pd.Timestamp] = {}  # a death at an admission dropped after the last visit
    dropped_deaths: list[str] = []  # subjects of deaths at dropped admissions
    for s, h, t, out, death, flag in zip(adm["subject_id"], adm["hadm_id"], adm["t"], adm["dischtime"],
                                         adm["deathtime"], adm["hospital_expire_flag"]):
        a = anc.loc[s]
        age = a["anchor_age"] + t.year - a["anchor_year"]
        capped = a["anchor_age"] == 91 or age > 90
        e["capped"] += int(capped)
        gem = [icd10.from_icd9(c) for c in codes9[h]]
        if t >= CUT:  # written in ICD-10: the mapped codes, duplicates included
            e["adm10"] += 1
            written = [c for g in gem for c in g]
            e["rows10"] += len(written)
            e["dup10"] += len(written) - len(set(written))
            e["adm_no_rows"] += not written
        else:
            e["adm9"] += 1
            e["rows9"] += len(gem)
            if icd9_rows == "drop":
                continue
            e["rows_mapped"] += sum(1 for g in gem if g)
            e["from_mapping"] += sum(len(g) for g in gem)
            e["unmapped"] += sum(1 for g in gem if not g)
            e["mapped9"] |= {c for c, g in zip(codes9[h], gem) if g}
            e["unmapped9"] |= {c for c, g in zip(codes9[h], gem) if not g}
            written = [c for g in gem for c in g]
            e["dup_mapping"] += len(written) - len(set(written))
            e["adm_no_codes"] += not written
        visit = list(dict.fromkeys(written))
        died = flag == "1" or death != ""
        if visit:
            visits.setdefault(s, []).append((90.0 if capped else float(max(age, 0)), visit, t,
                                             pd.Timestamp(out), died))
            died_after.pop(s, None)
        elif died:
            dropped_deaths.append(s)
            died_after.setdefault(s, pd.Timestamp(death or out))
    e["dropped_deaths"] = sum(s in visits for s in dropped_deaths)
    sexes = demo["patients"].set_index("subject_id")["gender"]
    dod = demo["patients"].set_index("subject_id")["dod"]
    e["patients"] = []
    for s, v in sorted(visits.items(), key=lambda kv: int(kv[0])):
        day = pd.Timedelta(days=1)
        stays = [float(np.float32((out - t) / day)) for _, _, t, out, _ in v]
        gaps = [0.0] + [float(np.float32((t - prev[3]) / day)) for prev, (_, _, t, _, _) in zip(v, v[1:])]
        last_out, hospital = v[-1][3], v[-1][4]
        if hospital:
            death_days = None
        elif s in died_after:
            death_days = float((died_after[s].normalize() - last_out.normalize()).days)  # whole days, as a dod
        elif dod[s]:
            death_days = float((pd.Timestamp(dod[s]).normalize() - last_out.normalize()).days)
        else:
            death_days = None
        e["patients"].append({"subject_id": int(s), "age": v[0][0], "sex": sexes[s], "visits": [x[1] for x in v],
                              "stay_days": stays, "gap_days": gaps, "hospital_death": hospital,
                              "death_days": death_days})
    e["n_subjects"] = len(demo["patients"])
    return e


@pytest.fixture(scope="module")
def demo4(demo_dir, tmp_path_factory) -> Path:
    return demo_as_mimic4(demo_dir, tmp_path_factory.mktemp("mimic4") / "demo4")


def test_demo_as_mimic4_mapped(demo_dir, demo4):
    patients, s = read_mimic4(demo4)
    e = expected(demo_dir, "map")
    # The cut splits the 129 demo admissions and their 1,761 rows (GEM-independent figures).
    assert (e["adm9"], e["adm10"], e["rows9"]) == (64, 65, 846)
    assert s["format"] == "mimic4" and s["code_system"] == "icd10cm" and s["icd9_rows"] == "map"
    assert s["rows_read"] == {"PATIENTS": 100, "ADMISSIONS": 129, "DIAGNOSES_ICD": e["rows9"] + e["rows10"]}
    assert s["diagnosis_rows_by_icd_version"] == {"9": e["rows9"], "10": e["rows10"]}
    assert s["icd9_mapping"]["rows_mapped"] == e["rows_mapped"]
    assert s["icd9_mapping"]["icd10_codes_from_mapping"] == e["from_mapping"]
    assert s["icd9_mapping"]["distinct_codes_mapped"] == len(e["mapped9"])
    assert s["icd9_mapping"]["distinct_codes_unmapped"] == len(e["unmapped9"])
    assert {x["code"] for x in s["icd9_mapping"]["unmapped_examples"]} <= e["unmapped9"]
    q = s["quirks"]
    assert q["icd9_codes_unmapped"] == e["unmapped"] and e["unmapped"] > 0
    assert q["icd9_mapping_duplicates"] == e["dup_mapping"]
    assert q["duplicate_codes"] == e["dup10"]
    assert q["ages_capped"] == e["capped"] and e["capped"] > 0
    assert q["admissions_without_diagnoses"] == e["adm_no_rows"]
    assert q["admissions_without_valid_codes"] == e["adm_no_codes"]
    assert q["patients_without_diagnoses"] == e["n_subjects"] - len(e["patients"])
    assert q["icd9_admissions_dropped"] == 0
    for key in ("ages_negative", "empty_codes", "invalid_codes", "patients_without_admissions",
                "admissions_without_patient", "diagnoses_without_admission"):
        assert q[key] == 0, key
    assert patients == e["patients"]
    assert s["patients"] == len(patients)
    assert s["admissions"] == sum(len(p["visits"]) for p in patients)
    assert s["diagnosis_rows"] == sum(len(v) for p in patients for v in p["visits"])
    # The same figures as they stand with the shipped FY2021 GEM table (a change there shows here).
    assert (s["patients"], s["admissions"], s["diagnosis_rows"], e["rows10"]) == (100, 129, 1684, 877)
    assert (e["rows_mapped"], e["unmapped"], len(e["unmapped9"]), e["dup10"], e["dup_mapping"], e["capped"]) == (
        811, 35, 25, 4, 2, 9)
    assert s["distinct_codes"] == len({c for p in patients for v in p["visits"] for c in v})
    assert all(icd10.is_valid(c) for p in patients for v in p["visits"] for c in v)
    assert all(p["age"] == int(p["age"]) for p in patients)  # MIMIC-IV: whole years
    # Mixed: subject 10059 keeps an ICD-9 (mapped) visit before an ICD-10 one.
    assert len(next(p for p in patients if p["subject_id"] == 10059)["visits"]) == 2
    # Same patients as the MIMIC-III reader's, each code mapped (ages aside).
    demo3, _ = read_mimic3(demo_dir)
    by_id = {p["subject_id"]: p for p in patients}
    for p in demo3:
        visits = [list(dict.fromkeys(c for code in v for c in icd10.from_icd9(code))) for v in p["visits"]]
        visits = [v for v in visits if v]
        assert by_id.get(p["subject_id"], {"visits": []})["visits"] == visits
    assert all(p["sex"] == by_id[p["subject_id"]]["sex"] for p in demo3 if p["subject_id"] in by_id)


def test_demo_as_mimic4_drop(demo_dir, demo4):
    patients, s = read_mimic4(demo4, icd9_rows="drop")
    e = expected(demo_dir, "drop")
    assert s["icd9_rows"] == "drop"
    assert s["diagnosis_rows_by_icd_version"] == {"9": e["rows9"], "10": e["rows10"]}
    q = s["quirks"]
    assert q["icd9_admissions_dropped"] == e["adm9"] == 64
    assert (q["icd9_codes_unmapped"], q["icd9_mapping_duplicates"], q["admissions_without_valid_codes"]) == (0, 0, 0)
    assert s["icd9_mapping"]["rows_mapped"] == s["icd9_mapping"]["icd10_codes_from_mapping"] == 0
    assert q["duplicate_codes"] == e["dup10"]
    assert q["admissions_without_diagnoses"] == e["adm_no_rows"]
    assert q["ages_capped"] == e["capped"]  # counted over every admission, as in read_mimic3
    assert q["patients_without_diagnoses"] == e["n_subjects"] - len(e["patients"])
    assert q["deaths_at_dropped_admissions"] == e["dropped_deaths"] == 0
    assert patients == e["patients"]
    # Only the ICD-10 admissions remain.
    assert s["admissions"] == e["adm10"] - e["adm_no_rows"]
    assert (s["patients"], s["admissions"], s["diagnosis_rows"]) == (48, 65, 873)
    kept = {c for p in patients for v in p["visits"] for c in v}
    diag = pd.read_csv(demo4 / "hosp" / "diagnoses_icd.csv.gz", dtype=str)
    assert kept == set(diag["icd_code"][diag["icd_version"] == "10"])


def test_icd9_codes_are_mapped_once_per_distinct_code(demo4, monkeypatch):
    real, calls = icd10.from_icd9, []

    def counting(code):
        calls.append(code)
        return real(code)

    monkeypatch.setattr(icd10, "from_icd9", counting)
    read_mimic4(demo4)
    diag = pd.read_csv(demo4 / "hosp" / "diagnoses_icd.csv.gz", dtype=str)
    assert sorted(calls) == sorted(set(diag["icd_code"][diag["icd_version"] == "9"]))


def test_layouts_and_compression_read_the_same(demo_dir, demo4, tmp_path):
    base, s_base = read_mimic4(demo4)
    flat_csv = demo_as_mimic4(demo_dir, tmp_path / "flat", hosp=False, gz=False)
    hosp_csv = demo_as_mimic4(demo_dir, tmp_path / "hosp_csv", gz=False)
    assert sorted(p.name for p in flat_csv.iterdir()) == ["admissions.csv", "diagnoses_icd.csv", "patients.csv"]
    for folder, files in ((flat_csv, "patients.csv"), (hosp_csv, "hosp/patients.csv")):
        assert folder_format(folder) == "mimic4"
        patients, s = read_mimic4(folder)
        assert patients == base
        assert s["files"]["PATIENTS"] == files
        assert {k: v for k, v in s.items() if k not in ("source", "files", "messages")} == \
            {k: v for k, v in s_base.items() if k not in ("source", "files", "messages")}
        assert s["messages"] == [m.replace(".csv.gz:", ".csv:") for m in s_base["messages"]]
    assert s_base["files"] == {"PATIENTS": "hosp/patients.csv.gz", "ADMISSIONS": "hosp/admissions.csv.gz",
                               "DIAGNOSES_ICD": "hosp/diagnoses_icd.csv.gz"}
    assert folder_format(demo_dir) == "mimic3"


# --------------------------------------------------------------------------- the writer


def test_write_mimic4_csvs_round_trip(demo4, tmp_path):
    patients, _ = read_mimic4(demo4)
    paths = write_mimic4_csvs(patients, tmp_path / "out", seed=3)
    assert {k: p.relative_to(tmp_path / "out").as_posix() for k, p in paths.items()} == {
        "patients": "hosp/patients.csv.gz", "admissions": "hosp/admissions.csv.gz",
        "diagnoses_icd": "hosp/diagnoses_icd.csv.gz"}
    back, s = read_mimic4(tmp_path / "out")
    assert back == patients
    assert s["diagnosis_rows_by_icd_version"]["9"] == 0
    assert s["quirks"]["ages_capped"] >= sum(p["age"] == 90 for p in patients)
    cols = {name: list(pd.read_csv(paths[name], nrows=0).columns) for name in TABLES}
    assert cols == {
        "patients": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
        "admissions": ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                       "hospital_expire_flag"],
        "diagnoses_icd": ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
    }


def test_writer_ages_are_whole_years_and_anchors(tmp_path):
    patients = [
        {"subject_id": 5, "age": 0.5, "sex": "M", "visits": [["P0700"]]},
        {"subject_id": 6, "age": 45.678, "sex": "F", "visits": [["I10"], ["E119", "I10"], ["J189"]]},
        {"subject_id": 7, "age": 90.0, "sex": "F", "visits": [["I509", "I4891"]]},
        {"subject_id": 8, "age": 89.99, "sex": "M", "visits": [["I2510"], ["I10"]]},
    ]
    paths = write_mimic4_csvs(patients, tmp_path / "a", seed=1)
    back, s = read_mimic4(tmp_path / "a")
    assert [p["age"] for p in back] == [0.0, 45.0, 90.0, 89.0]  # floored to whole years
    assert [p["visits"] for p in back] == [p["visits"] for p in patients]
    pat = pd.read_csv(paths["patients"])
    adm = pd.read_csv(paths["admissions"], parse_dates=["admittime", "dischtime"])
    assert pat["anchor_age"].tolist() == [0, 45, 91, 89]
    first_year = adm.groupby("subject_id")["admittime"].min().dt.year
    assert pat["anchor_year"].tolist() == first_year.loc[pat["subject_id"]].tolist()
    assert pat["anchor_year_group"].str.fullmatch(r"20\d\d - 20\d\d").all()
    assert (adm["dischtime"] > adm["admittime"]).all()
    # The same dates and hadm_ids as the MIMIC-III writer's timeline; the other code system's version.
    write_mimic4_csvs(patients, tmp_path / "b", seed=1, code_system="icd9cm")
    diag = pd.read_csv(tmp_path / "b" / "hosp" / "diagnoses_icd.csv.gz")
    assert set(diag["icd_version"]) == {9}
    assert pd.read_csv(tmp_path / "b" / "hosp" / "admissions.csv.gz").equals(pd.read_csv(paths["admissions"]))
    with pytest.raises(ValueError, match="code_system"):
        write_mimic4_csvs(patients, tmp_path / "c", code_system="icd11")
    with pytest.raises(ValueError, match="no visit"):
        write_mimic4_csvs([{"subject_id": 1, "age": 3.0, "sex": "F", "visits": []}], tmp_path / "c")
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- a tiny folder, quirks and errors


def tiny4_tables() -> dict[str, pd.DataFrame]:
    """5 patients with one of each quirk (MIMIC-IV columns)."""
    patients = pd.DataFrame({
        "subject_id": [1, 2, 3, 4, 5],
        "gender": ["F", "M", "F", "M", "F"],
        "anchor_age": [50, 91, 30, 0, 40],
        "anchor_year": [2150, 2160, 2170, 2180, 2190],
        "anchor_year_group": ["2008 - 2010"] * 5,
        "dod": [""] * 5,
    })
    admissions = pd.DataFrame({
        "subject_id": [1, 1, 2, 3, 4, 9],
        "hadm_id": [30, 20, 10, 40, 60, 50],  # hadm order is not time order
        "admittime": ["2151-03-01 10:00:00", "2149-01-01 08:00:00", "2158-05-05 12:00:00", "2170-01-01 00:00:00",
                      "2178-06-01 00:00:00", "2150-01-01 00:00:00"],
        "dischtime": ["2151-03-05 10:00:00", "2149-01-03 08:00:00", "2158-05-09 12:00:00", "2170-01-02 00:00:00",
                      "2178-06-02 00:00:00", "2150-01-02 00:00:00"],
    })
    diagnoses = pd.DataFrame({
        "subject_id": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 4, 9, 7],
        "hadm_id": [20, 20, 20, 20, 30, 30, 30, 30, 30, 30, 10, 10, 60, 50, 70],
        "seq_num": [2, 1, 3, 4, 1, 2, 3, 4, 5, 6, 1, 2, 1, 1, 1],
        # hadm 20: out of order (dotted ICD-10 first), a duplicate, an empty code. hadm 30 in ICD-9:
        # 401.9 -> I10, 4019 again (read twice), 25000 -> E119, no mapping, 4011 -> I10 (a repeat
        # the mapping makes), 0730 -> A70 + J17 (a combination). Then Z66, a code not in ICD-10-CM;
        # a newborn's; an unknown patient's admission's; an unknown admission's.
        "icd_code": ["I10", "E11.9", "I10", "", "401.9", "4019", "25000", UNMAPPED9, "4011", "0730", "Z66", "I99999",
                     "P0700", "I10", "I10"],
        "icd_version": [10, 10, 10, 10, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10],
    })
    return {"patients": patients, "admissions": admissions, "diagnoses_icd": diagnoses}


UNMAPPED9 = "V6441"  # an ICD-9-CM code the GEM does not map


def write4(folder: Path, tables: dict[str, pd.DataFrame], gz: bool = True) -> Path:
    (folder / "hosp").mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df.to_csv(folder / "hosp" / f"{name}.csv{'.gz' if gz else ''}", index=False)
    return folder


@pytest.fixture
def tiny4(tmp_path) -> Path:
    return write4(tmp_path / "mimic4", tiny4_tables())


def test_tiny_folder_quirks_are_counted(tiny4):
    patients, s = read_mimic4(tiny4)
    no_death = {"hospital_death": False, "death_days": None}
    gap = float(np.float32(787 + 2 / 24))  # 2149-01-03 08:00 -> 2151-03-01 10:00
    assert patients == [
        {"subject_id": 1, "age": 49.0, "sex": "F", "visits": [["E119", "I10"], ["I10", "E119", "A70", "J17"]],
         "stay_days": [2.0, 4.0], "gap_days": [0.0, gap], **no_death},
        {"subject_id": 2, "age": 90.0, "sex": "M", "visits": [["Z66"]], "stay_days": [4.0], "gap_days": [0.0],
         **no_death},
        {"subject_id": 4, "age": 0.0, "sex": "M", "visits": [["P0700"]], "stay_days": [1.0], "gap_days": [0.0],
         **no_death},
    ]
    assert s["time_columns_missing"] == {"ADMISSIONS": ["deathtime", "hospital_expire_flag"]}
    q = s["quirks"]
    assert q == {**q, "ages_capped": 1, "ages_negative": 1, "empty_codes": 1, "invalid_codes": 1,
                 "duplicate_codes": 2, "icd9_codes_unmapped": 1, "icd9_mapping_duplicates": 1,
                 "admissions_without_diagnoses": 1,
                 "patients_without_admissions": 1, "patients_without_diagnoses": 1,
                 "admissions_without_patient": 1, "diagnoses_without_admission": 2}
    assert sum(q.values()) == 14  # nothing else
    assert s["invalid_code_examples"] == [{"code": "I99999", "icd_version": 10, "rows": 1, "first_data_row": 12}]
    assert s["icd9_mapping"] == {
        "rows_mapped": 5, "distinct_codes_mapped": 4, "icd10_codes_from_mapping": 6, "distinct_codes_unmapped": 1,
        "unmapped_examples": [{"code": UNMAPPED9, "icd_version": 9, "rows": 1, "first_data_row": 8}]}
    assert s["diagnosis_rows_by_icd_version"] == {"9": 6, "10": 9}
    assert (s["patients"], s["admissions"], s["diagnosis_rows"], s["distinct_codes"]) == (3, 4, 8, 6)
    text = "\n".join(s["messages"])
    assert ("diagnoses_icd.csv.gz: 1 ICD-10 rows (1 distinct codes) that are not ICD-10-CM codes were dropped, "
            "e.g. I99999 (x1, data row 12)") in text
    assert "patients.csv.gz: 1 patients without any admission were dropped" in text


def assert_one_line_error(folder: Path, *needles: str) -> None:
    with pytest.raises(Mimic3Error) as e:
        read_mimic4(folder)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("table, edit, needles", [
    ("diagnoses_icd", lambda df: df.drop(columns="icd_version"),
     ["diagnoses_icd.csv.gz", "missing column icd_version"]),
    ("diagnoses_icd", lambda df: df.assign(icd_version=df["icd_version"].where(df.index != 4, 11)),
     ["diagnoses_icd.csv.gz", "icd_version", "not 9 or 10", "data row 5", "11"]),
    ("patients", lambda df: df.assign(gender=df["gender"].where(df.index != 2, "X")),
     ["patients.csv.gz", "gender", "data row 3", "'X'"]),
    ("patients", lambda df: df.assign(anchor_age=df["anchor_age"].astype(object).where(df.index != 1, "ninety")),
     ["patients.csv.gz", "anchor_age", "data row 2", "'ninety'"]),
    ("admissions", lambda df: df.assign(hadm_id=df["hadm_id"].where(df.index != 3, 30)),
     ["admissions.csv.gz", "hadm_id", "duplicated", "data row 4", "30"]),
    ("admissions", lambda df: df.assign(admittime=df["admittime"].where(df.index != 0, "soon")),
     ["admissions.csv.gz", "admittime", "data row 1", "'soon'"]),
])
def test_bad_values_are_one_line_errors(tmp_path, table, edit, needles):
    t = tiny4_tables()
    t[table] = edit(t[table])
    assert_one_line_error(write4(tmp_path / "m", t), *needles)


def test_missing_file_and_empty_table(tiny4):
    (tiny4 / "hosp" / "admissions.csv.gz").unlink()
    assert_one_line_error(tiny4, "hosp", "missing file ADMISSIONS.csv")
    pd.DataFrame(columns=["subject_id", "hadm_id", "admittime"]).to_csv(tiny4 / "hosp" / "admissions.csv.gz",
                                                                          index=False)
    assert_one_line_error(tiny4, "admissions.csv.gz", "no rows")
    with pytest.raises(ValueError, match="icd9_rows"):
        read_mimic4(tiny4, icd9_rows="keep")


# --------------------------------------------------------------------------- prepare, load_cohort, CLI


def test_prepare_mimic4_and_staleness(tiny4, tmp_path):
    out = tmp_path / "out"
    summary = prepare(tiny4, out, seed=0, val_frac=0.0, test_frac=0.0)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    assert (saved["format"], saved["code_system"], saved["icd9_rows"]) == ("mimic4", "icd10cm", "map")
    assert saved["splits"] == {"train": 3, "validation": 0, "test": 0}
    assert saved["input_files"] == file_fingerprints(tiny4)
    assert saved["input_files"]["DIAGNOSES_ICD"]["file"] == "hosp/diagnoses_icd.csv.gz"
    assert stale_reasons(out, tiny4, val_frac=0.0, test_frac=0.0) == []
    assert stale_reasons(out, tiny4, val_frac=0.0, test_frac=0.0, icd9_rows="drop") == [
        "icd9_rows was 'map', now 'drop'"]
    text = format_summary(summary)
    assert text.startswith(f"MIMIC-IV folder {tiny4.resolve()} (ICD-10-CM; ICD-9 rows: map)")
    assert "rows read with icd_version 9" in text and "quirk: icd9 codes unmapped" in text
    # An edited table makes the output stale.
    path = tiny4 / "hosp" / "patients.csv.gz"
    tables = tiny4_tables()
    tables["patients"].assign(gender=["M"] * 5).to_csv(path, index=False)
    [reason] = stale_reasons(out, tiny4, val_frac=0.0, test_frac=0.0)
    assert reason.startswith("hosp/patients.csv.gz changed (") and "content" in reason

    drop = prepare(tiny4, out, icd9_rows="drop", val_frac=0.0, test_frac=0.0)
    assert drop["icd9_rows"] == "drop" and drop["quirks"]["icd9_admissions_dropped"] == 1
    with pytest.raises(ValueError, match="icd9_rows"):
        prepare(tiny4, out, icd9_rows="keep")


def test_load_cohort_dispatches_and_mimic3_summary_names_its_code_system(tiny4, demo_dir, tmp_path):
    ds, s = load_cohort(tiny4, val_frac=0.0, test_frac=0.0, cache_dir=tmp_path / "cache", icd9_rows="drop")
    assert s["code_system"] == "icd10cm" and s["icd9_rows"] == "drop"
    assert [p["visits"] for p in ds["train"].to_list()] == [[["E119", "I10"]], [["Z66"]], [["P0700"]]]
    _, s3 = read_mimic3(demo_dir)
    assert (s3["format"], s3["code_system"]) == ("mimic3", "icd9cm")
    with pytest.raises(ValueError, match="icd9_rows"):
        load_cohort(tiny4, cache_dir=tmp_path / "cache", icd9_rows="keep")


def test_cli_prepare_icd9_rows(tiny4, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["prepare", "--mimic-dir", str(tiny4), "--out", str(out), "--icd9-rows", "drop",
                     "--val-frac", "0", "--test-frac", "0"]) == 0
    stdout = capsys.readouterr().out
    assert "MIMIC-IV folder" in stdout and "ICD-9 rows: drop" in stdout and "quirk: icd9 admissions dropped" in stdout
    assert json.loads((out / "summary.json").read_text())["icd9_rows"] == "drop"
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--mimic-dir", str(tiny4), "--out", str(out), "--icd9-rows", "keep"])


def test_find_tables_looks_in_hosp(tiny4):
    assert {t: p.relative_to(tiny4).as_posix() for t, p in find_tables(tiny4).items()} == {
        "PATIENTS": "hosp/patients.csv.gz", "ADMISSIONS": "hosp/admissions.csv.gz",
        "DIAGNOSES_ICD": "hosp/diagnoses_icd.csv.gz"}
    assert folder_format(tiny4) == "mimic4"
