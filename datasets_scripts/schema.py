"""The one patient schema every part of the package reads and writes.

A patient is ``{"subject_id": int, "age": float, "sex": "F" | "M", "visits": list[list[str]]}``:
age in years at the first admission (capped at 90), visits in admission order, each a list of
dotless ICD-9-CM diagnosis codes in ``seq_num`` order with no duplicates.
"""

from __future__ import annotations

from datasets import Features, List, Value

PATIENT_FEATURES = Features(
    {
        "subject_id": Value("int64"),
        "age": Value("float32"),
        "sex": Value("string"),
        "visits": List(List(Value("string"))),
    }
)

# What the metric modules take per synthetic patient (no subject_id: ids carry no meaning there).
COHORT_FEATURES = Features({name: PATIENT_FEATURES[name] for name in ("visits", "age", "sex")})

SEXES = ("F", "M")  # x_cat index: F = 0, M = 1
AGE_CAP = 90.0  # MIMIC shifts ages over 89 to ~300; they are capped here
