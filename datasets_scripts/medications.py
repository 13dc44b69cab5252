"""Medication codes: the two-level hierarchy drug name -> formulary code, read from the prescriptions.

A medication code is ``"<NAME>//<FORMULARY>"``: the category is the drug name (MIMIC's ``drug``
column) and the code the hospital formulary product (``formulary_drug_cd``) under it, e.g.
``"VANCOMYCIN//VANC1F"`` in category ``"VANCOMYCIN"``. Both parts are normalised
(:func:`normalize_name`: stripped, runs of whitespace made one space, upper-case, so that MIMIC's
tall-man lettering ``"CefePIME"`` and ``"Cefepime"`` are one drug); a row without a formulary
code gets ``"UNK"`` (the MIMIC-IV MEDS extraction's word for a missing component).

Why this hierarchy and not ATC class -> drug: no permissively licensed source maps drug names to
ATC offline (the WHO ATC index may not be redistributed; the PyPI packages that reach it query
RxNav over the network), and a mapping written by hand would cover only the drugs someone
thought of. The name and the formulary code are in every MIMIC-III and MIMIC-IV prescriptions
row; ``drug_name_generic`` is not (MIMIC-IV has no such column; it is empty on 4,626 of the
demo's 10,398 rows), so the category is ``drug``. The vocabulary is the cohort's own: formulary
codes are local to the hospital, so there is no table to ship and validity is a matter of shape
(:func:`is_valid`).

Rows of ``drug_type`` ``BASE`` (the IV base solution of a mixture: D5W, NS, sterile water...) are
dropped by the readers (``BASE_DRUG_TYPE``): they are the vehicle of the drug, not a treatment;
``MAIN`` and ``ADDITIVE`` rows (a drug added to a base, e.g. potassium chloride) are kept.
"""

from __future__ import annotations

import re

SYSTEM = "drug_formulary"
SEPARATOR = "//"  # between the drug name and the formulary code (the MEDS component separator)
UNKNOWN = "UNK"  # the formulary part of a row without a formulary code
BASE_DRUG_TYPE = "BASE"  # drug_type of the IV base solutions the readers drop
_SPACES = re.compile(r"\s+")


def normalize_name(name: str) -> str:
    """A drug name or formulary code as it is kept: stripped, whitespace runs made one space,
    upper-case, ``"//"`` made ``"/"`` (so the separator stays unique). TypeError on a non-string."""
    if not isinstance(name, str):
        raise TypeError(f"drug name must be a str, got {type(name).__name__} {name!r}")
    return _SPACES.sub(" ", name).strip().upper().replace(SEPARATOR, "/")


def make_code(name: str, formulary: str | None) -> str:
    """``"<NAME>//<FORMULARY>"`` from a drug name and its formulary code (None or blank: ``"UNK"``).

    ValueError for a name that is empty once normalised."""
    n = normalize_name(name)
    if not n:
        raise ValueError(f"empty drug name {name!r}")
    f = normalize_name(formulary) if formulary is not None else ""
    return f"{n}{SEPARATOR}{f or UNKNOWN}"


def is_valid(code) -> bool:
    """True for a string ``"<NAME>//<FORMULARY>"`` with both parts non-empty and already normalised."""
    if not isinstance(code, str):
        return False
    name, sep, formulary = code.partition(SEPARATOR)
    return (bool(sep) and bool(name) and bool(formulary) and normalize_name(name) == name
            and normalize_name(formulary) == formulary)


def category(code: str) -> str:
    """The drug name of a medication code (``"VANCOMYCIN//VANC1F"`` -> ``"VANCOMYCIN"``); ValueError
    for a string that is not a medication code."""
    if not is_valid(code):
        raise ValueError(f"{code!r} is not a medication code '<NAME>//<FORMULARY>'")
    return code.partition(SEPARATOR)[0]


def formulary(code: str) -> str:
    """The formulary part of a medication code (``"UNK"`` when the row had none)."""
    if not is_valid(code):
        raise ValueError(f"{code!r} is not a medication code '<NAME>//<FORMULARY>'")
    return code.partition(SEPARATOR)[2]


__all__ = ["BASE_DRUG_TYPE", "SEPARATOR", "SYSTEM", "UNKNOWN", "category", "formulary", "is_valid", "make_code",
           "normalize_name"]
