"""Trainer callbacks: epoch and special-token housekeeping, a generation monitor against mode
collapse, and the time budget that re-plans the schedule."""

from __future__ import annotations

import logging
import time
from collections import deque

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
    """A small unconditional cohort through the package's generation loop (``generate_patients``)."""
    cohort, _ = generate_patients(model, tokenizer, n, mode="unconditional", prior=prior, batch_size=batch_size,
                                  seed=seed, max_history_length=max_history_length, progress=False)
    return cohort


class GenerationMonitorCallback(TrainerCallback):
    """At each evaluation: generate a small cohort and log its diversity, so that mode collapse
    shows during training rather than after it.

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

    The first ``warmup_steps`` optimizer steps are not measured: their time (CUDA start-up,
    kernel selection, first allocations) counts against the budget but says nothing about the
    pace of later steps. After them the callback plans, once ``calibration_steps`` more steps are
    done (or a ``replan_fraction`` of the budget has gone by), then again every
    ``replan_fraction`` of the budget and at the first step after each evaluation: it measures the
    pace over the later half of the time since the warm-up (so that a change of pace, e.g.
    length-grouped batches of another size, or evaluations, enters the plan while single batches
    do not swing it), estimates the steps that fit in the remaining time with a 5% margin, and
    re-plans the run up or down: ``state.max_steps`` and the learning-rate schedule are rebuilt for
    the steps that fit, so the schedule decays to its end inside the budget instead of being cut
    half-way. A re-plan never goes beyond the ``max_steps`` the run was started with, and skips
    changes under 2%. Whatever happens, training stops (and saves) once the time is up. In
    multi-process runs rank 0's clock decides for everyone (a broadcast), so all processes plan
    alike and stop at the same step.
    """

    MARGIN = 0.95  # share of the remaining time planned for
    MIN_CHANGE = 0.02  # smaller re-plans are skipped

    def __init__(self, trainer, max_minutes: float, warmup_steps: int = 5, calibration_steps: int = 20,
                 replan_fraction: float = 0.05):
        self.trainer = trainer
        self.max_seconds = 60.0 * max_minutes
        self.warmup_steps = warmup_steps
        self.calibration_steps = calibration_steps
        self.replan_seconds = replan_fraction * self.max_seconds
        self.start = self.start_step = self.requested_steps = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.start_step = time.monotonic(), state.global_step
        self.requested_steps = state.max_steps
        self.warm = None  # (time, step) at the end of the warm-up
        self.samples = deque()  # (time, step) since then, thinned; the first one at or before the window
        self.last_plan = None  # (time, step) of the last plan
        self.after_evaluation = False

    def on_evaluate(self, args, state, control, **kwargs):
        self.after_evaluation = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is None:
            return control
        now, step = time.monotonic(), state.global_step
        if self.warm is None and step - self.start_step >= self.warmup_steps:
            self.warm = (now, step)
            self.samples.append(self.warm)
        fit = self._fit(now, step) if self.warm is not None else None
        stop = now - self.start > self.max_seconds
        if dist.is_available() and dist.is_initialized():
            decision = torch.tensor([float(stop), -1.0 if fit is None else float(fit)], device=args.device)
            dist.broadcast(decision, src=0)
            stop, fit = bool(decision[0].item()), (None if decision[1].item() < 0 else int(decision[1].item()))
        if fit is not None and step < state.max_steps:  # (at max_steps Trainer's flow has already ended the run)
            self.last_plan, self.after_evaluation = (now, step), False
            fit = max(min(fit, self.requested_steps), step + 1)
            if abs(fit - state.max_steps) > self.MIN_CHANGE * state.max_steps:
                self._replan(state, fit)
        if stop:
            logger.warning("time limit of %.3g minutes reached at step %d: stopping", self.max_seconds / 60, step)
            control.should_training_stop = True
            control.should_save = True
        return control

    def _fit(self, now: float, step: int) -> int | None:
        """When a plan is due: the step at which the run should end, at the pace of the later half
        of the time since the warm-up; otherwise None."""
        warm_time, warm_step = self.warm
        samples = self.samples
        if now - samples[-1][0] >= self.replan_seconds / 16 and step > samples[-1][1]:  # thinned: a few per plan
            samples.append((now, step))
        if self.last_plan is None:
            due = step - warm_step >= self.calibration_steps or (
                step - warm_step >= 2 and now - warm_time >= self.replan_seconds)
        else:
            due = step > self.last_plan[1] and (self.after_evaluation or now - self.last_plan[0] >= self.replan_seconds)
        if not due or now <= warm_time or step <= warm_step:
            return None
        window_start = (now + warm_time) / 2
        while len(samples) > 1 and samples[1][0] <= window_start:
            samples.popleft()
        t0, s0 = samples[0]
        if now <= t0 or step <= s0:
            t0, s0 = warm_time, warm_step
        remaining = max(self.max_seconds - (now - self.start), 0.0)
        return step + int(self.MARGIN * remaining * (step - s0) / (now - t0))

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
