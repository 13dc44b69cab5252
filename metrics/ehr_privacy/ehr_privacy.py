"""`ehr_privacy`: an `evaluate` metric measuring what a synthetic EHR cohort leaks about its
training patients, with held-out real patients as the control.

Inputs (the declared features) are the synthetic cohort's columns; the training and held-out
cohorts, whose sizes differ, are keyword arguments. The computation lives in
`promptehr_hf.metrics.privacy` (installed with promptehr-hf), whose docstring defines every
figure; it is this module's description.
"""

import evaluate

from promptehr_hf.datasets_scripts.schema import COHORT_FEATURES
from promptehr_hf.metrics import privacy as _privacy

_CITATION = """\
@article{theodorou2023halo,
  title={Synthesize high-dimensional longitudinal electronic health records via hierarchical
         autoregressive language model},
  author={Theodorou, Brandon and Xiao, Cao and Sun, Jimeng},
  journal={Nature Communications},
  year={2023}
}
@article{yale2020generation,
  title={Generation and evaluation of privacy preserving synthetic health data},
  author={Yale, Andrew and Dash, Saloni and Dutta, Ritik and Guyon, Isabelle and Pavao, Adrien and Bennett, Kristin P},
  journal={Neurocomputing},
  year={2020}
}
"""

_DESCRIPTION = _privacy.__doc__

_KWARGS_DESCRIPTION = """
Args:
    visits (`list[list[list[str]]]`): per synthetic patient, its visits in order, each a list of
        dotless codes of `code_system`.
    age (`list[float]`): per synthetic patient, age in years at the first visit.
    sex (`list[str]`): per synthetic patient, "F" or "M".
    train: the cohort the generator was trained on (required); a list of patient dicts
        {"visits", "age", "sex", ...}, a `datasets.Dataset` or a dict of columns.
    holdout: real patients of the same population the generator never saw (required), same forms.
    n_attack (`int`, default 2000): patients sampled per cohort for the attacks.
    n_known_codes (`int`, default 100): codes the attribute-inference attacker knows.
    attribute_k (`int`, default 1): neighbours voting in attribute inference.
    seed (`int`, default 0): sampling seed.
    code_system (`str`, default "icd9cm"): the cohorts' code system, "icd9cm" or "icd10cm" (how
        their codes are normalised).
Returns:
    A flat dict: exact_copy_rate, holdout_exact_copy_rate, membership_inference_accuracy,
    membership_inference_auc, aa_train, aa_holdout, nnaar, attribute_inference_f1,
    attribute_inference_f1_holdout, attribute_inference_risk, sex_inference_f1,
    sex_inference_f1_holdout, n_attack and the cohort sizes (definitions in the description).
Examples:
    >>> import evaluate
    >>> metric = evaluate.load("metrics/ehr_privacy")  # path of this folder
    >>> train = [{"visits": [["4019", "25000"]], "age": 64.0, "sex": "M"},
    ...          {"visits": [["486", "5990"]], "age": 71.0, "sex": "F"}]
    >>> holdout = [{"visits": [["4280", "42731"]], "age": 80.0, "sex": "M"},
    ...            {"visits": [["V3000"]], "age": 0.0, "sex": "F"}]
    >>> out = metric.compute(visits=[p["visits"] for p in train], age=[p["age"] for p in train],
    ...                      sex=[p["sex"] for p in train], train=train, holdout=holdout)
    >>> out["exact_copy_rate"], out["membership_inference_accuracy"]  # a copy of the training set
    (1.0, 1.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EhrPrivacy(evaluate.Metric):
    """Exact copies, membership and attribute inference, NNAAR of a synthetic EHR cohort."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=COHORT_FEATURES,
            reference_urls=["https://arxiv.org/abs/2304.02169", "https://arxiv.org/abs/1806.01320"],
        )

    def _compute(self, visits, age, sex, train=None, holdout=None, n_attack=2000, n_known_codes=100,
                 attribute_k=1, seed=0, code_system="icd9cm"):
        if train is None or holdout is None:
            raise ValueError("ehr_privacy needs compute(..., train=<patients>, holdout=<patients>)")
        synthetic = {"visits": visits, "age": age, "sex": sex}
        return _privacy.privacy(synthetic, train, holdout, n_attack=n_attack, n_known_codes=n_known_codes,
                                attribute_k=attribute_k, seed=seed, code_system=code_system)
