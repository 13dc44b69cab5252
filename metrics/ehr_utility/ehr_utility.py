"""`ehr_utility`: an `evaluate` metric measuring the utility of a synthetic EHR cohort by
training on it and testing on real patients (TSTR), beside the same model trained on real ones.

Inputs (the declared features) are the synthetic cohort's columns; the real training and
held-out cohorts, whose sizes differ, are keyword arguments, and so is the synthetic cohort's
optional `hospital_death` column (the mortality task). The computation lives in
`promptehr_hf.metrics.utility` (installed with promptehr-hf), whose docstring defines every
figure; it is this module's description.
"""

import evaluate

from promptehr_hf.datasets_scripts.schema import COHORT_FEATURES
from promptehr_hf.metrics import utility as _utility

_CITATION = """\
@article{theodorou2023halo,
  title={Synthesize high-dimensional longitudinal electronic health records via hierarchical
         autoregressive language model},
  author={Theodorou, Brandon and Xiao, Cao and Sun, Jimeng},
  journal={Nature Communications},
  year={2023}
}
@article{harutyunyan2019multitask,
  title={Multitask learning and benchmarking with clinical time series data},
  author={Harutyunyan, Hrayr and Khachatrian, Hrant and Kale, David C and Ver Steeg, Greg and Galstyan, Aram},
  journal={Scientific Data},
  year={2019}
}
"""

_DESCRIPTION = _utility.__doc__

_KWARGS_DESCRIPTION = """
Args:
    visits (`list[list[list[str]]]`): per synthetic patient, its visits in order, each a list of
        dotless codes of `code_system`.
    age (`list[float]`): per synthetic patient, age in years at the first visit.
    sex (`list[str]`): per synthetic patient, "F" or "M".
    real_train: real patients to train the reference models on (required): a list of patient
        dicts {"visits", "age", "sex", "hospital_death", ...}, a `datasets.Dataset` or a dict of
        columns (the generator's training split).
    real_test: held-out real patients both models are tested on (required), same forms.
    hospital_death (`list[bool]`, optional): per synthetic patient, died during the last visit;
        without it the synthetic side of the mortality task is skipped.
    tasks (`tuple[str]`, default all): task groups, some of "mortality", "next_admission", "phenotype".
    n_bootstrap (`int`, default 200): resamples of the test patients for the 95% intervals.
    seed (`int`, default 0): resampling seed.
    n_next (`int`, default 20), n_phenotype (`int`, default 25): targets per group.
    C (`float`, default 1.0): inverse L2 strength of the logistic regressions.
    code_system (`str`, default "icd9cm"): "icd9cm" or "icd10cm".
Returns:
    A dict: per group g in mortality, next_admission, phenotype: g_auroc, g_auprc (synthetic-
    trained, mean over the group's tasks), g_auroc_real, g_auprc_real (real-trained), g_*_ratio
    (synthetic / real), g_*_ci_low / g_*_ci_high (bootstrap 95%), g_tasks, g_skipped; "tasks"
    (per task: both sides' AUROC, AUPRC, intervals, ratios, sizes), "skipped" (task: reason) and
    "meta" (definitions in the description).
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("metrics/ehr_utility")  # path of this folder
    >>> def patient(a, age):  # visit 2 holds 250 exactly when visit 1 holds 401
    ...     return {"visits": [["4019"] if a else ["486"], ["25000"] if a else ["5990"]], "age": age, "sex": "F"}
    >>> real = [patient(i % 2 == 0, 40.0 + i % 50) for i in range(200)]
    >>> out = metric.compute(visits=[p["visits"] for p in real], age=[p["age"] for p in real],
    ...                      sex=[p["sex"] for p in real], real_train=real, real_test=real,
    ...                      tasks=("next_admission",), n_bootstrap=50)
    >>> out["tasks"]["next_admission_250"]["synthetic"]["auroc"], out["next_admission_auroc_ratio"]
    (1.0, 1.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EhrUtility(evaluate.Metric):
    """Train on synthetic, test on real: mortality, next-admission and phenotype AUROC/AUPRC."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=COHORT_FEATURES,
            reference_urls=["https://arxiv.org/abs/2304.02169", "https://arxiv.org/abs/1703.07771"],
        )

    def _compute(self, visits, age, sex, real_train=None, real_test=None, hospital_death=None,
                 tasks=_utility.TASKS, n_bootstrap=200, seed=0, n_next=20, n_phenotype=25, C=_utility.C_DEFAULT,
                 code_system="icd9cm"):
        if real_train is None or real_test is None:
            raise ValueError("ehr_utility needs compute(..., real_train=<patients>, real_test=<patients>)")
        synthetic = {"visits": visits, "age": age, "sex": sex}
        if hospital_death is not None:
            if len(hospital_death) != len(visits):
                raise ValueError(f"hospital_death has {len(hospital_death)} values for {len(visits)} patients")
            synthetic["hospital_death"] = list(hospital_death)
        return _utility.utility(synthetic, real_train, real_test, code_system=code_system, tasks=tuple(tasks),
                                n_bootstrap=n_bootstrap, seed=seed, n_next=n_next, n_phenotype=n_phenotype, C=C)
