"""The one patient schema every part of the package reads and writes.

A patient is::

    {"subject_id": int, "age": float, "sex": "F" | "M", "visits": list[list[str]],
     "stay_days": list[float] | None, "gap_days": list[float] | None,
     "hospital_death": bool | None, "death_days": float | None,
     "procedures": list[list[str]] | None, "medications": list[list[str]] | None}

- ``age``: years at the first admission (capped at 90);
- ``visits``: in admission order, each a list of dotless diagnosis codes (ICD-9-CM or ICD-10-CM,
  one system per cohort) in ``seq_num`` order with no duplicates.

The four time fields (``TIME_FIELDS``) are optional: all four are null when the cohort has no
times (an old file, a folder without discharge times, a time-free simulation); a patient dict
without the keys reads as all four null (``with_times``). When present:

- ``stay_days`` (float32, one per visit, >= 0): length of stay, discharge minus admission, in days;
- ``gap_days`` (float32, one per visit, >= 0): days from the previous visit's discharge to this
  admission; 0.0 for the first visit;
- ``hospital_death`` (bool): the patient died during their last visit (at its discharge);
- ``death_days`` (float32 or null): days from the last discharge to a death outside hospital;
  null when no death (or no time of death) is known, or when the death was in hospital.

Procedures and medications (``MODALITY_FIELDS``) are optional too, each on its own: per visit
(parallel to ``visits``), a list of codes, or null for the whole patient when the cohort has no
such table. A patient dict holds the key only when the cohort has that table (the readers leave
it out otherwise); a missing key reads as null (``with_modalities``), so every dict written before
these fields existed is a patient without them. When present:

- ``procedures``: per visit, the dotless procedure codes in ``seq_num`` order, no duplicates
  (ICD-9-CM volume 3 with ICD-9-CM diagnoses, ICD-10-PCS with ICD-10-CM: the ``procedures``
  module);
  a visit without procedures has ``[]``;
- ``medications``: per visit, ``"<DRUG NAME>//<FORMULARY CODE>"`` codes in order of their first
  prescription, no duplicates (the ``medications`` module); a visit without prescriptions has ``[]``.

The age at visit k is ``age + (sum(stay_days[:k]) + sum(gap_days[:k + 1])) / 365.25`` (days of
365.25 per year), the age at discharge of the last visit ``age + (sum(stay_days) +
sum(gap_days)) / 365.25`` and the age at an outside death that plus ``death_days / 365.25``.
"""

from __future__ import annotations

import numpy as np
from datasets import Features, List, Value

TIME_FIELDS = ("stay_days", "gap_days", "hospital_death", "death_days")
MODALITY_FIELDS = ("procedures", "medications")  # optional per-visit code lists beside the diagnoses

PATIENT_FEATURES = Features(
    {
        "subject_id": Value("int64"),
        "age": Value("float32"),
        "sex": Value("string"),
        "visits": List(List(Value("string"))),
        "stay_days": List(Value("float32")),
        "gap_days": List(Value("float32")),
        "hospital_death": Value("bool"),
        "death_days": Value("float32"),
        "procedures": List(List(Value("string"))),
        "medications": List(List(Value("string"))),
    }
)

# What the metric modules take per synthetic patient (no subject_id: ids carry no meaning there).
COHORT_FEATURES = Features({name: PATIENT_FEATURES[name] for name in ("visits", "age", "sex")})

SEXES = ("F", "M")  # x_cat index: F = 0, M = 1
AGE_CAP = 90.0  # MIMIC shifts ages over 89 to ~300; they are capped here
NO_TIMES = dict.fromkeys(TIME_FIELDS)  # the time fields of a patient without times


def with_times(patient: dict) -> dict:
    """The patient dict with every key of PATIENT_FEATURES: a missing time field is None (no copy
    when nothing is missing)."""
    if all(k in patient for k in TIME_FIELDS):
        return patient
    return {**patient, **{k: None for k in TIME_FIELDS if k not in patient}}


def with_modalities(patient: dict) -> dict:
    """The patient dict with both MODALITY_FIELDS keys, a missing one None (no copy when both are there)."""
    if all(k in patient for k in MODALITY_FIELDS):
        return patient
    return {**patient, **{k: None for k in MODALITY_FIELDS if k not in patient}}


def without_null_modalities(patient: dict) -> dict:
    """The patient dict without its MODALITY_FIELDS keys that are None (how the readers give a
    patient of a cohort without that table); no copy when there is none."""
    if all(patient.get(k, ()) is not None for k in MODALITY_FIELDS):
        return patient
    return {k: v for k, v in patient.items() if not (k in MODALITY_FIELDS and v is None)}


def float32_times(patient: dict) -> dict:
    """The patient with its time fields as a Dataset (float32) stores them, as Python floats; a
    missing time field is None. Readers return these values, so a dict from a producer computing in
    float64 compares equal to its read-back form after this."""
    p = with_times(patient)
    return {**p, "stay_days": None if p["stay_days"] is None else [_f32(x) for x in p["stay_days"]],
            "gap_days": None if p["gap_days"] is None else [_f32(x) for x in p["gap_days"]],
            "death_days": _f32(p["death_days"]),
            "hospital_death": None if p["hospital_death"] is None else bool(p["hospital_death"])}


def _f32(x) -> float | None:
    return None if x is None else float(np.float32(x))
