"""What the ICD-9-CM and ICD-10-CM modules share: the parsed hierarchy, the CMS Medicare Code
Editor's edit names, and the checks of a code against a patient's age and sex.

``icd9`` and ``icd10`` read their own tables (lazily) and pass them here; this module reads no
file and has no state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

SEX_EDITS = ("sex_female_only", "sex_male_only")
AGE_EDITS = ("age_newborn", "age_pediatric", "age_maternity", "age_adult")
EDITS = SEX_EDITS + AGE_EDITS  # the order check() tests them in
SEX_CONFLICT = {"sex_female_only": "M", "sex_male_only": "F"}  # the sex each sex edit forbids


class Tables:
    """The parsed hierarchy rows ``[code, parent, billable, title]`` (pre-order): per node its
    parent, billable flag, title and children (in row order)."""

    def __init__(self, rows: list[list]):
        self.order = [r[0] for r in rows]
        self.parent = {r[0]: r[1] for r in rows}
        self.billable = frozenset(r[0] for r in rows if r[2])
        self.title = {r[0]: r[3] for r in rows}
        self.children: dict[str, list[str]] = {c: [] for c in self.order}
        for code, parent in self.parent.items():
            if parent is not None:
                self.children[parent].append(code)

    def lineage(self, node: str) -> list[str]:
        """[node, its parent, ..., its chapter]."""
        out = [node]
        while self.parent[out[-1]] is not None:
            out.append(self.parent[out[-1]])
        return out


def parse_edits(data: Mapping, source: object) -> tuple[MappingProxyType, dict[str, tuple[int, int]]]:
    """An edits file's ``{"edits": {edit: [codes]}, "age_ranges": {edit: [lo, hi]}}`` ->
    (read-only node -> its edits in EDITS order, age edit -> (lo, hi) allowed whole-year ages).
    ValueError naming ``source`` for an edit name outside EDITS."""
    unknown = set(data["edits"]) - set(EDITS)
    if unknown:
        raise ValueError(f"{source}: unknown edits {sorted(unknown)}")
    per_code: dict[str, list[str]] = {}
    for edit in EDITS:  # EDITS order, so each code's tuple is in check() order
        for code in data["edits"].get(edit, ()):
            per_code.setdefault(code, []).append(edit)
    table = MappingProxyType({c: tuple(es) for c, es in per_code.items()})
    return table, {k: (int(lo), int(hi)) for k, (lo, hi) in data["age_ranges"].items()}


def edit_bits(table: Mapping[str, tuple[str, ...]]) -> dict[str, int]:
    """node -> bit mask of its edits (bit k = EDITS[k])."""
    return {c: sum(1 << EDITS.index(e) for e in es) for c, es in table.items()}


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


def check(edits: tuple[str, ...], ranges: Mapping[str, tuple[int, int]], age: float, sex: str) -> str | None:
    """The first of ``edits`` (in EDITS order) broken by a patient of this age (years) and sex,
    or None; TypeError / ValueError for an age outside [0, 125) or a sex other than F / M."""
    sex, years = _sex_letter(sex), _whole_years(age)
    for edit in edits:
        if edit in SEX_CONFLICT:
            if sex == SEX_CONFLICT[edit]:
                return edit
        elif not ranges[edit][0] <= years <= ranges[edit][1]:
            return edit
    return None


def violations(codes: Sequence[str], ages, sexes, bits: Mapping[str, int], ranges: Mapping[str, tuple[int, int]],
               normalize: Callable[[str], str]):
    """:func:`check` vectorised over n (code, age, sex): numpy str array [n], ``""`` for none.

    ``bits``: :func:`edit_bits` of the system's edit table; ``normalize``: its code normaliser.
    ``ages`` and ``sexes`` are one value or n values.
    """
    import numpy as np

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
    has_bits = np.fromiter((bits.get(normalize(c), 0) for c in codes), dtype=np.int64, count=n)
    out = np.full(n, "", dtype=f"<U{max(map(len, EDITS))}")
    # Assign in reverse check() order so the first broken edit in EDITS order wins.
    for k in reversed(range(len(EDITS))):
        edit = EDITS[k]
        has = (has_bits >> k) & 1 == 1
        if not has.any():  # also: a system without age edits (procedures) has no range for them
            continue
        if edit in SEX_CONFLICT:
            broken = is_m if SEX_CONFLICT[edit] == "M" else is_f
        else:
            lo, hi = ranges[edit]
            broken = (years < lo) | (years > hi)
        out[has & broken] = edit
    return out
