"""Whole synthetic patients from a PromptEHR model: visit after visit, two-stage codes.

An outer loop writes visit t of every patient that needs one (all first visits, then all second
visits, ...), pooling the patients of a round into batches of ``batch_size`` rows. For one batch
the encoder reads each patient's demographics (``x_num`` = raw age, ``x_cat`` = sex, F=0/M=1,
then the visit's type for a model conditioned on visit types) and history
(``tokenizer.encode_history(visits[:t])``), in chunks of similar history length
(:func:`_encode_histories`); the model's ``generate`` (KV cache) then writes one visit per row,
from ``<v>`` on, under the LogitsProcessors of :mod:`.processors` (grammar, stage-two code
sampling, no repeated code, CMS age/sex edits, visit-length control), so every record is valid by
construction. Its decoding loop is :func:`~.decoding.visit_decoding` (``custom_generate``), which
runs the processors and the LM head on the ~1,000 columns the grammar can allow instead of the
whole vocabulary. Ancestral sampling (temperature 1 by default; top-k / top-p optional) happens
at the end of the processor chain, which leaves one finite score per row; ``do_sample=False``
drops the sampler (argmax decoding). The rows of a round are sorted by target length and history
length and cut into batches of at most ``batch_size`` by :func:`_batch_bounds`, which weighs the
steps a batch decodes past its finished rows against the cost of one more ``generate`` call.

Visit types: a model whose config has ``visit_type_feature_index`` writes each visit under a
type drawn first from the :class:`~.prior.CohortPrior` (the first visit's type given the age
band, each later one given the previous type); with ``visit_length="data"`` the visit lengths are
then drawn given the types (in seeded mode the seed's own lengths are kept). Every draw from the
prior is stratified (:mod:`.sampling`): each patient's draw has the prior's distribution, and the
cohort's counts of each age, visit count, type and length sit within a draw or two of their
expected counts in every cell.

Modes:
- ``unconditional``: age, sex and number of visits drawn from the :class:`~.prior.CohortPrior`
  stored with the checkpoint (``cohort_prior.json``);
- ``conditional``: given demographics (age, sex, optionally the number of visits);
- ``seeded``: warm start from real patients: the first ``seed_visits`` visits of each seed are
  kept, the following ones generated (as many as the seed has, each as long as the seed's visit);
  the share of output codes copied from the seed is reported;
- ``given_diagnoses`` (a multimodal tokenizer): every visit of each real patient keeps its
  diagnoses (forced first, :class:`~.processors.GivenTokensLogitsProcessor`) and gets generated
  procedures and medications, as many as the prior draws for its visit type and diagnosis count.

Modalities: with a tokenizer holding procedures and medications, each visit is written as its
diagnoses, then its procedures, then its medications; with ``visit_length="data"`` the number of
codes of each other modality is drawn from the prior given the visit type and the visit's number
of diagnoses (:meth:`~.prior.CohortPrior.sample_modality_lengths`; in seeded mode the seed's
own). Patients come back with ``procedures`` and ``medications`` beside ``visits``.

Copy filter (``exclude_patients``): a synthetic patient whose visits (as code sets, in order)
equal a training patient's is replaced by a fresh draw with the same demographics
(:func:`_redraw_plan`; in seeded mode, the same seed), all the copies of a round generated
together under a random stream of their own, for at most ``copy_redraws`` rounds; a patient
still a copy after the last round is dropped. The first round is the plain generation, so
a run without copies returns exactly what it returns without the filter.

The settings (stage two, visit length, CMS edits, sampling, batch size, ...) are a
:class:`~.config.PromptEHRGenerationConfig`. Entry points: :func:`~.generate.generate` (the
checkpoint's ``custom_generate``) and, in the package, ``generate_patients``; both call
:func:`sample_patients`.

Shipped with the checkpoint in ``custom_generate/``: imports only torch, transformers, numpy, the
standard library and the files beside it.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.bart.modeling_bart import BartDecoder
from transformers.utils import cached_file
from transformers.utils.logging import tqdm

from .config import DEFAULT_HISTORY_LENGTH, DEFAULT_MAX_CODES, MODES, PromptEHRGenerationConfig
from .decoding import visit_cache, visit_decoding
from .prior import AGE_CAP, PRIOR_FILE, SEXES, CohortPrior, columns
from .processors import (
    CMSEditTable,
    PairScores,
    VocabIndex,
    check_visits,
    max_new_tokens_for,
    visit_logits_processors,
)
from .times import TIME_MODEL_FILE, VisitTimeModel

# The name under which the installed transformers passes the KV cache (``cache`` from 5.24,
# ``past_key_values`` before), as the model's remote code decides it.
CACHE_ARG = "cache" if "cache" in inspect.signature(BartDecoder.forward).parameters else "past_key_values"

# stage_two="type": pseudo-visits of the type-blind P(code | category) added to each type's counts.
TYPE_STAGE_TWO_PSEUDO_VISITS = 1.0
# Rounds of redraws a copy of an excluded (training) patient gets before it is dropped.
DEFAULT_COPY_REDRAWS = 3


class _Plan:
    """Per-patient generation plan: demographics, visit count, given visits, target lengths."""

    def __init__(self, ages, sexes, n_visits, lengths=None, given=None, seed_visits_all=None, fixed_n_visits=None):
        self.ages = np.minimum(np.asarray(ages, dtype=np.float64), AGE_CAP)
        self.sexes = list(sexes)
        bad = sorted({str(s) for s in self.sexes if s not in SEXES})
        if bad:
            raise ValueError(f"sex must be one of {SEXES}; got {bad}")
        if np.isnan(self.ages).any() or (self.ages < 0).any():
            raise ValueError("ages must be non-negative numbers")
        self.n_visits = np.asarray(n_visits, dtype=np.int64)
        if (self.n_visits < 1).any():
            raise ValueError("every patient needs at least one visit (n_visits >= 1)")
        self.lengths = lengths  # list of [n_visits_i] int arrays, or None (model-decided)
        self.types = None  # list of [n_visits_i] int arrays: visit types (a model conditioned on them)
        self.visits = [list(v) for v in given] if given is not None else [[] for _ in self.ages]
        self.start = np.array([len(v) for v in self.visits], dtype=np.int64)
        self.seed_visits_all = seed_visits_all  # seeded mode: the seeds' full visit lists
        self.modality_lengths = None  # list of [n_visits_i, M - 1] int arrays: other modalities' targets
        self.given = None  # given_diagnoses mode: per patient, per visit, the forced (category, code) ids
        # Whether the caller set each patient's visit count (a redraw keeps it) or the prior drew it.
        self.fixed_n_visits = (np.zeros(len(self.ages), dtype=bool) if fixed_n_visits is None
                               else np.asarray(fixed_n_visits, dtype=bool))


def _history_length(model, config: PromptEHRGenerationConfig) -> int:
    """Encoder tokens for the history: the configured length (default 256), within the model's
    positions (the prompts take some)."""
    length = config.max_history_length or DEFAULT_HISTORY_LENGTH
    cfg = model.config
    return int(min(length, cfg.max_position_embeddings - getattr(cfg, "num_prompts", 0)))


def _visit_generation_config(model, tokenizer) -> GenerationConfig:
    """The GenerationConfig of one ``generate`` call (one visit per row): greedy, so that
    generate adds no warper of its own (its global default top_k=50 would silently truncate the
    category distribution) and does not call torch.multinomial; the processor chain samples.

    The sampling fields are set to their neutral values so that generate does not fill them in
    from the checkpoint's configuration (the chain already applies those).
    """
    return GenerationConfig(
        do_sample=False, num_beams=1, temperature=1.0, top_k=50, top_p=1.0,
        eos_token_id=tokenizer.visit_end_id, pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=model.config.decoder_start_token_id,
        # The grammar does both; a BART-style default would force </s> (and visit_decoding runs
        # the visit chain alone).
        forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0, repetition_penalty=1.0,
        min_length=0, use_cache=True,
    )


def _pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


# Rows per encoder call when a batch's histories differ in length (see _encode_histories).
ENCODER_CHUNK_ROWS = 32


@torch.no_grad()
def _encode_histories(model, histories: list[list[int]], x_num: torch.Tensor, x_cat: torch.Tensor, pad_id: int,
                      device) -> tuple[BaseModelOutput, torch.Tensor]:
    """Run the encoder on ``histories`` in chunks of similar length; returns (BaseModelOutput with
    last_hidden_state [B, num_prompts + T, d_model], token attention_mask [B, T]) for generate's
    ``encoder_outputs``, T being the longest history.

    A batch is sorted by target visit length, so its histories vary in length and one padded
    encoder call would spend much of its work on padding (the encoder is compute-bound at large
    batches); chunks of rows sorted by history length pay almost none. Padded positions stay
    masked out of cross-attention, as in one call."""
    encoder = model.get_encoder()
    lengths = np.array([len(h) for h in histories])
    if lengths.min() == lengths.max():  # one call, no padding
        ids, mask = _pad(histories, pad_id, device)
        out = encoder(input_ids=ids, attention_mask=mask, x_num=x_num, x_cat=x_cat).last_hidden_state
        return BaseModelOutput(last_hidden_state=out), mask
    mask = (torch.arange(lengths.max())[None, :] < torch.from_numpy(lengths)[:, None]).long().to(device)
    order = np.argsort(lengths, kind="stable")
    hidden = None
    for lo in range(0, len(order), ENCODER_CHUNK_ROWS):
        rows = order[lo: lo + ENCODER_CHUNK_ROWS]
        ids, chunk_mask = _pad([histories[j] for j in rows], pad_id, device)
        out = encoder(input_ids=ids, attention_mask=chunk_mask, x_num=x_num[rows], x_cat=x_cat[rows]).last_hidden_state
        if hidden is None:
            width = out.shape[1] - ids.shape[1] + mask.shape[1]  # prompts + the longest history
            hidden = out.new_zeros(len(histories), width, out.shape[2])
        hidden[torch.from_numpy(rows).to(device), : out.shape[1]] = out
    return BaseModelOutput(last_hidden_state=hidden), mask


# A decoding step costs about as much as this many extra rows of a batch (CPU, small preset);
# sets how _batch_bounds trades more calls for fewer decoding steps past the rows that have
# finished.
STEP_COST_IN_ROWS = 32


def _batch_bounds(targets: np.ndarray, batch_size: int) -> list[int]:
    """Cut rows sorted by target visit length ([n], ascending) into batches of at most
    ``batch_size`` that minimise sum over batches of steps x (STEP_COST_IN_ROWS + rows), a batch
    decoding 2 x (its longest target) + 2 steps. Exact dynamic programme over the cut points,
    vectorised over the last ``batch_size`` candidates. Returns the cut points, 0 first, n last."""
    n = len(targets)
    best = np.zeros(n + 1)
    cut = np.zeros(n + 1, dtype=np.int64)
    for j in range(1, n + 1):
        i = np.arange(max(0, j - batch_size), j)
        cost = best[i] + (2 * targets[j - 1] + 2) * (STEP_COST_IN_ROWS + j - i)
        k = int(np.argmin(cost))
        best[j], cut[j] = cost[k], i[k]
    bounds = [n]
    while bounds[-1] > 0:
        bounds.append(int(cut[bounds[-1]]))
    return bounds[::-1]


def _run_plan(model, tokenizer, plan: _Plan, config: PromptEHRGenerationConfig, *, index, edit_table, max_codes,
              max_history_length, progress, type_table=None, recurrence=None, calibration=None,
              pair_scores=None, desc: str = "generating") -> dict:
    """Generate every missing visit of ``plan`` in place; returns counters. ``type_table``: the
    stage-two table per visit type; ``recurrence``: :func:`recurrence_log_lifts` (with a type table);
    ``calibration``: :func:`category_calibration_row`, added to every visit's category scores;
    ``pair_scores``: :func:`code_pair_scores`, stage two given the visit's codes so far."""
    device = next(model.parameters()).device
    gen_cfg = _visit_generation_config(model, tokenizer)
    # The class's generate: a checkpoint loaded with trust_remote_code=True has the custom
    # generate (whole patients) as its instance's `generate`.
    model_generate = type(model).generate
    batch_size = config.batch_size
    start = torch.tensor([[model.config.decoder_start_token_id, tokenizer.visit_start_id]], device=device)
    sex_index = np.array([SEXES.index(s) for s in plan.sexes], dtype=np.int64)
    counters = {"visits_generated": 0, "ungrammatical_visits": 0, "visits_with_duplicate_code": 0,
                "visits_short_of_target": 0, "empty_visits": 0, "generate_calls": 0}
    total = int((plan.n_visits - plan.start).clip(min=0).sum())
    bar = tqdm(total=total, unit="visit", desc=desc, disable=not progress)
    for t in range(int(plan.n_visits.max(initial=0))):
        todo = np.nonzero((plan.start <= t) & (t < plan.n_visits))[0]
        if len(todo) == 0:
            continue
        histories = [tokenizer.encode_history(plan.visits[i], max_history_length) for i in todo]
        targets = None if plan.lengths is None else np.array([plan.lengths[i][t] for i in todo], dtype=np.int64)
        extra = None if plan.modality_lengths is None else np.stack([plan.modality_lengths[i][t] for i in todo])
        totals = targets if extra is None else targets + extra.sum(1)
        # Rows of similar target length and history length share a batch: less decoding past
        # finished rows, less cross-attention padding.
        hist_len = np.array([len(h) for h in histories])
        order = np.lexsort((hist_len, totals if totals is not None else np.zeros_like(hist_len)))
        bounds = (range(0, len(order) + batch_size, batch_size) if totals is None
                  else _batch_bounds(totals[order], batch_size))
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            sel = order[lo: min(hi, len(order))]
            rows = todo[sel]
            x_num = torch.tensor(plan.ages[rows], dtype=torch.float32, device=device)[:, None]
            cat = sex_index[rows][:, None]
            if plan.types is not None:
                cat = np.concatenate([cat, np.array([[plan.types[i][t]] for i in rows], dtype=np.int64)], 1)
            x_cat = torch.tensor(cat, dtype=torch.long, device=device)
            encoder_outputs, attention_mask = _encode_histories(
                model, [histories[j] for j in sel], x_num, x_cat, tokenizer.pad_token_id, device
            )
            n_codes = None if targets is None else torch.from_numpy(targets[sel])
            modality_codes = None if extra is None else torch.from_numpy(extra[sel])
            given = None
            if plan.given is not None:
                given = _pad([plan.given[i][t] for i in rows], -1, device)[0]
            longest = max_codes if totals is None else int(totals[sel].max())
            code_log_probs = None if type_table is None else type_table[torch.from_numpy(cat[:, 1]).to(device)]
            category_log_lift = None if calibration is None else calibration.expand(len(rows), -1)
            if recurrence is not None and t > 0:
                code_log_probs, lift = _recurrence_rows(
                    tokenizer, index, [plan.visits[i][t - 1] for i in rows], code_log_probs, recurrence)
                category_log_lift = lift if category_log_lift is None else category_log_lift + lift
            processors = visit_logits_processors(
                index, plan.ages[rows].tolist(), [plan.sexes[i] for i in rows], n_codes=n_codes,
                max_codes=max_codes, stage_two=config.stage_two, temperature=config.temperature or 1.0,
                cms=config.cms, edit_table=edit_table, sample=config.do_sample, top_k=config.top_k,
                top_p=config.top_p, code_log_probs=code_log_probs, category_log_lift=category_log_lift,
                modality_codes=modality_codes, given=given, pair_scores=pair_scores, pair_weight=config.pair_weight,
            )
            gen_cfg.max_new_tokens = max_new_tokens_for(longest) - 1  # <v> is given
            out = model_generate(
                model,
                encoder_outputs=encoder_outputs,
                attention_mask=attention_mask,
                decoder_input_ids=start.expand(len(rows), -1),  # the grammar would force <v> first
                x_num=x_num,
                x_cat=x_cat,
                logits_processor=processors,
                generation_config=gen_cfg,
                **{CACHE_ARG: visit_cache()},
                custom_generate=visit_decoding if config.custom_decoding else None,
            )
            counters["generate_calls"] += 1
            ungrammatical, duplicate = check_visits(index, out[:, 1:])
            counters["ungrammatical_visits"] += int(ungrammatical.sum())
            counters["visits_with_duplicate_code"] += int(duplicate.sum())
            for k, (i, ids) in enumerate(zip(rows, out[:, 1:].tolist())):
                decoded = tokenizer.decode_visits(ids)
                visit = decoded[0] if decoded else []
                counters["empty_visits"] += not visit
                if totals is not None and len(visit) < int(totals[sel][k]):
                    counters["visits_short_of_target"] += 1
                plan.visits[i].append(visit)
            counters["visits_generated"] += len(rows)
            bar.update(len(rows))
    bar.close()
    return counters


