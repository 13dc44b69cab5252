"""Calibration after training, from unconditional patients the trained model generates; nothing but
the training split is used.

- Category calibration: how far each category's share of generated visits is from its share of
  training visits, as the log-ratio that generation adds to its score
  (``PromptEHRGenerationConfig.category_calibration``). A model trained for minutes spreads its
  probability more evenly than the data: a category present in a large minority of visits
  (hypertension in about 37%) comes out a few points too often, and rare ones too seldom. Measured
  on a draw with the calibration off.
- Time calibration: the time model's heads draw stays, gaps and deaths from each visit's codes;
  over the generated codes their expected rates drift from the training ones as far as the codes
  do (a death-heavy category a little rarer than real lowers in-hospital mortality). A second draw,
  with the category calibration on, fits each head's intercept shift
  (:func:`~.time_model.calibrate_time_model`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients
from promptehr_hf.modeling_promptehr.generation.times import VisitTimeModel

from .time_model import calibrate_time_model

# Visits added to both counts of every category: a category no generated visit holds gets a finite
# log-ratio, and one seen a few times moves little.
PSEUDO_VISITS = 0.5
# The log-ratio is kept within +-MAX_LOG_RATIO: a category the model all but never writes is not
# forced in at any cost to the rest of its visit.
MAX_LOG_RATIO = 1.0
DEFAULT_CALIBRATION_PATIENTS = 10_000
# With procedures and medications a patient has about three times the codes to generate: half the
# patients keep the calibration's cost near the diagnosis-only one (on the simulated cohort's
# 15-minute model, 5,000 and 10,000 patients gave the same pair R² closures within one point).
MULTIMODAL_CALIBRATION_PATIENTS = 5_000
# The time calibration's draw is half the category calibration's by default: a second draw as large
# would take the main job past its 15 minutes on 2 cores (each costs about 1.6 minutes there).
TIME_CALIBRATION_SHARE = 0.5


def default_calibration_patients(multimodal: bool) -> tuple[int, int]:
    """(category calibration, time calibration) patients generated after training by default."""
    n = MULTIMODAL_CALIBRATION_PATIENTS if multimodal else DEFAULT_CALIBRATION_PATIENTS
    return n, int(n * TIME_CALIBRATION_SHARE)


def category_visit_counts(visits, category_of) -> Counter:
    """{category: number of visits holding at least one of its codes}."""
    return Counter(k for visit in visits for k in {category_of(c) for c in visit})


def fit_category_calibration(model, tokenizer, train_patients, n_patients: int = DEFAULT_CALIBRATION_PATIENTS, *,
                             prior=None, seed: int = 0, batch_size: int = 256, max_history_length: int | None = None,
                             progress: bool = True) -> dict[str, float]:
    """{category: log-ratio} for every category of the tokenizer's vocabulary that the training
    patients or the generated ones hold.

    Generates ``n_patients`` unconditional patients with ``model``'s generation config (calibration
    off, no times, ``seed``) and compares, per category, the share of visits that hold it:
    log((n_train + s) / (N_train + s)) - log((n_gen + s) / (N_gen + s)), ``s`` = PSEUDO_VISITS,
    clipped to +-MAX_LOG_RATIO, rounded to 4 decimals.

    With a multimodal tokenizer the procedure and medication categories are calibrated the same way
    (shares of visits, over each visit's codes of every modality).

    Args:
        train_patients: the training split (patient dicts or a datasets.Dataset with ``visits``, and
            the other modalities' fields for a multimodal tokenizer).
        prior: the CohortPrior generation draws from (default: the checkpoint's).
    """
    if n_patients < 1:
        raise ValueError(f"fit_category_calibration: n_patients must be >= 1, got {n_patients}")
    synthetic, _ = generate_patients(model, tokenizer, n_patients, mode="unconditional", prior=prior, seed=seed,
                                     batch_size=batch_size, max_history_length=max_history_length, calibration=False,
                                     times=False, progress=progress)
    # Each visit's codes of every modality the tokenizer holds (a diagnosis-only one: the visits).
    train_visits = [v for p in train_patients for v in tokenizer.merge_visits(p)]
    generated_visits = [v for p in synthetic for v in tokenizer.merge_visits(p)]
    real = category_visit_counts(train_visits, tokenizer.category_of)
    fake = category_visit_counts(generated_visits, tokenizer.category_of)
    vocab = tokenizer.get_vocab()
    out = {}
    for k in sorted((set(real) | set(fake)) & set(vocab)):
        ratio = np.log((real[k] + PSEUDO_VISITS) / (len(train_visits) + PSEUDO_VISITS)) - np.log(
            (fake[k] + PSEUDO_VISITS) / (len(generated_visits) + PSEUDO_VISITS))
        out[k] = round(float(np.clip(ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)), 4)
    return out


def fit_time_calibration(model, tokenizer, train_patients, time_model: VisitTimeModel,
                         n_patients: int = DEFAULT_CALIBRATION_PATIENTS, *, prior=None, seed: int = 0,
                         batch_size: int = 256, max_history_length: int | None = None,
                         progress: bool = True) -> VisitTimeModel:
    """``time_model`` with its heads' shifts fitted on ``n_patients`` unconditional patients that
    ``model`` generates with its generation config (category calibration included, no times,
    ``seed``), against ``train_patients`` (with times)."""
    if n_patients < 1:
        raise ValueError(f"fit_time_calibration: n_patients must be >= 1, got {n_patients}")
    synthetic, _ = generate_patients(model, tokenizer, n_patients, mode="unconditional", prior=prior, seed=seed,
                                     batch_size=batch_size, max_history_length=max_history_length, times=False,
                                     progress=progress)
    return calibrate_time_model(time_model, list(train_patients), list(synthetic), tokenizer.category_of)


__all__ = ["DEFAULT_CALIBRATION_PATIENTS", "MULTIMODAL_CALIBRATION_PATIENTS", "TIME_CALIBRATION_SHARE",
           "category_visit_counts", "default_calibration_patients", "fit_category_calibration",
           "fit_time_calibration"]
