"""PromptEHR's ``custom_generate``: a checkpoint that writes whole synthetic patients by itself.

A checkpoint saved by ``promptehr_hf`` holds this file and the ones it imports in its
``custom_generate/`` folder, and its settings in ``generation_config.json``
(:class:`~.config.PromptEHRGenerationConfig`, with the CMS edit classes of its vocabulary).
transformers then runs :func:`generate` in place of its own ``generate``, in a process that does
not have ``promptehr_hf``::

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained("promptehr_run/model", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("promptehr_run/model", trust_remote_code=True)
    patients, stats = model.generate(tokenizer=tokenizer, n=1000, seed=0)

``from_pretrained(..., trust_remote_code=True)`` makes this function the model's ``generate``; a
model loaded otherwise reaches it with ``model.generate(custom_generate="promptehr_run/model",
trust_remote_code=True, tokenizer=tokenizer, n=1000)``. Arguments go by keyword. transformers'
own generate (one decoder output per input) stays reachable as ``type(model).generate(model, ...)``.

Imports only torch, transformers, numpy, the standard library and the files beside it.
"""

from __future__ import annotations

# Loading custom_generate/ from a local folder, older transformers releases (5.4 among them) copy
# into their module cache only the files this one imports itself: every shipped file is named.
from .config import promptehr_generation_config
from .decoding import visit_decoding  # noqa: F401
from .patients import DEFAULT_COPY_REDRAWS, sample_patients
from .prior import CohortPrior  # noqa: F401
from .processors import VisitLogitsProcessor  # noqa: F401
from .sampling import stratified_uniform  # noqa: F401
from .times import VisitTimeModel  # noqa: F401

# Arguments of transformers' generate that have no meaning for whole patients; transformers
# hands them over (as None) when it runs a custom_generate repository.
_TOKEN_LEVEL_ARGUMENTS = ("inputs", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                          "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids",
                          "negative_prompt_attention_mask", "custom_generate")


def generate(model, *, tokenizer, n: int | None = None, mode: str = "unconditional", prior=None,
             demographics=None, seed_patients=None, seed: int = 0, exclude_patients=None,
             copy_redraws: int | None = DEFAULT_COPY_REDRAWS, generation_config=None, progress: bool = False,
             time_model=None, **kwargs) -> tuple[list[dict], dict]:
    """Generate synthetic patients, visit after visit, every visit grammatical, duplicate-free and
    within the CMS age/sex edits of its patient.

    Args:
        model: a PromptEHR model (PromptEHRForConditionalGeneration, e.g. from
            ``AutoModelForSeq2SeqLM.from_pretrained(..., trust_remote_code=True)``); run in eval
            mode, its mode restored after.
        tokenizer: its tokenizer (``AutoTokenizer.from_pretrained(..., trust_remote_code=True)``).
        n: number of patients (unconditional: required; conditional: len(demographics); seeded:
            one per seed by default, else n seeds drawn at random, with replacement if n exceeds
            the seeds).
        mode: ``"unconditional"`` (demographics, visit counts and visit lengths from the cohort
            prior) | ``"conditional"`` | ``"seeded"``.
        prior: a CohortPrior, or the path of one (file or checkpoint folder) or a Hub model id;
            default: the model's checkpoint's ``cohort_prior.json``. Needed unless every length and
            visit count is known (seeded mode, or conditional with n_visits and model lengths).
        demographics: conditional mode: patient-like dicts (or a column dict) with ``age``
            (years), ``sex`` ("F"/"M") and optionally ``n_visits``.
        seed_patients: seeded mode: real patients as dicts in the patient schema.
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
        generation_config: the settings (a GenerationConfig; default: ``model.generation_config``,
            which the checkpoint's ``generation_config.json`` sets).
        progress: show a progress bar over the visits.
        time_model: a VisitTimeModel, or the path of one (file, checkpoint folder or Hub id);
            default: the checkpoint's ``time_model.safetensors`` when it has one. With it (and
            ``times=True``) every patient also gets its stays, gaps and death, drawn from its codes.
        kwargs: fields of :class:`~.config.PromptEHRGenerationConfig` that override the settings
            (``stage_two``, ``visit_length``, ``cms``, ``do_sample``, ``temperature``, ``top_k``,
            ``top_p``, ``batch_size``, ``max_codes``, ``max_history_length``, ``seed_visits``,
            ``custom_decoding``, ``times``); a value of None keeps the configured one.

    Returns:
        (patients, stats): patient dicts ``{"subject_id": 1.., "age": float, "sex": "F" | "M",
        "visits": [[code, ...], ...]}`` (with times: also ``stay_days``, ``gap_days``,
        ``hospital_death``, ``death_days``) and a dict of the run's settings and counters
        (``ungrammatical_visits``, ``visits_with_duplicate_code``, ``empty_visits``: 0 by
        construction).
    """
    for name in _TOKEN_LEVEL_ARGUMENTS:
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"PromptEHR's generate writes whole patients: it takes no `{name}`")
    kwargs.pop("trust_remote_code", None)  # transformers' own, already used to load this function
    config = promptehr_generation_config(generation_config if generation_config is not None
                                         else model.generation_config, **kwargs)
    return sample_patients(model, tokenizer, config, n, mode=mode, prior=prior, demographics=demographics,
                           seed_patients=seed_patients, seed=seed, exclude_patients=exclude_patients,
                           copy_redraws=copy_redraws, progress=progress, time_model=time_model)