def _visit_key(visits) -> tuple:
    return tuple(tuple(sorted(v)) for v in visits)


def load_prior(source: str | os.PathLike) -> CohortPrior:
    """The CohortPrior of ``source``: a ``cohort_prior.json`` file, a checkpoint folder holding
    one, or a Hub model repository id (through the local Hugging Face cache)."""
    path = Path(source)
    if path.is_file() or (path / PRIOR_FILE).is_file():
        return CohortPrior.load(path)
    try:
        resolved = cached_file(str(source), PRIOR_FILE)
    except (OSError, ValueError) as err:  # not a repo id, no such repo or file, offline
        raise ValueError(f"no {PRIOR_FILE} in {str(source)!r} ({err})") from err
    return CohortPrior.load(resolved)


def load_time_model(source: str | os.PathLike | None) -> VisitTimeModel | None:
    """The VisitTimeModel of ``source`` (a ``time_model.safetensors`` file, a checkpoint folder
    holding one, or a Hub model repository id through the local cache); None where there is none
    (a checkpoint trained without times)."""
    if not source:
        return None
    path = Path(source)
    if path.is_file() or (path / TIME_MODEL_FILE).is_file():
        return VisitTimeModel.load(path)
    if path.is_dir():
        return None
    try:
        resolved = cached_file(str(source), TIME_MODEL_FILE, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):  # not a repo id, no such repo, offline
        return None
    return VisitTimeModel.load(resolved) if resolved else None


