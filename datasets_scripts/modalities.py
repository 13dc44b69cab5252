"""Procedures and medications of a MIMIC folder: rows -> per-visit code lists, every dropped row counted.

The MIMIC-III and MIMIC-IV readers (`mimic3.read_mimic3`, `mimic4.read_mimic4`) parse their own
PROCEDURES_ICD / PRESCRIPTIONS columns and hand the rows here; the visits are the admissions the
diagnoses kept (an admission without a valid diagnosis is no visit, whatever its procedures or
prescriptions). Each row is counted under the first rule that drops it, in this order:

Procedures (``PROCEDURE_QUIRKS``):

- ``icd9_rows``: MIMIC-IV rows with icd_version 9 in an ICD-10 cohort (no ICD-9 -> ICD-10-PCS
  mapping is shipped; MIMIC-III has none);
- ``empty_codes``; ``invalid_codes``: not a node of the procedure tables (`procedures`), with
  examples in the summary (MIMIC-III keeps some codes deleted before v32, e.g. ``3605``);
- ``rows_without_admission``: no hadm_id, or one not in ADMISSIONS (or of an unknown patient);
- ``rows_at_dropped_admissions``: the admission is no visit;
- ``duplicate_codes``: the code again in the same admission (the first ``seq_num`` kept).

Medications (``MEDICATION_QUIRKS``):

- ``base_fluid_rows``: ``drug_type`` BASE, the IV base solutions (`medications`);
- ``empty_drug_names``;
- ``rows_without_admission``, ``rows_at_dropped_admissions`` as above;
- ``duplicate_codes``: the same ``<NAME>//<FORMULARY>`` again in the same admission (the
  earliest start kept: one drug is often ordered many times in a stay).

``missing_formulary_codes`` counts rows kept with the formulary part ``UNK`` (counted among the
rows with a drug name, before the admission rules). Codes of a visit are ordered by ``seq_num``
(procedures) or start time (medications), missing last, then by file row.
"""

from __future__ import annotations

import gc

import numpy as np
import pandas as pd

from promptehr_hf.datasets_scripts import medications
from promptehr_hf.datasets_scripts.procedures import ProcedureCodes

N_EXAMPLES = 10  # examples of invalid codes shown in a summary
PROCEDURE_QUIRKS = ("icd9_rows", "empty_codes", "invalid_codes", "rows_without_admission",
                    "rows_at_dropped_admissions", "duplicate_codes")
MEDICATION_QUIRKS = ("base_fluid_rows", "empty_drug_names", "missing_formulary_codes", "rows_without_admission",
                     "rows_at_dropped_admissions", "duplicate_codes")
_TEXT = {
    "icd9_rows": "ICD-9 procedure rows were dropped (no ICD-9 -> ICD-10-PCS mapping is shipped)",
    "empty_codes": "rows with an empty code were dropped",
    "invalid_codes": "rows with a code that is not in the {label} tables were dropped",
    "base_fluid_rows": "rows of drug_type BASE (IV base solutions) were dropped",
    "empty_drug_names": "rows with an empty drug name were dropped",
    "missing_formulary_codes": "rows without a formulary_drug_cd were kept with the formulary code UNK",
    "rows_without_admission": "rows without a hadm_id in ADMISSIONS (or whose admission has no patient) were dropped",
    "rows_at_dropped_admissions": "rows of admissions dropped for having no valid diagnosis were dropped",
    "other_system_rows": "rows of the other ICD version were dropped",
    "rows_outside_admissions": "rows outside every admission were dropped",
    "duplicate_codes": "repeated codes inside one admission were dropped (first kept)",
}


def procedure_codes(raw: pd.Series, system: ProcedureCodes, rows: np.ndarray,
                    quirks: dict) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Normalise and check the code column (strings, missing allowed) once per distinct value.

    rows: the data rows still in play. Counts ``empty_codes`` and ``invalid_codes`` among them.
    Returns (code id per data row into the names, -1 for empty or invalid; names; invalid
    examples [{"code", "rows", "first_data_row"}], most frequent first).
    """
    raw_id, raw_names = pd.factorize(raw)  # missing -> -1
    names = [system.normalize(c) for c in raw_names] + [""]  # the trailing "" is the missing code's
    norm_id, uniq = pd.factorize(pd.Series(names, dtype=object))
    uniq = np.asarray(uniq, dtype=object)
    code = norm_id[raw_id]
    empty = uniq[code[rows]] == ""
    valid = np.array([bool(c) and system.is_valid(c) for c in uniq], dtype=bool)
    invalid = ~empty & ~valid[code[rows]]
    quirks["empty_codes"] = int(empty.sum())
    quirks["invalid_codes"] = int(invalid.sum())
    examples = _examples(rows[invalid], code[rows[invalid]], uniq)
    out = np.full(len(raw), -1, dtype=np.int64)
    good = rows[~empty & ~invalid]
    out[good] = code[good]
    return out, uniq, examples


def medication_codes(drug: pd.Series, formulary: pd.Series | None, drug_type: pd.Series | None,
                     quirks: dict) -> tuple[np.ndarray, np.ndarray]:
    """``<NAME>//<FORMULARY>`` per row, normalised once per distinct value and built once per
    distinct (name, formulary) pair.

    Counts ``base_fluid_rows``, ``empty_drug_names`` and ``missing_formulary_codes``. Returns
    (code id per data row into the names, -1 for a dropped row; names).
    """
    n = len(drug)
    base = np.zeros(n, dtype=bool)
    if drug_type is not None:  # compared once per distinct value: MIMIC-IV has ~17 million rows
        type_id, types = pd.factorize(drug_type)
        is_base = np.array([str(t).strip().upper() == medications.BASE_DRUG_TYPE for t in types] + [False])
        base = is_base[type_id]
    name_id, name_uniq = _normalised_ids(drug)
    if formulary is None:
        form_id, form_uniq = np.zeros(n, dtype=np.int64), np.array([""], dtype=object)
    else:
        form_id, form_uniq = _normalised_ids(formulary)
    empty = ~base & (name_uniq[name_id] == "")
    keep = ~base & ~empty
    quirks["base_fluid_rows"] = int(base.sum())
    quirks["empty_drug_names"] = int(empty.sum())
    quirks["missing_formulary_codes"] = int((keep & (form_uniq[form_id] == "")).sum())
    pair_id, keys = pd.factorize(name_id * len(form_uniq) + form_id)
    forms = [f or medications.UNKNOWN for f in form_uniq.tolist()]
    pairs = np.array([f"{name_uniq[k // len(forms)]}{medications.SEPARATOR}{forms[k % len(forms)]}"
                      for k in keys.tolist()], dtype=object)
    return np.where(keep, pair_id, -1).astype(np.int64), pairs


def _normalised_ids(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(id per row, distinct normalised values) of a name column; a missing value is ""."""
    raw_id, raw = pd.factorize(column)  # missing -> -1
    normalised = [medications.normalize_name(str(x)) for x in raw] + [""]  # the trailing "" is the missing value's
    norm_id, uniq = pd.factorize(pd.Series(normalised, dtype=object))
    return norm_id[raw_id].astype(np.int64), np.asarray(uniq, dtype=object)


