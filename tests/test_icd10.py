"""ICD-10-CM FY2021 tables: hierarchy figures, normalisation, CMS edits, the ICD-9 GEM map."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from promptehr_hf.datasets_scripts import icd9, icd10

# What scripts/build_icd10_tables.py printed when it wrote the tables.
N_NODES, N_CODES, N_BILLABLE, N_CATEGORIES, N_BILLABLE_CATEGORIES = 95_664, 95_358, 72_621, 1_911, 221
N_BLOCKS, N_CHAPTERS = 284, 22
BILLABLE_PER_EDIT = {"sex_female_only": 3_138, "sex_male_only": 529, "age_newborn": 41, "age_pediatric": 114,
                     "age_maternity": 2_376, "age_adult": 777}
NODES_PER_EDIT = {"sex_female_only": 3_944, "sex_male_only": 675, "age_newborn": 50, "age_pediatric": 142,
                  "age_maternity": 2_964, "age_adult": 950}
GEM_MAPPED, GEM_SEVERAL, GEM_NON_BILLABLE_TARGETS = 14_142, 645, 148


def test_table_figures():
    billable = icd10.billable_codes()
    cats = icd10.categories()
    assert len(billable) == N_BILLABLE == len(set(billable))
    assert len(cats) == N_CATEGORIES == len(set(cats))
    assert all(len(c) == 3 and icd10.is_valid(c) and icd10.category(c) == c for c in cats)
    assert all(icd10.is_billable(c) and not icd10.children(c) for c in billable)
    assert {icd10.category(c) for c in billable} == set(cats)
    assert sum(icd10.is_billable(c) for c in cats) == N_BILLABLE_CATEGORIES
    assert len({icd10.section(c) for c in cats}) == N_BLOCKS
    assert len({icd10.chapter(c) for c in cats}) == N_CHAPTERS
    rows = icd10._tables().order
    assert len(rows) == N_NODES == N_CODES + N_BLOCKS + N_CHAPTERS
    assert sum(icd10.is_valid(c) for c in rows) == N_CODES
    assert icd10.SYSTEM == "icd10cm" and icd10.VERSION == "FY2021" and icd10.FISCAL_YEAR == 2021


def test_normalize_dotted_and_dotless():
    assert icd10.normalize("E11.9") == icd10.normalize(" e119 ") == "E119"
    assert icd10.normalize("s72.001a") == "S72001A" and icd10.normalize("E11.") == "E11"
    assert icd10.normalize("E1.19") == "E1.19" and not icd10.is_valid("E1.19")  # a misplaced dot stays
    assert icd10.title("E11.9") == icd10.title("E119") == "Type 2 diabetes mellitus without complications"
    with pytest.raises(TypeError, match="str"):
        icd10.normalize(119)


def test_category_of_letter_codes():
    assert icd10.category("E119") == icd10.category("E11.9") == "E11"
    assert icd10.category("V0100XA") == "V01" and icd10.category("Z3801") == "Z38"
    assert icd10.category("C4A0") == "C4A" and icd10.category("O9A111") == "O9A"
    assert icd10.category("Z99.99") == "Z99"  # syntactic: works for a code missing from FY2021
    for bad in ("E1", "E08-E13", "E1.19"):
        with pytest.raises(ValueError):
            icd10.category(bad)


def test_validity():
    assert icd10.is_valid("E11") and not icd10.is_billable("E11")
    assert icd10.is_valid("I10") and icd10.is_billable("I10")  # a category with no subdivision
    assert icd10.is_billable("V0100XA") and icd10.is_billable("S72001A") and icd10.is_billable("U071")
    for bad in ("E08-E13", "E00-E89", "B20-B20", "E11A", "4019", "25000", "I1", "", None, float("nan")):
        assert not icd10.is_valid(bad), bad
    assert not icd10.is_billable("E11") and not icd10.is_billable(None)


def test_hierarchy():
    assert icd10.parent("E119") == "E11" and icd10.parent("E11") == "E08-E13"
    assert icd10.parent("E08-E13") == "E00-E89" and icd10.parent("E00-E89") is None
    assert icd10.chapter("E119") == "E00-E89" and icd10.section("E119") == "E08-E13"
    assert icd10.chapter("V0100XA") == "V00-Y99" and icd10.section("E00-E89") is None
    assert icd10.children("E11") == [f"E11{d}" for d in "012345689"]
    assert icd10.children("E08-E13") == ["E08", "E09", "E10", "E11", "E13"]
    # 7th-character codes hang under their prefix without the placeholder X
    assert icd10.parent("T8140XA") == "T8140" and icd10.parent("T07XXXA") == "T07"
    # a one-category block is named as a range; CDC's irregular nesting is kept
    assert icd10.section("B20") == "B20-B20" and icd10.parent("B20") == "B20-B20"
    assert icd10.parent("H54512A") == "H54511"
    assert icd10.children("C43-C44") == ["C43", "C4A", "C44"]  # tabular order
    assert icd10.title("E00-E89") == "Endocrine, nutritional and metabolic diseases"
    assert icd10.title("E08-E13") == "Diabetes mellitus"
    assert icd10.title("S72001A") == ("Fracture of unspecified part of neck of right femur, "
                                      "initial encounter for closed fracture")
    with pytest.raises(KeyError, match="E11A"):
        icd10.chapter("E11A")


def test_edit_counts_and_ranges():
    table = icd10.edit_table()
    billable = set(icd10.billable_codes())
    assert {e: sum(e in es for c, es in table.items() if c in billable) for e in icd10.EDITS} == BILLABLE_PER_EDIT
    assert {e: sum(e in es for es in table.values()) for e in icd10.EDITS} == NODES_PER_EDIT
    # the ICD-10 MCE's maternity range is 9-64 (ICD-9's: 12-55)
    assert icd10.age_ranges() == {"age_newborn": (0, 0), "age_pediatric": (0, 17),
                                  "age_maternity": (9, 64), "age_adult": (15, 124)}
    assert icd10.EDITS == icd9.EDITS and icd10.SEX_CONFLICT == icd9.SEX_CONFLICT


def test_known_edits():
    # newborn-only: liveborn infant (Z38) and tetanus neonatorum
    assert icd10.edits_of("Z38.00") == ("age_newborn",) == icd10.edits_of("A33")
    assert icd10.check("Z3800", 65, "F") == "age_newborn" and icd10.check("Z3800", 0.4, "M") is None
    assert icd10.check("Z3800", 1, "M") == "age_newborn"
    # maternity: female-only and 9-64
    assert icd10.edit_of("O0900") == "sex_female_only+age_maternity" == icd10.edit_of("O80")
    assert icd10.check("O0900", 30, "M") == "sex_female_only"  # sex edits are reported first
    assert [icd10.check("O0900", a, "F") for a in (8.9, 9, 64.9, 65)] == ["age_maternity", None, None, "age_maternity"]
    # female-only, male-only, male-only adult, pediatric, female-only adult
    assert icd10.edits_of("N803") == ("sex_female_only",) and icd10.check("N803", 40, "M") == "sex_female_only"
    assert icd10.edits_of("C61") == ("sex_male_only",) and icd10.check("C61", 70, "F") == "sex_male_only"
    assert icd10.edits_of("C50011") == ("sex_female_only",) and icd10.edits_of("C50021") == ("sex_male_only",)
    assert icd10.edit_of("N400") == "sex_male_only+age_adult"
    assert [icd10.check("N400", a, "M") for a in (14, 15, 124)] == ["age_adult", None, None]
    assert icd10.edits_of("A4851") == ("age_pediatric",)
    assert [icd10.check("A4851", a, "F") for a in (17.9, 18)] == [None, "age_pediatric"]
    assert icd10.edit_of("Z780") == "sex_female_only+age_adult"
    assert icd10.edit_of("E119") is None and icd10.check("E119", 65, "M") is None
    assert icd10.check("NOTACODE", 65, "M") is None


def test_non_billable_nodes_inherit_shared_edits():
    assert icd10.edit_of("Z38") == "age_newborn"
    assert icd10.edit_of("O09") == "sex_female_only+age_maternity"
    assert icd10.edit_of("N40") == "sex_male_only+age_adult" and icd10.edit_of("C51-C58") == "sex_female_only"
    assert icd10.edit_of("P07") is None and icd10.edit_of("C50") is None  # mixed below
    table = icd10.edit_table()
    for node, edits in table.items():
        kids = icd10.children(node)
        if kids:
            assert all(set(edits) <= set(table.get(k, ())) for k in kids), node


def test_bad_age_and_sex():
    for age in (-1, 125, float("nan")):
        with pytest.raises(ValueError, match="age"):
            icd10.check("O80", age, "F")
    with pytest.raises(ValueError, match="sex"):
        icd10.check("O80", 30, "X")
    with pytest.raises(ValueError, match="sex"):
        icd10.violations(["O80"], 30, ["U"])
    with pytest.raises(ValueError, match="age"):
        icd10.violations(["O80", "I10"], [30, -2], "F")


def test_violations_matches_check():
    rng = random.Random(0)
    edited = [c for c in icd10.edit_table() if "-" not in c]
    codes = rng.sample(edited, 600) + rng.sample(icd10.billable_codes(), 600) + ["NOPE", "O09.00", "Z38.00"]
    ages = [rng.choice([0, 0.5, 1, 8, 9, 14, 15, 17, 18, 30, 64, 65, 90, 124]) for _ in codes]
    sexes = [rng.choice("FM") for _ in codes]
    got = icd10.violations(codes, ages, sexes)
    assert got.shape == (len(codes),)
    assert got.tolist() == [icd10.check(c, a, s) or "" for c, a, s in zip(codes, ages, sexes)]
    assert (got != "").sum() > 200 and set(got.tolist()) == set(icd10.EDITS) | {""}
    mask = icd10.violations(icd10.billable_codes(), 63.5, "M") != ""
    assert mask.shape == (N_BILLABLE,) and mask[icd10.billable_codes().index("O80")]
    assert not mask[icd10.billable_codes().index("I10")] and not mask[icd10.billable_codes().index("C61")]
    assert icd10.violations([], 30, "F").shape == (0,)


def test_check_is_consistent_with_age_ranges_everywhere():
    """Every edited billable code, at every whole age 0..124 and both sexes, vectorised."""
    table = icd10.edit_table()
    codes = np.array([c for c in icd10.billable_codes() if c in table])
    ages = np.arange(125)
    ranges = icd10.age_ranges()
    cc, aa = np.meshgrid(np.arange(len(codes)), ages, indexing="ij")
    for sex in "FM":
        got = icd10.violations(codes[cc.ravel()].tolist(), aa.ravel(), sex).reshape(cc.shape)
        for i, code in enumerate(codes):
            edits = table[code]
            if ("sex_female_only" in edits and sex == "M") or ("sex_male_only" in edits and sex == "F"):
                assert set(got[i]) == {edits[0]}, code
                continue
            ok = np.ones(125, dtype=bool)
            for e in edits:
                if e in ranges:
                    ok &= (ages >= ranges[e][0]) & (ages <= ranges[e][1])
            assert ((got[i] == "") == ok).all(), code


def test_from_icd9():
    assert icd10.from_icd9("4019") == icd10.from_icd9("401.9") == ("I10",)
    assert icd10.from_icd9("25000") == ("E119",)
    assert icd10.from_icd9("V30.00") == ("Z3800",) and icd10.from_icd9("E880.0") == ("W100XXA",)
    # combination entries: the first target of each scenario-1 choice list, to be used together
    assert icd10.from_icd9("0730") == ("A70", "J17")  # ornithosis with pneumonia
    assert icd10.from_icd9("66602") == ("O720", "O43211")
    # GEM targets that are no FY2021 code (H4011X0, S0210XA) were replaced by their parent
    assert icd10.from_icd9("36511") == ("H4011",) and icd10.from_icd9("80100") == ("S0210",)
    assert icd10.from_icd9("4168") == ("I272",) and not icd10.is_billable("I272")  # a header since FY2017
    assert icd10.from_icd9("36570") == ()  # "no map" in the GEM
    assert icd10.from_icd9("XXXX") == () and icd10.from_icd9("I10") == ()
    gem = icd10._gem()
    assert len(gem) == GEM_MAPPED and sum(len(t) > 1 for t in gem.values()) == GEM_SEVERAL
    assert set(gem) <= set(icd9.billable_codes())
    targets = {t for ts in gem.values() for t in ts}
    assert all(icd10.is_valid(t) for t in targets)
    assert sum(not icd10.is_billable(t) for t in targets) == GEM_NON_BILLABLE_TARGETS
    assert all(len(set(ts)) == len(ts) and ts for ts in gem.values())


def test_data_files_are_compact_gzip_json(repo_root):
    data = repo_root / "datasets_scripts" / "data"
    names = ["icd10cm_fy2021.json.gz", "icd10cm_fy2021_edits.json.gz", "icd9_to_icd10cm_gem.json.gz"]
    assert set(names) <= {p.name for p in data.glob("*.json.gz")}  # beside the procedure tables
    assert sum((data / n).stat().st_size for n in names) < 2_000_000
    with gzip.open(data / names[0], "rt", encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["meta"]["version"].startswith("ICD-10-CM FY2021")
    assert len(doc["nodes"]) == N_NODES and sum(r[2] for r in doc["nodes"]) == N_BILLABLE


def test_reading_the_tables_is_lazy():
    import subprocess
    import sys

    code = ("from promptehr_hf.datasets_scripts import icd10; "
            "assert icd10._tables.cache_info().currsize == 0; "
            "assert icd10._edit_data.cache_info().currsize == 0; "
            "assert icd10._gem.cache_info().currsize == 0; "
            "icd10.is_valid('E119'); assert icd10._tables.cache_info().currsize == 1; "
            "assert icd10._gem.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_billable_form():
    assert icd10.billable_form("E119") == "E119"  # billable already
    assert icd10.billable_form("E784") == "E7849"  # "Other hyperlipidemia" (E7841 is Lp(a))
    assert icd10.billable_form("A047") == "A0472"  # "not specified as recurrent"
    assert icd10.billable_form("N183") == "N1830"  # "stage 3 unspecified"
    assert icd10.billable_form("E7") is None and icd10.billable_form("9999") is None