def _age_caps(cms_edits: dict | None):
    """visit codes -> the highest whole-year age the CMS age edits of its codes allow (inf: none)."""
    if not cms_edits:
        return None
    ranges = cms_edits["age_ranges"]
    cap = {}
    for cls in cms_edits["classes"]:
        highs = [ranges[e][1] for e in cls["edits"] if e in ranges]
        if highs:
            cap.update(dict.fromkeys(cls["codes"], float(min(highs))))
    return lambda visit: min((cap.get(code, np.inf) for code in visit), default=np.inf)


TIME_STREAM = 1  # the times' random stream: np.random.default_rng([seed, TIME_STREAM])


def sample_patients(model, tokenizer, config: PromptEHRGenerationConfig, n: int | None = None, *,
                    mode: str = "unconditional", prior=None, demographics=None, seed_patients=None, seed: int = 0,
                    exclude_patients=None, copy_redraws: int | None = DEFAULT_COPY_REDRAWS,
                    progress: bool = False, time_model=None) -> tuple[list[dict], dict]:
    """Generate synthetic patients under ``config``; see :func:`~.generate.generate` for the arguments.

    Returns:
        (patients, stats): patient dicts ``{"subject_id", "age", "sex", "visits"}`` (subject ids
        1, 2, ...; visits as lists of the tokenizer's codes), plus ``stay_days``, ``gap_days``,
        ``hospital_death`` and ``death_days`` when ``config.times`` and a time model is at hand
        (``time_model``: a VisitTimeModel or its path; default: the checkpoint's), and the
        counters and settings of the run; with
        ``exclude_patients``, ``copies_redrawn`` (patients returned with a redrawn record) and
        ``copies_dropped`` (patients still copies after ``copy_redraws`` redraws, left out).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if copy_redraws is None:
        copy_redraws = DEFAULT_COPY_REDRAWS
    if isinstance(copy_redraws, bool) or not isinstance(copy_redraws, (int, np.integer)) or copy_redraws < 0:
        raise ValueError(f"copy_redraws must be an integer >= 0, got {copy_redraws!r}")
    multimodal = len(getattr(tokenizer, "modalities", ("diagnoses",))) > 1
    if mode == "given_diagnoses" and not multimodal:
        raise ValueError("mode='given_diagnoses' needs a model whose tokenizer holds other modalities than diagnoses")
    if exclude_patients is None:
        known = None
    elif multimodal:  # a copy repeats every modality of a training patient
        known = {_visit_key(tokenizer.merge_visits(p)) for p in _rows(exclude_patients)}
    else:
        known = {_visit_key(v) for v in columns(exclude_patients)[2]}
    if multimodal and mode == "seeded" and seed_patients is not None:
        seed_patients = [{**p, "visits": tokenizer.merge_visits(p)} for p in _rows(seed_patients)]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()

    def need_prior() -> CohortPrior:
        nonlocal prior
        if isinstance(prior, CohortPrior):
            return prior
        source = prior
        if source is None:
            source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
        try:
            prior = load_prior(source)
        except ValueError as err:
            raise ValueError(
                f"mode={mode!r} with visit_length={config.visit_length!r} needs a CohortPrior: pass prior= or save "
                f"{PRIOR_FILE} in the checkpoint (CohortPrior.from_patients(train).save(dir)); looked in {source!r}"
            ) from err
        return prior

    plan = _make_plan(mode, n, rng, need_prior, demographics, seed_patients, config.seed_visits, config.visit_length)
    typed = getattr(model.config, "visit_type_feature_index", None) is not None
    # Seeded modes keep the seed's lengths (given_diagnoses: its diagnosis counts).
    retime = config.visit_length == "data" and mode not in ("seeded", "given_diagnoses")

    def finish(p: _Plan, stream) -> None:
        if typed:
            _draw_types(p, need_prior(), stream, retime=retime)
        if multimodal:
            _modality_plan(p, mode, tokenizer, need_prior, stream)

    finish(plan, rng)
    max_codes = config.max_codes
    if max_codes is None:
        try:  # the longest training visit, when a prior is at hand
            max_codes = need_prior().max_codes_per_visit
        except ValueError:
            max_codes = DEFAULT_MAX_CODES
    max_history_length = _history_length(model, config)

    index = VocabIndex(tokenizer, size=model.config.vocab_size).to(next(model.parameters()).device)
    edit_table = None
    if config.cms:
        if config.cms_edits is None:
            raise ValueError("cms=True needs the CMS edits of the vocabulary (the generation config's cms_edits, "
                             "which a checkpoint saved by promptehr_hf carries); pass cms=False to generate without "
                             "the CMS age/sex edits")
        edit_table = CMSEditTable(index, config.cms_edits)
    type_table = None
    if config.stage_two == "type":
        if not typed:
            raise ValueError("stage_two='type' needs a model conditioned on visit types (its config's "
                             "visit_type_feature_index); use 'empirical' or 'model'")
        type_table = type_code_log_probs(need_prior(), tokenizer, index)
    recurrence = None
    if type_table is not None and config.recurrence:
        recurrence = recurrence_log_lifts(need_prior(), tokenizer, index)
    pair_scores = None
    if config.stage_two != "model" and config.pair_weight:
        try:  # the prior's pair counts, when a prior is at hand (seeded mode may have none)
            pair_prior = need_prior()
        except ValueError:
            pair_prior = None
        if pair_prior is not None:
            pair_scores = code_pair_scores(pair_prior, tokenizer, index)
    calibration = None
    if config.calibration and config.category_calibration:
        calibration = category_calibration_row(config.category_calibration, tokenizer, index)
    was_training = model.training  # the trainer's monitoring callback generates mid-training
    model.eval()
    run = dict(index=index, edit_table=edit_table, max_codes=int(max_codes), max_history_length=max_history_length,
               progress=progress, type_table=type_table, recurrence=recurrence, calibration=calibration,
               pair_scores=pair_scores)
    redrawn = np.zeros(len(plan.ages), dtype=bool)
    copies = np.zeros(0, dtype=np.int64)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            counters = _run_plan(model, tokenizer, plan, config, **run)
            if known is not None:
                copies = _copies(plan, np.arange(len(plan.ages)), known)
                for round_ in range(1, int(copy_redraws) + 1):
                    if len(copies) == 0:
                        break
                    # A stream of its own per round (numpy for the plan, torch for the codes), so
                    # a redraw does not replay the round before; the first round keeps `seed`.
                    round_rng = np.random.default_rng([seed, round_])
                    torch.manual_seed(int(round_rng.integers(2 ** 63)))
                    redraw = _redraw_plan(plan, copies, mode, round_rng, need_prior, config.seed_visits,
                                          config.visit_length)
                    finish(redraw, round_rng)
                    more = _run_plan(model, tokenizer, redraw, config, **run,
                                     desc=f"redrawing copies ({round_}/{copy_redraws})")
                    counters = {k: counters[k] + more[k] for k in counters}
                    _replace(plan, copies, redraw)
                    redrawn[copies] = True
                    copies = _copies(plan, copies, known)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0

    stats: dict = {
        "mode": mode, "stage_two": config.stage_two, "visit_length": config.visit_length,
        "recurrence": recurrence is not None, "calibration": calibration is not None,
        "batch_size": config.batch_size, "seed": seed,
        "do_sample": config.do_sample,
        "temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p, "cms": config.cms,
        "max_codes": int(max_codes), "max_history_length": int(max_history_length), "n_generated": len(plan.ages),
        **counters,
    }
    if mode == "seeded":
        stats.update(_seed_overlap(plan))

    keep = np.ones(len(plan.ages), dtype=bool)
    keep[copies] = False
    if known is not None:
        stats.update(copy_redraws=int(copy_redraws), copies_redrawn=int((redrawn & keep).sum()),
                     copies_dropped=int((~keep).sum()))
    patients = [
        {"subject_id": j + 1, "age": float(plan.ages[i]), "sex": plan.sexes[i], "visits": plan.visits[i]}
        for j, i in enumerate(np.nonzero(keep)[0])
    ]
    if multimodal:  # merged visits -> diagnoses in "visits", the others in their own fields
        for p in patients:
            parts = [tokenizer.split_visit(v) for v in p["visits"]]
            p.update({field: [part[field] for part in parts] for field in parts[0]} if parts else {})
    stats["times"] = False
    if getattr(config, "times", True):
        if not isinstance(time_model, VisitTimeModel):
            time_model = load_time_model(time_model or getattr(model, "name_or_path", None))
        if time_model is not None:
            patients, time_stats = time_model.sample(patients, np.random.default_rng([seed, TIME_STREAM]),
                                                     tokenizer.category_of,
                                                     _age_caps(config.cms_edits if config.cms else None),
                                                     calibrated=bool(config.calibration))
            stats.update(times=True, **time_stats)
    n_visits = sum(len(p["visits"]) for p in patients)
    n_codes = sum(len(v) for p in patients for v in p["visits"])
    stats.update(
        n_patients=len(patients), n_visits=n_visits, n_codes=n_codes,
        mean_visits_per_patient=n_visits / max(len(patients), 1),
        mean_codes_per_visit=n_codes / max(n_visits, 1),
        seconds=seconds, patients_per_second=len(plan.ages) / seconds if seconds > 0 else None,
    )
    return patients, stats


def _copies(plan: _Plan, rows: np.ndarray, known: set) -> np.ndarray:
    """The patients among ``rows`` whose visits equal those of an excluded patient."""
    return np.array([i for i in rows if _visit_key(plan.visits[i]) in known], dtype=np.int64)


def _redraw_plan(plan: _Plan, rows: np.ndarray, mode: str, rng, need_prior, seed_visits, visit_length) -> _Plan:
    """A fresh plan for the patients ``rows`` of ``plan``, with their demographics: in seeded mode
    the same seeds (their kept visits, visit count and lengths); otherwise the same age and sex,
    the visit count the caller set (conditional mode's ``n_visits``) or a new one drawn from the
    prior, and, with ``visit_length="data"``, new visit lengths."""
    if mode in ("seeded", "given_diagnoses"):
        seeds = [{"age": plan.ages[i], "sex": plan.sexes[i], "visits": plan.seed_visits_all[i]} for i in rows]
        return _make_plan(mode, None, rng, need_prior, None, seeds, seed_visits, visit_length)
    demographics = [{"age": plan.ages[i], "sex": plan.sexes[i],
                     "n_visits": int(plan.n_visits[i]) if plan.fixed_n_visits[i] else None} for i in rows]
    return _make_plan("conditional", None, rng, need_prior, demographics, None, seed_visits, visit_length)


def _replace(plan: _Plan, rows: np.ndarray, redraw: _Plan) -> None:
    """Put the records of ``redraw`` (one per patient of ``rows``) in place of theirs in ``plan``."""
    for j, i in enumerate(rows):
        plan.visits[i] = redraw.visits[j]
        if plan.lengths is not None:
            plan.lengths[i] = redraw.lengths[j]
        if plan.types is not None:
            plan.types[i] = redraw.types[j]
        if plan.modality_lengths is not None:
            plan.modality_lengths[i] = redraw.modality_lengths[j]
        if plan.given is not None:
            plan.given[i] = redraw.given[j]
    plan.n_visits[rows] = redraw.n_visits
    plan.start[rows] = redraw.start


def type_code_log_probs(prior: CohortPrior, tokenizer, index: VocabIndex,
                        pseudo_visits: float = TYPE_STAGE_TWO_PSEUDO_VISITS) -> torch.Tensor:
    """[n_types, V] log P(code | category, visit type) for ``stage_two="type"``: the training
    visits of the type that hold the code, plus ``pseudo_visits`` spread over the category's codes
    as the type-blind training P(code | category), over the same sums for the category (so a
    category a type never wrote still has its codes). -inf off the generable codes."""
    vocab = tokenizer.get_vocab()
    counts = torch.zeros(prior.n_types, index.size, dtype=torch.float64)
    for m, cell in prior.type_code_counts.items():
        pairs = [(vocab[c], n) for c, n in cell.items() if c in vocab]
        if pairs:
            ids, n = zip(*pairs)
            counts[m, list(ids)] = torch.tensor(n, dtype=torch.float64)
    counts = counts.to(index.device) * index.generable
    q = index.log_code_prob.double().exp()
    per_category = torch.zeros(prior.n_types, len(index.category_ids) + 1, dtype=torch.float64, device=index.device)
    per_category.index_add_(1, index.code_category_pos[index.code_ids], counts[:, index.code_ids])
    total = per_category[:, index.code_category_pos] + pseudo_visits
    return ((counts + pseudo_visits * q) / total).log().float()


def recurrence_log_lifts(prior: CohortPrior, tokenizer, index: VocabIndex) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The prior's recurrence log-lifts over the vocabulary: ([V] per code token, [n_cat + 1] per
    category position, 0 for a category or code the prior does not list), or None when the prior
    counted no recurrences."""
    cats, codes = prior.recurrence_log_lift("categories"), prior.recurrence_log_lift("codes")
    if not cats and not codes:
        return None
    vocab = tokenizer.get_vocab()
    code_lift = torch.zeros(index.size, dtype=torch.float32)
    pairs = [(vocab[c], v) for c, v in codes.items() if c in vocab]
    if pairs:
        ids, values = zip(*pairs)
        code_lift[list(ids)] = torch.tensor(values, dtype=torch.float32)
    cat_lift = _category_positions(cats, vocab, index)
    code_lift = code_lift.to(index.device) * index.generable
    return code_lift, cat_lift


def code_pair_scores(prior: CohortPrior, tokenizer, index: VocabIndex) -> PairScores | None:
    """The prior's within-visit code pairs (:meth:`~.prior.CohortPrior.code_pairs`) as
    :class:`~.processors.PairScores` over token ids (codes the vocabulary lacks left out), or
    None when the prior counted none."""
    tokens, visits, n_visits, min_count, a, b, n = prior.code_pairs()
    if not tokens or n_visits == 0:
        return None
    vocab = tokenizer.get_vocab()
    ids = torch.tensor([vocab.get(t, -1) for t in tokens], dtype=torch.long)
    known = ids >= 0
    per_token = torch.zeros(index.size, dtype=torch.float64)
    per_token[ids[known]] = torch.from_numpy(visits).double()[known]
    censored = (min_count - 1) / 2
    rows, cols = ids[torch.from_numpy(a)], ids[torch.from_numpy(b)]
    keep = (rows >= 0) & (cols >= 0)
    rows, cols, n = rows[keep], cols[keep], torch.from_numpy(n).double()[keep]
    expected = per_token[rows] * per_token[cols] / n_visits
    value = (torch.log1p(n) - torch.log1p(expected.clamp(max=censored))).float()
    rows, cols, value = torch.cat([rows, cols]), torch.cat([cols, rows]), torch.cat([value, value])  # symmetric
    order = torch.argsort(rows * index.size + cols)
    crow = torch.zeros(index.size + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=index.size), 0)
    return PairScores(crow, cols[order], value[order], per_token.float(), float(n_visits), censored).to(index.device)