def place(hadm: np.ndarray, order: np.ndarray, code: np.ndarray, adm_hadm: np.ndarray, has_code: np.ndarray,
          quirks: dict) -> tuple[np.ndarray, np.ndarray]:
    """The rows with a code (id >= 0) -> (position in the admissions, code id), in visit order, one per
    (admission, code).

    hadm: [n] float (NaN: missing); order: [n] float sort key inside an admission (inf: missing);
    adm_hadm / has_code: the admissions' hadm_ids in visit order and whether each is a visit.
    Counts ``rows_without_admission``, ``rows_at_dropped_admissions`` and ``duplicate_codes``.
    """
    rows = np.flatnonzero(code >= 0)
    h = hadm[rows]
    pos = np.full(len(rows), -1, dtype=np.int64)
    known = ~np.isnan(h)
    pos[known] = pd.Index(adm_hadm).get_indexer(h[known].astype(np.int64))
    quirks["rows_without_admission"] = int((pos < 0).sum())
    at_visit = pos >= 0
    at_visit[at_visit] = has_code[pos[at_visit]]
    quirks["rows_at_dropped_admissions"] = int(((pos >= 0) & ~at_visit).sum())
    rows, pos = rows[at_visit], pos[at_visit]
    ordered = np.lexsort((rows, order[rows], pos))
    rows, pos = rows[ordered], pos[ordered]
    dup = pd.DataFrame({"pos": pos, "code": code[rows]}).duplicated().to_numpy()
    quirks["duplicate_codes"] = int(dup.sum())
    return pos[~dup], code[rows[~dup]]


def attach(patients: list[dict], field: str, pos: np.ndarray, code: np.ndarray, names: np.ndarray,
           has_code: np.ndarray) -> None:
    """Set ``patient[field]`` to its per-visit code lists, in place.

    patients: as `mimic3._assemble` built them from the admissions marked `has_code` (visits in
    admission-position order, patients consecutive); pos / code: `place`'s output.
    """
    visits = np.flatnonzero(has_code)
    counts = np.bincount(pos, minlength=len(has_code))[visits]
    bounds = np.r_[0, np.cumsum(counts)].tolist()
    flat = names[code].tolist()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # many small lists: the cyclic GC would rescan them all repeatedly
    try:
        lists = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        start = 0
        for p in patients:
            end = start + len(p["visits"])
            p[field] = lists[start:end]
            start = end
    finally:
        if gc_was_enabled:
            gc.enable()


def table_summary(file: str, rows_read: int, pos: np.ndarray, code: np.ndarray, names: np.ndarray, quirks: dict,
                  system: str, label: str, examples: list[dict] | None = None,
                  billable=None) -> tuple[dict, list[str]]:
    """The summary of one optional table and its messages (one line per non-zero count, naming the file).

    billable: the code system's ``is_billable`` (procedures), for ``non_billable_distinct_codes``.
    """
    distinct = names[np.unique(code)]
    out = {"code_system": system, "file": file, "rows_read": rows_read, "rows": len(code),
           "distinct_codes": len(distinct), "visits_with_codes": len(np.unique(pos)), "quirks": dict(quirks)}
    if billable is not None:
        out["non_billable_distinct_codes"] = int(sum(not billable(c) for c in distinct))
    if examples is not None:
        out["invalid_code_examples"] = examples
    lines = []
    for key, count in quirks.items():
        if count:
            line = f"{file}: {count} {_TEXT[key].format(label=label)}"
            if key == "invalid_codes" and examples:
                line += ", e.g. " + ", ".join(f"{e['code']} (x{e['rows']}, data row {e['first_data_row']})"
                                              for e in examples)
            lines.append(line)
    return out, lines


def _examples(bad_rows: np.ndarray, ids: np.ndarray, names: np.ndarray) -> list[dict]:
    """The most frequent codes among dropped rows (file order): [{"code", "rows", "first_data_row"}]."""
    if len(bad_rows) == 0:
        return []
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    top = np.lexsort((first, -counts))[:N_EXAMPLES]
    return [{"code": names[uniq[i]], "rows": int(counts[i]), "first_data_row": int(bad_rows[first[i]]) + 1}
            for i in top]
