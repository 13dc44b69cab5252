"""Synthetic patients as a ``datasets.Dataset`` (:func:`generate_patients`), and the files that let a
saved checkpoint generate them by itself (:func:`save_custom_generate`).

The generation core (:mod:`.config`, :mod:`.prior`, :mod:`.processors`, :mod:`.decoding`,
:mod:`.patients`, :mod:`.generate`) imports nothing from ``promptehr_hf``: ``save_custom_generate``
copies those very files into a checkpoint's ``custom_generate/`` folder, where transformers runs
:func:`~.generate.generate` as the model's ``generate``. This module is the package's side of it:
it fills in what only the package knows (the CMS edits of the vocabulary's codes, from the tables
of the tokenizer's code system, :mod:`promptehr_hf.datasets_scripts.code_systems`; the history
length of checkpoints saved before their generation config carried it) and returns the patients
in the patient schema.

The settings (stage two, visit length, CMS edits, sampling, batch size, ...) are a
:class:`~.config.PromptEHRGenerationConfig`, read from the model's ``generation_config``
(``generation_config.json`` of the checkpoint) and overridden by keyword arguments.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from transformers import GenerationConfig
from transformers.utils import GENERATION_CONFIG_NAME

from promptehr_hf.datasets_scripts import code_systems, procedures
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM
from promptehr_hf.datasets_scripts.cohort_io import patients_to_dataset
from promptehr_hf.tokenization.tokenization_promptehr import MODALITY_PREFIXES, modality_of

from .config import MODES, VISIT_LENGTHS, PromptEHRGenerationConfig, promptehr_generation_config
from .generate import generate
from .patients import DEFAULT_COPY_REDRAWS
from .prior import CohortPrior
from .times import VisitTimeModel

CUSTOM_GENERATE_DIR = "custom_generate"
# The generation core, copied into custom_generate/ (generate.py is the entry transformers loads).
SHIPPED_FILES = ("generate.py", "config.py", "patients.py", "prior.py", "processors.py", "decoding.py", "times.py",
                 "sampling.py")
TRAINING_ARGS_JSON = "training_args.json"  # written by PromptEHRTrainer beside the checkpoint
# Outcome-conditioned generation (hospital_death=): rounds of draws, the rate assumed at least
# this, a round at most this many times n, and each round's seed this far from the last.
OUTCOME_ROUNDS = 20
MIN_OUTCOME_RATE = 0.01
OUTCOME_BATCH_CAP = 50
OUTCOME_SEED_STEP = 1_000_003


def cms_edits(tokenizer) -> dict:
    """The CMS age/sex edits of a tokenizer's code tokens, in the form a generation config carries
    them (``cms_edits``; see :class:`~.processors.CMSEditTable`): each edit class present in the
    vocabulary with its codes, and the (age, sex) each edit forbids, from the tables of the
    tokenizer's ``code_system`` (ICD-9-CM for a tokenizer that names none). ICD-10-CM has its
    own edits and ranges (maternity 9-64, not ICD-9-CM's 12-55). A multimodal tokenizer's
    procedure tokens (``"PX:<code>"``) carry the sex edits of the procedure tables that go with the
    code system (ICD-9-CM volume 3, ICD-10-PCS); medications have none."""
    # A tokenizer saved before it recorded its code system is ICD-9-CM.
    system = getattr(tokenizer, "code_system", DEFAULT_CODE_SYSTEM)
    icd = code_systems.code_system(system)
    procedure = procedures.procedure_system(procedures.FOR_DIAGNOSES[system])
    classes: dict[tuple[str, ...], list[str]] = {}
    for token in tokenizer.convert_ids_to_tokens(sorted(tokenizer.code_category)):
        modality = modality_of(token)
        if modality == "diagnoses":
            edits = icd.edits_of(token)
        elif modality == "procedures":
            edits = procedure.edits_of(token[len(MODALITY_PREFIXES[modality]):])
        else:
            continue
        if edits:
            classes.setdefault(edits, []).append(token)
    return {
        "age_ranges": {edit: list(bounds) for edit, bounds in icd.age_ranges().items()},
        "sex_conflicts": dict(icd.SEX_CONFLICT),
        "classes": [{"edits": list(edits), "codes": codes} for edits, codes in sorted(classes.items())],
    }


def _trained_history_length(checkpoint: str | os.PathLike | None) -> int | None:
    """The source length a checkpoint was trained with (its training_args.json), or None."""
    path = Path(checkpoint or "", TRAINING_ARGS_JSON)
    if checkpoint and path.is_file():
        return json.loads(path.read_text(encoding="utf-8")).get("max_source_length")
    return None


def generate_patients(
    model,
    tokenizer,
    n: int | None = None,
    *,
    mode: str = "unconditional",
    prior: CohortPrior | str | os.PathLike | None = None,
    demographics=None,
    seed_patients=None,
    seed: int = 0,
    exclude_patients=None,
    copy_redraws: int | None = DEFAULT_COPY_REDRAWS,
    progress: bool = True,
    generation_config: GenerationConfig | None = None,
    time_model: VisitTimeModel | str | os.PathLike | None = None,
    hospital_death: bool | None = None,
    **overrides,
):
    """Generate synthetic patients (the checkpoint's own :func:`~.generate.generate`, as a Dataset).

    Args:
        model: a PromptEHRForConditionalGeneration (run in eval mode; its mode is restored after).
        tokenizer: its PromptEHRTokenizer.
        n: number of patients (unconditional: required; conditional: len(demographics);
            seeded: one per seed by default, else n seeds drawn at random, with replacement if
            n exceeds the seeds).
        mode: "unconditional" | "conditional" | "seeded".
        prior: a CohortPrior or the path of one (file or checkpoint dir); default: the
            ``cohort_prior.json`` of the model's checkpoint dir. Needed unless every length and
            visit count is known (seeded mode, or conditional with n_visits and model lengths).
        demographics: conditional mode: patient-like dicts (or a Dataset / column dict) with
            ``age`` (years), ``sex`` ("F"/"M") and optionally ``n_visits``.
        seed_patients: seeded mode: real patients (dicts or a Dataset in the patient schema).
        seed: seeds numpy and torch (the global torch RNG state is restored afterwards).
        exclude_patients: training patients; a synthetic patient whose visits (as code sets, in
            order) equal one of theirs is replaced by a fresh draw with the same demographics
            (age and sex, the given visit count in conditional mode, the same seed in seeded
            mode), for at most ``copy_redraws`` rounds, all the copies of a round generated
            together with a random stream of their own; one still a copy after the last round is
            dropped. Counted in ``stats["copies_redrawn"]`` (returned with a redrawn record) and
            ``stats["copies_dropped"]``. Without copies the output is that of a run without it.
        copy_redraws: rounds of redraws of the copies (default 3; 0: copies are dropped at once;
            None: the default).
        progress: show a progress bar over the visits.
        time_model: a VisitTimeModel or the path of one; default: the checkpoint's
            ``time_model.safetensors``, when it has one (see ``times`` below).
        hospital_death: unconditional mode only: True keeps only patients who die in hospital,
            False only those who do not (rejection: rounds of draws under the time model, each
            with a seed of its own, until ``n`` are kept; ``stats["outcome_generated"]`` counts
            the patients drawn). Exactly the model's patients given the outcome; needs a time model.
        generation_config: the settings (default: ``model.generation_config``); the CMS edits
            come from the tokenizer's code system (:func:`cms_edits`) when it carries none, and the history length
            from the checkpoint's ``training_args.json`` when it sets none.
        overrides: :class:`~.config.PromptEHRGenerationConfig` fields that override the settings:
            ``stage_two`` ("empirical" | "type" | "model" | "uniform"), ``pair_weight`` (stage two
            given the visit's codes so far; 0: off), ``visit_length`` ("data" |
            "model"), ``cms``, ``do_sample`` (False: argmax decoding), ``temperature``, ``top_k``,
            ``top_p``, ``batch_size``, ``max_codes``, ``max_history_length``, ``seed_visits``,
            ``custom_decoding``, ``times`` (False: no stays, gaps or deaths even with a time
            model); a value of None keeps the configured one.

    Returns:
        (datasets.Dataset in the patient schema, stats dict).
    """
    config = promptehr_generation_config(generation_config if generation_config is not None
                                         else model.generation_config, **overrides)
    if config.cms and config.cms_edits is None:
        config.cms_edits = cms_edits(tokenizer)
    if config.max_history_length is None:
        config.max_history_length = _trained_history_length(getattr(model, "name_or_path", None))
    run = dict(tokenizer=tokenizer, mode=mode, prior=prior, demographics=demographics, seed_patients=seed_patients,
               exclude_patients=exclude_patients, copy_redraws=copy_redraws, generation_config=config,
               progress=progress, time_model=time_model)
    if hospital_death is None:
        patients, stats = generate(model, n=n, seed=seed, **run)
        return patients_to_dataset(patients), stats
    if mode != "unconditional" or not n:
        raise ValueError("hospital_death= fixes the outcome of unconditional generation: mode='unconditional' and n")
    if not config.times:
        raise ValueError("hospital_death= needs the times (times=True and a time model)")
    kept, drawn, rate = [], 0, 0.5
    for round_ in range(OUTCOME_ROUNDS):
        want = n - len(kept)
        batch = min(int(np.ceil(want / max(rate, MIN_OUTCOME_RATE) * 1.2)) + 8, OUTCOME_BATCH_CAP * n)
        patients, stats = generate(model, n=batch, seed=seed + OUTCOME_SEED_STEP * round_, **run)
        if not stats.get("times"):
            raise ValueError("hospital_death= needs a time model: this checkpoint has no time_model.safetensors "
                             "(trained on a cohort without times, or with --no-time)")
        match = [p for p in patients if p["hospital_death"] == hospital_death]
        drawn += len(patients)
        rate = max(len(match), 1) / max(len(patients), 1)
        kept += match[:want]
        if len(kept) == n:
            break
    else:
        raise ValueError(f"hospital_death={hospital_death}: {len(kept)} of {n} patients after {drawn} draws "
                         f"({OUTCOME_ROUNDS} rounds); the model rarely gives this outcome")
    for j, p in enumerate(kept):
        p["subject_id"] = j + 1
    stats.update(n_patients=n, outcome={"hospital_death": hospital_death}, outcome_generated=drawn,
                 outcome_rounds=round_ + 1)
    return patients_to_dataset(kept), stats


def save_custom_generate(directory: str | os.PathLike, tokenizer, generation_config: GenerationConfig | None = None,
                         **settings) -> PromptEHRGenerationConfig:
    """Make a saved checkpoint folder generate patients by itself: write its
    ``generation_config.json`` (a :class:`~.config.PromptEHRGenerationConfig` with the CMS edits
    of the tokenizer's codes) and ``custom_generate/`` (the generation core, :data:`SHIPPED_FILES`).

    Args:
        directory: the checkpoint folder (``save_pretrained`` / ``Trainer.save_model`` output).
        tokenizer: its PromptEHRTokenizer.
        generation_config: the settings to start from (default: the folder's
            ``generation_config.json``, PromptEHR's defaults for the fields it lacks).
        settings: PromptEHRGenerationConfig fields that override them, e.g.
            ``max_history_length`` (default: the folder's ``training_args.json`` source length).

    Returns:
        The configuration written.
    """
    directory = Path(directory)
    if generation_config is None and (directory / GENERATION_CONFIG_NAME).is_file():
        generation_config = GenerationConfig.from_pretrained(directory)
    if settings.get("max_history_length") is None:
        settings["max_history_length"] = _trained_history_length(directory)
    config = promptehr_generation_config(generation_config, **settings)
    config.cms_edits = cms_edits(tokenizer)
    config.save_pretrained(directory)
    target = directory / CUSTOM_GENERATE_DIR
    shutil.rmtree(target, ignore_errors=True)  # no file of an older core left behind
    target.mkdir()
    for name in SHIPPED_FILES:
        shutil.copyfile(Path(__file__).with_name(name), target / name)
    return config


__all__ = ["CUSTOM_GENERATE_DIR", "MODES", "SHIPPED_FILES", "VISIT_LENGTHS", "cms_edits", "generate_patients",
           "save_custom_generate"]