def category_calibration_row(calibration: dict, tokenizer, index: VocabIndex) -> torch.Tensor:
    """A generation config's ``category_calibration`` ({category: log-ratio}) as a [1, n_cat] row
    of category scores (0 for a category it does not list or the vocabulary lacks)."""
    return _category_positions(calibration, tokenizer.get_vocab(), index)[:-1][None, :]


def _category_positions(values: dict, vocab: dict, index: VocabIndex) -> torch.Tensor:
    """{category: value} as a [n_cat + 1] row over the category positions (0 where not given)."""
    row = torch.zeros(len(index.category_ids) + 1, dtype=torch.float32)
    pairs = [(vocab[k], float(v)) for k, v in values.items() if k in vocab]
    if pairs:
        ids, vals = zip(*pairs)
        # Every category owns a catch-all code token spelled as the category: its position is the category's.
        row[index.code_category_pos[torch.tensor(ids, device=index.device)].cpu()] = torch.tensor(vals)
    return row.to(index.device)


def _recurrence_rows(tokenizer, index: VocabIndex, previous: list[list[str]], code_log_probs: torch.Tensor,
                     lifts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' stage-two table and category scores given their previous visits (empty for a first
    visit): a code of the previous visit gets its log-lift inside its category, renormalised so that
    each category's codes still sum to 1; a category of it gets its log-lift. Returns
    (code_log_probs [B, V], category_log_lift [B, n_cat])."""
    code_lift, cat_lift = lifts
    B = len(previous)
    hot = torch.zeros(B, index.size, device=index.device)
    encoded = [tokenizer.encode_visit(visit) for visit in previous]
    rows = [i for i, visit_ids in enumerate(encoded) for _ in visit_ids]
    ids = [t for visit_ids in encoded for t in visit_ids]
    if ids:
        hot[torch.tensor(rows, device=index.device), torch.tensor(ids, device=index.device)] = 1.0
    codes = hot * index.is_code
    log_w = code_log_probs + codes * code_lift
    w = log_w.double().exp()
    per_category = torch.zeros(B, len(index.category_ids) + 1, dtype=torch.float64, device=index.device)
    per_category.index_add_(1, index.code_category_pos[index.code_ids], w[:, index.code_ids])
    total = per_category[:, index.code_category_pos].clamp(min=1e-300)
    table = torch.where(index.generable, (w / total).log(), code_log_probs.double()).float()
    cats = torch.zeros(B, len(index.category_ids) + 1, device=index.device)
    cats.scatter_(1, index.category_pos.expand(B, -1), hot)  # non-category tokens land in the last column
    return table, (cats * cat_lift)[:, :-1]


def _draw_types(plan: _Plan, prior: CohortPrior, rng, retime: bool) -> None:
    """Give every visit of ``plan`` a visit type from the prior's chain (first visit given the age
    band and the number of visits, then given the previous type); with ``retime``, draw the visit
    lengths given the types and visit indices instead (a type's visits have their own lengths)."""
    plan.types = prior.sample_visit_types(plan.ages, plan.n_visits, rng)
    if retime and plan.lengths is not None:
        index = np.concatenate([np.arange(k) for k in plan.n_visits])
        flat = prior.sample_codes_per_visit_by_type(np.concatenate(plan.types), index, rng)
        plan.lengths = np.split(flat, np.cumsum(plan.n_visits)[:-1])


def _modality_plan(plan: _Plan, mode: str, tokenizer, need_prior, rng) -> None:
    """A multimodal plan's per-modality targets, in place: the diagnosis counts stay in
    ``plan.lengths`` and the other modalities' go to ``plan.modality_lengths``. Seeded: the seed
    visits' own counts (``plan.lengths`` held whole merged visits). given_diagnoses: each visit's
    known diagnoses become its forced tokens (``plan.given``) and target. Otherwise, and for the
    other modalities of given_diagnoses, drawn from the prior given type and diagnosis count."""
    if mode == "given_diagnoses":
        unk = tokenizer.unk_token_id
        plan.given = [[[t for t in tokenizer.encode_visit(v)[1:-1] if t != unk] for v in visits]
                      for visits in plan.seed_visits_all]
        if plan.lengths is not None:
            plan.lengths = [np.array([len(g) // 2 for g in visits], dtype=np.int64) for visits in plan.given]
    if plan.lengths is None:
        return
    if mode == "seeded":
        counts = [np.array([np.bincount([tokenizer.modality_rank(c) for c in v], minlength=len(tokenizer.modalities))
                            for v in visits], dtype=np.int64).reshape(len(visits), -1)
                  for visits in plan.seed_visits_all]
        plan.lengths = [np.maximum(c[:, 0], 1) for c in counts]
        plan.modality_lengths = [c[:, 1:] for c in counts]
        return
    prior = need_prior()
    if tuple(prior.modalities) != tuple(tokenizer.modalities):
        raise ValueError(f"the cohort prior counted {list(prior.modalities)} but the tokenizer holds "
                         f"{list(tokenizer.modalities)}: count the prior with the tokenizer's modalities")
    types = None if plan.types is None else np.concatenate(plan.types)
    flat = prior.sample_modality_lengths(types, np.concatenate(plan.lengths), rng)
    plan.modality_lengths = np.split(flat, np.cumsum(plan.n_visits)[:-1])


def _make_plan(mode, n, rng, need_prior, demographics, seed_patients, seed_visits, visit_length) -> _Plan:
    data_lengths = visit_length == "data"
    if mode == "unconditional":
        if n is None or n < 0:
            raise ValueError("unconditional generation needs n >= 0")
        prior = need_prior()
        ages, sexes = prior.sample_demographics(int(n), rng)
        n_visits = prior.sample_n_visits(ages, rng)
        lengths = _prior_lengths(prior, ages, n_visits, rng) if data_lengths else None
        return _Plan(ages, sexes, n_visits, lengths)
    if mode == "conditional":
        if demographics is None:
            raise ValueError("conditional generation needs demographics (age, sex[, n_visits] per patient)")
        rows = _rows(demographics)
        if n is not None and n != len(rows):
            raise ValueError(f"conditional generation: n={n} but {len(rows)} demographics rows")
        try:
            ages = np.array([float(r["age"]) for r in rows], dtype=np.float64)
            sexes = [r["sex"] for r in rows]
        except KeyError as err:
            raise ValueError(f"conditional generation: demographics rows need 'age' and 'sex' (missing {err})") from err
        given = [r.get("n_visits") for r in rows]
        n_visits = np.array([0 if g is None else int(g) for g in given], dtype=np.int64)
        missing = np.array([g is None for g in given])
        if missing.any():
            n_visits[missing] = need_prior().sample_n_visits(ages[missing], rng)
        lengths = _prior_lengths(need_prior(), ages, n_visits, rng) if data_lengths else None
        return _Plan(ages, sexes, n_visits, lengths, fixed_n_visits=~missing)
    # seeded, given_diagnoses
    if seed_patients is None:
        raise ValueError(f"{mode} generation needs seed_patients (real patients in the patient schema)")
    seeds = _rows(seed_patients)
    if not seeds:
        raise ValueError(f"{mode} generation: no seed patients")
    if mode == "given_diagnoses":  # every visit is written (its diagnoses forced)
        seed_visits = 0
    if n is not None:
        seeds = [seeds[i] for i in rng.choice(len(seeds), size=int(n), replace=int(n) > len(seeds))]
    visits = [[list(v) for v in s["visits"]] for s in seeds]
    if any(len(v) == 0 for v in visits):
        raise ValueError(f"{mode} generation: a seed patient has no visit")
    n_visits = np.array([len(v) for v in visits], dtype=np.int64)
    given = [v[: min(seed_visits, len(v) - 1)] for v in visits]
    lengths = [np.array([max(len(x), 1) for x in v], dtype=np.int64) for v in visits] if data_lengths else None
    return _Plan([float(s["age"]) for s in seeds], [s["sex"] for s in seeds], n_visits, lengths, given, visits,
                 fixed_n_visits=np.ones(len(seeds), dtype=bool))


def _prior_lengths(prior: CohortPrior, ages: np.ndarray, n_visits: np.ndarray, rng) -> list[np.ndarray]:
    visit_age = np.repeat(ages, n_visits)
    visit_index = np.concatenate([np.arange(k) for k in n_visits]) if len(n_visits) else np.zeros(0, np.int64)
    flat = prior.sample_codes_per_visit(visit_age, visit_index, rng)
    return np.split(flat, np.cumsum(n_visits)[:-1]) if len(n_visits) else []


def _rows(data) -> list[dict]:
    """Patient-like rows from dicts, a datasets.Dataset or a dict of columns."""
    if hasattr(data, "column_names"):
        return data.to_list()
    if isinstance(data, dict):
        keys = list(data)
        return [dict(zip(keys, vals)) for vals in zip(*(data[k] for k in keys))]
    return list(data)


def _seed_overlap(plan: _Plan) -> dict:
    """How much of the seeded output comes from the seeds.

    ``seed_copied_share``: share of all output codes that are the seeds' own (the kept visits,
    plus generated codes that also occur in the seed's real visit at the same position);
    ``seed_given_share``: share in the kept visits alone; ``seed_generated_overlap``: share of
    generated codes found in the seed's same-position visit.
    """
    given = generated = overlap = 0
    for visits, real, k in zip(plan.visits, plan.seed_visits_all, plan.start):
        given += sum(len(v) for v in visits[:k])
        for v, r in zip(visits[k:], real[k:]):
            generated += len(v)
            overlap += len(set(v) & set(r))
    total = given + generated
    return {
        "seed_visits_given": int(plan.start.sum()),
        "seed_copied_share": (given + overlap) / total if total else 0.0,
        "seed_given_share": given / total if total else 0.0,
        "seed_generated_overlap": overlap / generated if generated else 0.0,
    }


__all__ = ["DEFAULT_COPY_REDRAWS", "load_prior", "sample_patients"]
