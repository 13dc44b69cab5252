"""The generation settings a PromptEHR checkpoint carries in ``generation_config.json``.

Shipped with the checkpoint in ``custom_generate/`` (see :mod:`.generate`): imports only
transformers, the standard library and the files beside it (torch through them).
"""

from __future__ import annotations

from numbers import Integral

from transformers import GenerationConfig

from .processors import STAGE_TWO_MODES

MODES = ("unconditional", "conditional", "seeded", "given_diagnoses")
VISIT_LENGTHS = ("data", "model")
DEFAULT_HISTORY_LENGTH = 256  # PromptEHRTrainingArguments.max_source_length's default
DEFAULT_MAX_CODES = 40  # cap per visit when the model decides and no prior says otherwise


class PromptEHRGenerationConfig(GenerationConfig):
    r"""PromptEHR's generation settings: a ``GenerationConfig`` with the fields below.

    Saved as the checkpoint's ``generation_config.json``; ``from_pretrained`` loads it as the
    model's ``generation_config`` (a plain ``GenerationConfig`` holding these fields), which
    :func:`promptehr_generation_config` turns back into this class. A checkpoint without them
    gets the defaults.

    Args:
        stage_two (`str`, *optional*, defaults to `"empirical"`):
            How the code inside a sampled category is chosen: `"empirical"` (the training
            P(code | category)), `"type"` (the training P(code | category, visit type), for a
            model conditioned on visit types; what such a checkpoint saves), `"model"` (the
            model's scores) or `"uniform"`.
        visit_length (`str`, *optional*, defaults to `"data"`):
            `"data"`: each visit's number of codes is drawn from the training distribution given
            age band and visit index (in seeded mode, the seed's own); `"model"`: the model ends
            the visit, after at most `max_codes` codes.
        recurrence (`bool`, *optional*, defaults to `True`):
            With `stage_two="type"` and a cohort prior that counted recurrences: the categories and
            codes of a patient's previous visit are weighted by how much more often they recur in
            the training cohort than the visit types predict (``CohortPrior.recurrence_log_lift``):
            chronic conditions come back, with the same code. Ignored otherwise.
        pair_weight (`float`, *optional*, defaults to 0.7):
            Stage two given the visit's codes so far: with a cohort prior that counted within-visit
            code pairs (``CohortPrior.code_pairs``), each candidate code's log-probability
            gets this weight, over the square root of the visit's codes of its modality, times
            the sum of its pair scores with them (codes bundled in one stay come out together).
            0 turns it off; ignored with `stage_two="model"`.
        calibration (`bool`, *optional*, defaults to `True`):
            Add `category_calibration` to the category scores of every visit. Ignored without it.
        category_calibration (`dict`, *optional*):
            ``{category: log-ratio}``, written at training time (``fit_category_calibration``):
            the log of each category's share of training visits over its share of visits that
            the trained model generated without it. A model trained for minutes spreads its
            probability more evenly than the data, and a category present in a large minority of
            visits (hypertension) comes out too often; this moves each category's marginal back
            to the training cohort's.
        cms (`bool`, *optional*, defaults to `True`):
            Apply the CMS age/sex edits of each patient (needs `cms_edits`).
        cms_edits (`dict`, *optional*):
            The CMS edits of the vocabulary's codes, written at save time: ``{"age_ranges": {edit:
            [lo, hi]}, "sex_conflicts": {edit: sex}, "classes": [{"edits": [edit, ...], "codes":
            [code, ...]}, ...]}`` (:class:`~.processors.CMSEditTable`).
        batch_size (`int`, *optional*, defaults to 256):
            Patients (rows) per decoder call.
        max_codes (`int`, *optional*):
            Cap on the codes of a visit the model ends (`visit_length="model"`); default: the
            cohort prior's longest training visit, else 40.
        max_history_length (`int`, *optional*):
            Encoder tokens for a patient's earlier visits (default: 256, the trainer's source
            length), within the model's positions.
        seed_visits (`int`, *optional*, defaults to 1):
            Seeded mode: leading visits of each seed patient kept (at most all but one).
        times (`bool`, *optional*, defaults to `True`):
            With a time model (the checkpoint's ``time_model.safetensors``, fitted on a cohort read
            with its times): draw each patient's stays, gaps and death from its codes
            (:class:`~.times.VisitTimeModel`), after the codes, from a random stream of their own.
            `False`, or a checkpoint without a time model: patients without times.
        custom_decoding (`bool`, *optional*, defaults to `True`):
            Decode with :func:`~.decoding.visit_decoding` (the processors and the LM head on the
            grammar's columns only); `False` runs transformers' own loop over the whole
            vocabulary (the same patients, slower).
        do_sample (`bool`, *optional*, defaults to `True`):
            Ancestral sampling; `False`: argmax decoding (greedy).
        temperature, top_k, top_p:
            transformers' sampling warpers, applied after the validity processors (`None`: off).
        kwargs:
            Any other ``GenerationConfig`` field.
    """

    def __init__(self, stage_two: str = "empirical", visit_length: str = "data", cms: bool = True,
                 cms_edits: dict | None = None, batch_size: int = 256, max_codes: int | None = None,
                 max_history_length: int | None = None, seed_visits: int = 1, custom_decoding: bool = True,
                 recurrence: bool = True, times: bool = True, calibration: bool = True,
                 category_calibration: dict | None = None, pair_weight: float = 0.7, **kwargs):
        self.stage_two = stage_two
        self.recurrence = recurrence
        self.pair_weight = pair_weight
        self.calibration = calibration
        self.category_calibration = category_calibration
        self.times = times
        self.visit_length = visit_length
        self.cms = cms
        self.cms_edits = cms_edits
        self.batch_size = batch_size
        self.max_codes = max_codes
        self.max_history_length = max_history_length
        self.seed_visits = seed_visits
        self.custom_decoding = custom_decoding
        if kwargs.get("do_sample") is None:
            kwargs["do_sample"] = True
        # A config derived from the model config drops unknown fields when loaded: this one keeps them.
        kwargs.pop("_from_model_config", None)
        super().__init__(**kwargs)

    def validate(self, *args, **kwargs):
        """GenerationConfig's checks (their arguments passed on as given: they differ between
        transformers releases), then PromptEHR's fields (ValueError on a bad value)."""
        super().validate(*args, **kwargs)
        for name, allowed in (("stage_two", STAGE_TWO_MODES), ("visit_length", VISIT_LENGTHS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, low in (("batch_size", 1), ("max_codes", 1), ("max_history_length", 1), ("seed_visits", 0)):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, Integral) and value >= low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.pair_weight, (int, float)) and self.pair_weight >= 0):
            raise ValueError(f"pair_weight must be a number >= 0, got {self.pair_weight!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cms_edits is not None and not {"age_ranges", "sex_conflicts", "classes"} <= set(self.cms_edits):
            raise ValueError("cms_edits needs the keys 'age_ranges', 'sex_conflicts' and 'classes'")


def promptehr_generation_config(base: GenerationConfig | None = None, **overrides) -> PromptEHRGenerationConfig:
    """``base`` (e.g. a model's ``generation_config``) as a :class:`PromptEHRGenerationConfig`: its
    fields, PromptEHR's defaults for those it lacks, then ``overrides``.

    Args:
        base: a GenerationConfig (plain or PromptEHR's), or None for the defaults.
        overrides: PromptEHRGenerationConfig fields; a value of None keeps the configured one.

    Raises:
        TypeError: an override that is no field; ValueError: a bad value.
    """
    config = PromptEHRGenerationConfig.from_dict(base.to_dict()) if base is not None else PromptEHRGenerationConfig()
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(k for k in given if k not in vars(config))
    if unknown:
        raise TypeError(f"unknown generation settings {unknown} (PromptEHRGenerationConfig fields or "
                        "GenerationConfig fields)")
    for key, value in given.items():
        setattr(config, key, value)
    config.validate()
    return config


__all__ = ["MODES", "PromptEHRGenerationConfig", "VISIT_LENGTHS", "promptehr_generation_config"]
