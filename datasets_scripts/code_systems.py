"""The diagnosis code systems a cohort can be written in, by name.

``CODE_SYSTEMS`` maps each name to its module (:mod:`.icd9` for ``"icd9cm"``, :mod:`.icd10` for
``"icd10cm"``); both modules have the same functions (``normalize``, ``is_valid``,
``is_billable``, ``category``, ``title``, ``edits_of``, ``check``, ``violations``, ...), so a
caller looks its module up once with :func:`code_system` and calls it. ``"icd9cm"`` is the
default everywhere (MIMIC-III, and every cohort that does not say otherwise).
"""

from __future__ import annotations

from types import MappingProxyType, ModuleType

from promptehr_hf.datasets_scripts import icd9, icd10

DEFAULT_CODE_SYSTEM = icd9.SYSTEM
CODE_SYSTEMS = MappingProxyType({icd9.SYSTEM: icd9, icd10.SYSTEM: icd10})
# How messages and reports name each system's tables.
LABELS = MappingProxyType({icd9.SYSTEM: "ICD-9-CM v32", icd10.SYSTEM: f"ICD-10-CM {icd10.VERSION}"})


def code_system(name: str) -> ModuleType:
    """The module of a code system: ``code_system("icd10cm")`` is :mod:`.icd10`.

    Raises ValueError (one line naming the accepted names) for any other name.
    """
    module = CODE_SYSTEMS.get(name) if isinstance(name, str) else None
    if module is None:
        raise ValueError(f"unknown code system {name!r}; expected one of {', '.join(map(repr, CODE_SYSTEMS))}")
    return module


__all__ = ["CODE_SYSTEMS", "DEFAULT_CODE_SYSTEM", "LABELS", "code_system"]
