"""PromptEHR-HF: synthetic MIMIC-style patients from a BART model with demographic prompts.

The public API, imported on first use so that ``import promptehr_hf`` stays fast::

    from promptehr_hf import (
        PromptEHRConfig, PromptEHRForConditionalGeneration, PromptEHRTokenizer,
        PromptEHRTrainer, PromptEHRTrainingArguments, generate_patients,
    )

The data flow, and the only direction imports take between the sub-packages::

    file_utils -> datasets_scripts (cohorts, ICD-9-CM) -> tokenization -> modeling_promptehr (config, model)
        -> modeling_promptehr.generation -> modeling_promptehr.training -> metrics

with one exception: training may use metrics (its generation monitor scores a small cohort).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "datasets_scripts.cohort_io": ("patients_to_dataset", "write_mimic3_csvs", "write_parquet"),
    "datasets_scripts.cohort": ("CohortBuilder", "load_cohort"),
    "datasets_scripts.meds_io": ("read_meds", "write_meds"),
    "datasets_scripts.mimic3": ("read_mimic3",),
    "datasets_scripts.mimic4": ("read_mimic4",),
    "datasets_scripts.prepare": ("load_prepared", "prepare"),
    "datasets_scripts.simulator": ("simulate",),
    "tokenization.tokenization_promptehr": ("PromptEHRTokenizer",),
    "modeling_promptehr.configuration_promptehr": ("PromptEHRConfig",),
    "modeling_promptehr.modeling_promptehr": ("PromptEHRForConditionalGeneration", "PromptEHRModel"),
    "modeling_promptehr.generation.prior": ("CohortPrior",),
    "modeling_promptehr.generation.config": ("PromptEHRGenerationConfig",),
    "modeling_promptehr.generation.pipeline": ("generate_patients", "save_custom_generate"),
    "modeling_promptehr.generation.decoding": ("visit_decoding",),
    "modeling_promptehr.generation.processors": ("visit_logits_processors",),
    "modeling_promptehr.generation.command": ("load_model", "write_cohort"),
    "modeling_promptehr.training.data": ("PromptEHRDataCollator", "build_examples"),
    "modeling_promptehr.training.losses": ("CooccurrenceLoss", "category_cooccurrence"),
    "modeling_promptehr.training.training_args": ("PromptEHRTrainingArguments",),
    "modeling_promptehr.training.trainer": ("PromptEHRTrainer",),
    "modeling_promptehr.training.callbacks": ("GenerationMonitorCallback", "TimeBudgetCallback"),
    "metrics.report": ("evaluate_cohorts",),
    "metrics.baselines": ("IndependentMarginalSampler",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # static analysers see the real names
    from .datasets_scripts.cohort_io import patients_to_dataset, write_mimic3_csvs, write_parquet  # noqa: F401
    from .modeling_promptehr.configuration_promptehr import PromptEHRConfig  # noqa: F401
    from .modeling_promptehr.generation.pipeline import generate_patients  # noqa: F401
    from .modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration  # noqa: F401
    from .modeling_promptehr.training.trainer import PromptEHRTrainer  # noqa: F401
    from .modeling_promptehr.training.training_args import PromptEHRTrainingArguments  # noqa: F401
    from .tokenization.tokenization_promptehr import PromptEHRTokenizer  # noqa: F401


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'promptehr_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
