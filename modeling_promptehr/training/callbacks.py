"""Trainer callbacks: epoch and special-token housekeeping, a generation monitor against mode
collapse, and the time budget that re-plans the schedule."""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from promptehr_hf.metrics.coherence import coherence

from ..generation.pipeline import generate_patients

logger = logging.getLogger(__name__)


class TrainingHousekeepingCallback(TrainerCallback):
    """Tells the collator the epoch (its shuffles and noise are a function of it); undoes
    Trainer's ``align_special_tokens`` (it would set ``config.eos_token_id`` to the tokenizer's
    ``</s>``, while the decoder writes one visit and must stop at ``</v>``); zeroes the learned
    log-variances' gradient after each optimizer step (Trainer zeroes only the model's)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.special = {
            name: (getattr(trainer.model.config, name, None), getattr(trainer.model.generation_config, name, None))
            for name in ("eos_token_id", "bos_token_id", "pad_token_id")
        } if hasattr(trainer.model, "generation_config") else {}

    def on_train_begin(self, args, state, control, **kwargs):
        for name, (config_value, generation_value) in self.special.items():
            setattr(self.trainer.model.config, name, config_value)
            setattr(self.trainer.model.generation_config, name, generation_value)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.loss_log_vars is not None:
            self.trainer.loss_log_vars.grad = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.trainer.data_collator, "epoch"):
            # state.epoch is the float progress (mid-epoch after a resume): its floor is the epoch
            self.trainer.data_collator.epoch = int((state.epoch or 0.0) + 1e-9)


def default_generate(model, tokenizer, n: int, *, prior=None, batch_size: int = 64, seed: int = 0,
                     max_history_length: int | None = None):
    """A small unconditional cohort through the package's generation loop (issue 7's API)."""
    cohort, _ = generate_patients(model, tokenizer, n, mode="unconditional", prior=prior, batch_size=batch_size,
                                  seed=seed, max_history_length=max_history_length, progress=False)
    return cohort


class GenerationMonitorCallback(TrainerCallback):
    """At each evaluation: generate a small cohort and log its diversity, so that mode collapse
    shows during training (the prototype collapsed to 31 codes and nobody saw it until after).

    Logs (keys ``gen_*``, beside the evaluation's): ``gen_distinct_codes``,
    ``gen_distinct_codes_real`` (distinct codes of as many real patients), ``gen_top_code_share``
    (share of patients holding the most common code), ``gen_code_js`` (code JS divergence vs
    the real patients), ``gen_codes_per_visit``, ``gen_collapse`` (1 when distinct codes fall
    below ``args.collapse_min_distinct_codes``, with a loud ``logger.warning``).
    Runs on the main process only; the model goes back to train mode afterwards.

    Args:
        trainer: the PromptEHRTrainer (for the model, tokenizer and ``log``).
        real_patients: patient dicts or a Dataset (validation split).
        prior: CohortPrior of the training split (ages, sexes, visit counts and lengths).
        generate_fn: ``fn(model, tokenizer, n, *, prior, batch_size, seed, max_history_length)``
            -> patients; default :func:`default_generate`.
    """

    def __init__(self, trainer, real_patients, prior=None, generate_fn=None):
        self.trainer = trainer
        self.real = real_patients
        self.prior = prior
        self.generate_fn = generate_fn or default_generate

    def on_evaluate(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        model = self.trainer.model
        was_training = model.training
        n = args.eval_generate_patients
        t0 = time.perf_counter()
        try:
            cohort = self.generate_fn(model, self.trainer.processing_class, n, prior=self.prior,
                                      batch_size=args.eval_generate_batch_size, seed=args.seed + state.global_step,
                                      max_history_length=args.max_source_length)
        finally:
            model.train(was_training)
        real_same_n = self.real.select(range(min(n, len(self.real)))) if hasattr(self.real, "select") \
            else list(self.real)[:n]
        m = coherence(cohort, self.real)
        distinct = int(m["distinct_codes"])
        logs = {
            "gen_distinct_codes": distinct,
            "gen_distinct_codes_real": int(coherence(real_same_n, self.real)["distinct_codes"]),
            "gen_top_code_share": float(m["top_code_share"]),
            "gen_code_js": float(m["code_js"]),
            "gen_codes_per_visit": float(m["codes_per_visit_mean"]),
            "gen_collapse": int(distinct < args.collapse_min_distinct_codes),
            "gen_seconds": time.perf_counter() - t0,
        }
        if logs["gen_collapse"]:
            logger.warning(
                "MODE COLLAPSE? step %d: %d generated patients use only %d distinct codes (threshold %d; %d real "
                "patients use %d); top code %s held by %.0f%% of patients",
                state.global_step, n, distinct, args.collapse_min_distinct_codes, n, logs["gen_distinct_codes_real"],
                m["top_code"], 100 * logs["gen_top_code_share"],
            )
        self.trainer.log(logs)
        return control


class TimeBudgetCallback(TrainerCallback):
    """Fit training into ``max_minutes`` of this run.

    After ``calibration_steps`` optimizer steps, and again after every evaluation (whose cost
    then enters the measured rate), it estimates how many steps fit in the remaining time (with
    a 5% margin) and re-plans the run: ``state.max_steps`` and the learning-rate schedule are
    rebuilt for the steps that fit, so the schedule decays to its end inside the budget instead
    of being cut half-way. A re-plan never goes beyond the ``max_steps`` the run was started
    with, and skips changes under 2%. Whatever happens later, training stops (and saves) once
    the time is up. In multi-process runs rank 0's clock decides for everyone (a broadcast), so
    all processes stop at the same step.
    """

    def __init__(self, trainer, max_minutes: float, calibration_steps: int = 50):
        self.trainer = trainer
        self.max_seconds = 60.0 * max_minutes
        self.calibration_steps = calibration_steps
        self.start = self.start_step = self.requested_steps = None
        self.replan = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step, self.replan = time.monotonic(), state.global_step, False
        self.requested_steps = state.max_steps

    def on_evaluate(self, args, state, control, **kwargs):
        self.replan = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is None:
            return control
        elapsed = time.monotonic() - self.start
        done = state.global_step - self.start_step
        plan = done == self.calibration_steps or (self.replan and done > self.calibration_steps)
        fit = state.global_step + int(0.95 * (self.max_seconds - elapsed) * done / elapsed) if plan else 0
        decision = torch.tensor([float(elapsed > self.max_seconds), float(fit)], device=args.device)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(decision, src=0)
        stop, fit = bool(decision[0].item()), int(decision[1].item())
        if plan:
            self.replan = False
            fit = min(fit, self.requested_steps)
            if fit > state.global_step and abs(fit - state.max_steps) > 0.02 * state.max_steps:
                self._replan(state, fit)
        if stop:
            logger.warning("time limit of %.3g minutes reached at step %d: stopping", self.max_seconds / 60,
                           state.global_step)
            control.should_training_stop = True
            control.should_save = True
        return control

    def _replan(self, state, max_steps: int) -> None:
        trainer = self.trainer
        logger.info("time budget of %.3g minutes: %d steps fit (planned: %d); the learning-rate schedule now ends "
                    "there", self.max_seconds / 60, max_steps, state.max_steps)
        state.max_steps = max_steps
        trainer.lr_scheduler = None
        scheduler = trainer.create_scheduler(num_training_steps=max_steps, optimizer=trainer.optimizer)
        scheduler.last_epoch = state.global_step - 1  # continue at the current step
        scheduler.step()
        for cb in trainer.callback_handler.callbacks:  # the progress bar's total
            bar = getattr(cb, "training_bar", None)
            if bar is not None:
                bar.total = max_steps
                bar.refresh()
