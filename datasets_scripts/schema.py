"""The one patient schema every part of the package reads and writes.

A patient is::

    {"subject_id": int, "age": float, "sex": "F" | "M", "visits": list[list[str]],
     "stay_days": list[float] | None, "gap_days": list[float] | None,
     "hospital_death": bool | None, "death_days": float | None}

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

The age at visit k is ``age + (sum(stay_days[:k]) + sum(gap_days[:k + 1])) / 365.25`` (days of
365.25 per year), the age at discharge of the last visit ``age + (sum(stay_days) +
sum(gap_days)) / 365.25`` and the age at an outside death that plus ``death_days / 365.25``.
"""

from __future__ import annotations

import numpy as np
from datasets import Features, List, Value

TIME_FIELDS = ("stay_days", "gap_days", "hospital_death", "death_days")

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
