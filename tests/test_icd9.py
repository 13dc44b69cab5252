"""ICD-9-CM v32 tables (issue 2, must-show 3): hierarchy figures, normalisation, CMS edits."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from promptehr_hf.datasets_scripts import icd9


def test_table_figures():
    billable = icd9.billable_codes()
    cats = icd9.categories()
    assert len(billable) == 14_567 == len(set(billable))
    assert len(cats) == 1_234 == len(set(cats))
    # 1,234 counts E-code categories at 4 characters (E880), as CMS does.
    assert sum(c.startswith("E") for c in cats) == 216 and all(len(c) == 4 for c in cats if c[0] == "E")
    assert sum(c.startswith("V") for c in cats) == 90
    assert all(icd9.is_valid(c) and icd9.category(c) == c for c in cats)
    assert all(icd9.is_billable(c) and not icd9.children(c) for c in billable)
    # every billable code sits under a category; some categories are billable themselves
    assert {icd9.category(c) for c in billable} == set(cats)
    assert sum(icd9.is_billable(c) for c in cats) == 137
    assert len({icd9.chapter(c) for c in cats}) == 19


def test_normalize_dotted_and_dotless():
    assert icd9.normalize("401.9") == icd9.normalize("4019") == "4019"
    assert icd9.normalize(" e880.0 ") == "E8800"
    assert icd9.normalize("V30.00") == icd9.normalize("v3000") == "V3000"
    assert icd9.normalize("401.") == "401"
    assert icd9.title("401.9") == icd9.title("4019") == "Unspecified essential hypertension"
    assert icd9.is_valid("401.9") and icd9.is_valid("4019") and icd9.is_billable("401.9")
    # a misplaced dot is not silently repaired into another code
    assert icd9.normalize("40.19") == "40.19" and not icd9.is_valid("40.19")
    with pytest.raises(TypeError, match="leading zeros"):
        icd9.normalize(389)


def test_validity():
    assert icd9.is_valid("401") and not icd9.is_billable("401")  # MIMIC uses some non-leaf codes
    assert icd9.is_valid("486") and icd9.is_billable("486")  # a category with no subdivision
    assert icd9.is_valid("E8800") and icd9.is_valid("V3000") and icd9.is_valid("0389")
    for bad in ("4010-", "401-405", "390-459", "4015", "40199", "I10", "E119", "", None, float("nan")):
        assert not icd9.is_valid(bad), bad
    assert not icd9.is_billable("401") and not icd9.is_billable(None)


def test_hierarchy():
    assert icd9.category("25000") == "250" and icd9.category("250.00") == "250"
    assert icd9.category("E880.0") == "E880" and icd9.category("E8800") == "E880"
    assert icd9.category("V3000") == "V30"
    assert icd9.parent("25000") == "2500" and icd9.parent("2500") == "250"
    assert icd9.parent("250") == "249-259" and icd9.parent("240-279") is None
    assert icd9.chapter("25000") == "240-279" and icd9.chapter("4019") == "390-459"
    assert icd9.chapter("E8800") == "E000-E999" and icd9.chapter("V3000") == "V01-V91"
    assert icd9.section("4019") == "401-405" and icd9.section("2800") is None  # 280-289: no sections
    assert icd9.children("401") == ["4010", "4011", "4019"]
    assert "E8800" in icd9.children("E880")
    assert "401-405" in icd9.children("390-459")
    assert icd9.title("390-459") == "Diseases Of The Circulatory System"
    with pytest.raises(KeyError, match="4015"):
        icd9.chapter("4015")
    with pytest.raises(ValueError):
        icd9.category("40")


def test_sex_and_newborn_edits_from_the_issue():
    assert icd9.check("650", 30, "M") == "sex_female_only"
    assert icd9.check("650", 30, "F") is None
    assert icd9.check("185", 70, "F") == "sex_male_only"
    assert icd9.check("185", 70, "M") is None
    assert icd9.check("V3000", 65, "F") == "age_newborn" == icd9.check("V30.00", 65, "M")
    assert icd9.check("V3000", 0.4, "M") is None  # age in whole years: 0.4 is a newborn
    assert icd9.check("4019", 65, "M") is None and icd9.check("NOTACODE", 65, "M") is None


@pytest.mark.parametrize("code, edit, ok_ages, bad_ages", [
    ("V3000", "age_newborn", [0, 0.99], [1, 17, 89]),
    ("V200", "age_pediatric", [0, 17.9], [18, 60]),
    ("V2341", "age_maternity", [12, 30, 55.9], [11.9, 56, 80]),
])
def test_age_edit_boundaries(code, edit, ok_ages, bad_ages):
    sex = "F" if "sex_female_only" in icd9.edits_of(code) else "M"
    assert edit in icd9.edits_of(code)
    assert [icd9.check(code, a, sex) for a in ok_ages] == [None] * len(ok_ages)
    assert [icd9.check(code, a, sex) for a in bad_ages] == [edit] * len(bad_ages)


def test_adult_edit_and_code_with_several_edits():
    adult = next(c for c, es in icd9.edit_table().items() if es == ("age_adult",) and icd9.is_billable(c))
    assert icd9.check(adult, 14, "M") == "age_adult" and icd9.check(adult, 15, "M") is None
    # V2385 (pregnancy by assisted reproduction): female-only, maternity 12-55 and adult 15-124.
    assert icd9.edits_of("V2385") == ("sex_female_only", "age_maternity", "age_adult")
    assert icd9.edit_of("V2385") == "sex_female_only+age_maternity+age_adult"
    assert [icd9.check("V2385", a, "F") for a in (13, 15, 55, 56)] == ["age_adult", None, None, "age_maternity"]
    assert icd9.check("650", 60, "M") == "sex_female_only"  # sex edits are reported first
    assert icd9.check("650", 60, "F") == "age_maternity"
    assert icd9.edit_of("650") == "sex_female_only+age_maternity" and icd9.edit_of("4019") is None
    assert icd9.age_ranges() == {"age_newborn": (0, 0), "age_pediatric": (0, 17),
                                 "age_maternity": (12, 55), "age_adult": (15, 124)}


def test_non_billable_nodes_inherit_shared_edits():
    assert icd9.edit_of("V27") == "sex_female_only+age_maternity"  # every V27x is
    assert icd9.edit_of("185") == "sex_male_only"
    # V302 (born outside hospital, not hospitalised) has no newborn edit, so V30 has none
    assert icd9.edits_of("V3000") == ("age_newborn",) and icd9.edits_of("V302") == ()
    assert icd9.edit_of("V30") is None
    table = icd9.edit_table()
    for node, edits in table.items():
        kids = icd9.children(node)
        if kids:
            assert all(set(edits) <= set(table.get(k, ())) for k in kids), node


def test_bad_age_and_sex():
    for age in (-1, 125, float("nan")):
        with pytest.raises(ValueError, match="age"):
            icd9.check("650", age, "F")
    with pytest.raises(ValueError, match="sex"):
        icd9.check("650", 30, "X")
    with pytest.raises(ValueError, match="sex"):
        icd9.violations(["650"], 30, ["U"])
    with pytest.raises(ValueError, match="age"):
        icd9.violations(["650", "4019"], [30, -2], "F")


def test_violations_matches_check():
    rng = random.Random(0)
    edited = [c for c in icd9.edit_table() if "-" not in c]
    codes = rng.sample(edited, 400) + rng.sample(icd9.billable_codes(), 400) + ["NOPE", "401.9", "V30.00"]
    ages = [rng.choice([0, 0.5, 1, 11, 12, 14, 15, 17, 18, 30, 55, 56, 90]) for _ in codes]
    sexes = [rng.choice("FM") for _ in codes]
    got = icd9.violations(codes, ages, sexes)
    assert got.shape == (len(codes),)
    assert got.tolist() == [icd9.check(c, a, s) or "" for c, a, s in zip(codes, ages, sexes)]
    assert (got != "").sum() > 100
    # one patient against the whole billable vocabulary: scalar age and sex broadcast
    mask = icd9.violations(icd9.billable_codes(), 63.5, "M") != ""
    assert mask.shape == (14_567,) and mask[icd9.billable_codes().index("650")]
    assert not mask[icd9.billable_codes().index("4019")]
    assert icd9.violations([], 30, "F").shape == (0,)


def test_data_files_are_small_json(repo_root):
    data = repo_root / "datasets_scripts" / "data"
    files = sorted(data.glob("*.json"))
    assert [f.name for f in files] == ["icd9cm_v32.json", "icd9cm_v32_edits.json"]
    assert sum(f.stat().st_size for f in files) < 2_000_000
    nodes = json.loads(files[0].read_text())["nodes"]
    assert len(nodes) == 17_726 and sum(r[2] for r in nodes) == 14_567


def test_reading_the_tables_is_lazy():
    import subprocess
    import sys

    code = ("from promptehr_hf.datasets_scripts import icd9; "
            "assert icd9._tables.cache_info().currsize == 0; "
            "assert icd9._edit_data.cache_info().currsize == 0; "
            "icd9.is_valid('4019'); assert icd9._tables.cache_info().currsize == 1")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_check_is_consistent_with_age_ranges_everywhere():
    """Every edited billable code, at every whole age 0..124 and both sexes, vectorised."""
    table = icd9.edit_table()
    codes = np.array([c for c in icd9.billable_codes() if c in table])
    ages = np.arange(125)
    cc, aa = np.meshgrid(np.arange(len(codes)), ages, indexing="ij")
    for sex in "FM":
        got = icd9.violations(codes[cc.ravel()].tolist(), aa.ravel(), sex).reshape(cc.shape)
        ranges = icd9.age_ranges()
        for i, code in enumerate(codes):
            edits = table[code]
            expect_sex = ("sex_female_only" in edits and sex == "M") or ("sex_male_only" in edits and sex == "F")
            if expect_sex:
                assert set(got[i]) == {edits[0]}, code
                continue
            ok = np.ones(125, dtype=bool)
            for e in edits:
                if e in ranges:
                    ok &= (ages >= ranges[e][0]) & (ages <= ranges[e][1])
            assert ((got[i] == "") == ok).all(), code
