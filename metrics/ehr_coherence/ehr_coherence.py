"""`ehr_coherence`: an `evaluate` metric scoring a synthetic EHR cohort against a real one.

Inputs (the declared features) are the synthetic cohort's columns; the real cohort, whose size
differs, is a keyword argument. The synthetic cohort's optional procedures and medications are
keyword arguments of ``compute`` too (an `evaluate` module cannot declare an optional feature),
one entry per synthetic patient in the order the patients were given. The computation lives in
`promptehr_hf.metrics.coherence` (installed with promptehr-hf), whose docstring defines every
figure; it is this module's description.
"""

import evaluate

from promptehr_hf.datasets_scripts.schema import COHORT_FEATURES
from promptehr_hf.metrics import coherence as _coherence

_CITATION = """\
@inproceedings{wang2022promptehr,
  title={PromptEHR: Conditional Electronic Healthcare Records Generation with Prompt Learning},
  author={Wang, Zifeng and Sun, Jimeng},
  booktitle={EMNLP},
  year={2022}
}
@article{theodorou2023halo,
  title={Synthesize high-dimensional longitudinal electronic health records via hierarchical
         autoregressive language model},
  author={Theodorou, Brandon and Xiao, Cao and Sun, Jimeng},
  journal={Nature Communications},
  year={2023}
}
"""

_DESCRIPTION = _coherence.__doc__

_KWARGS_DESCRIPTION = """
Args:
    visits (`list[list[list[str]]]`): per synthetic patient, its visits in order, each a list of
        dotless codes of `code_system`.
    age (`list[float]`): per synthetic patient, age in years at the first visit.
    sex (`list[str]`): per synthetic patient, "F" or "M".
    real: the real (reference) cohort, any size: a list of patient dicts
        {"visits", "age", "sex", ...}, a `datasets.Dataset` with those columns, or a dict of
        columns, with `procedures` / `medications` when it carries them. Required.
    procedures (`list[list[list[str]] | None]`, optional): per synthetic patient (all of them,
        also those given with `add_batch`), one list of procedure codes per visit.
    medications (`list[list[list[str]] | None]`, optional): the same for "<NAME>//<FORMULARY>"
        medication codes. A modality is scored, on its own and against the diagnoses, when both
        the synthetic and the real cohort carry it; without them the output is the
        diagnosis-only one.
    top_k (`int`, default 100): k of the top-k code overlap.
    min_real_count (`int`, default 10): real visit occurrences for a code to count in
        `code_coverage_frequent`.
    code_system (`str`, default "icd9cm"): the cohorts' code system, "icd9cm" (ICD-9-CM) or
        "icd10cm" (ICD-10-CM): their normalisation, categories, validity and CMS edits.
Returns:
    A flat dict: code_js, category_js, top_k, top_k_overlap, top_k_jaccard, r2_code_prevalence,
    r2_pair_prevalence, r2_consecutive_prevalence, cooccurrence_score, cooccurrence_seen_share,
    cms_invalid_code_rate, cms_invalid_patient_rate, cms_invalid_patient_rate_real,
    unknown_code_rate, duplicate_rate, distinct_codes, distinct_codes_real, code_coverage,
    code_coverage_frequent, top_code, top_code_share, top_code_share_real, distinct_patient_share,
    visits_per_patient_{mean,mean_real,wasserstein,tv}, codes_per_visit_{mean,mean_real,wasserstein,tv},
    age_wasserstein, female_share, female_share_real, n_synthetic_patients, n_real_patients,
    and per modality scored `<modality>_*` and `r2_pair_diagnosis_procedure` /
    `r2_pair_diagnosis_medication` (definitions in the description).
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("metrics/ehr_coherence")  # path of this folder
    >>> real = [{"visits": [["4019", "25000"], ["4019", "41401"]], "age": 64.0, "sex": "M"},
    ...         {"visits": [["V3000", "7742"]], "age": 0.0, "sex": "F"}]
    >>> out = metric.compute(visits=[p["visits"] for p in real], age=[p["age"] for p in real],
    ...                      sex=[p["sex"] for p in real], real=real)
    >>> out["code_js"], out["r2_pair_prevalence"], out["top_k_overlap"]
    (0.0, 1.0, 1.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EhrCoherence(evaluate.Metric):
    """Fidelity, validity, diversity and structure of a synthetic EHR cohort."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=COHORT_FEATURES,
            reference_urls=["https://arxiv.org/abs/2211.01761", "https://arxiv.org/abs/2304.02169"],
        )

    def _compute(self, visits, age, sex, real=None, top_k=100, min_real_count=10, code_system="icd9cm",
                 procedures=None, medications=None):
        if real is None:
            raise ValueError("ehr_coherence needs the real cohort: compute(..., real=<patients>)")
        synthetic = {"visits": visits, "age": age, "sex": sex}
        for name, values in (("procedures", procedures), ("medications", medications)):
            if values is not None:
                if len(values) != len(visits):
                    raise ValueError(f"ehr_coherence: {len(values)} patients of {name} for {len(visits)} patients")
                synthetic[name] = list(values)
        return _coherence.coherence(synthetic, real, top_k=top_k, min_real_count=min_real_count,
                                    code_system=code_system)
