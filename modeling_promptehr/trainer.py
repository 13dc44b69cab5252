"""PromptEHRTrainer: LM + age + sex + co-occurrence losses, weighted and logged one by one.

The prototype this package replaces failed here three ways, each now impossible to miss:
its co-occurrence loss had no gradient (it is computed on the predicted distribution now,
:mod:`.cooccurrence`), its sex loss died at step 14 unseen (every component is logged raw,
weighted and as a share of the total at every logging step, in ``trainer_state.json``), and its
model collapsed to 31 codes (:class:`GenerationMonitorCallback` generates a small cohort at
each evaluation and warns when the number of distinct codes falls below a threshold).

Total loss = sum over components c in (lm, age, sex, cooc) of weighted_c, where
- ``fixed``: weighted_c = w_c * L_c (w_lm = 1);
- ``scheduled``: the same with w_c changed at given steps (``loss_schedule="sex:0@500"``);
- ``learned``: uncertainty weighting (Kendall, Gal & Cipolla 2018): total =
  sum_c exp(-s_c) * L_c + sum_c s_c, one learnable log-variance s_c per component whose
  w_c > 0, initialised to -log(w_c) (training starts from the fixed weights) and clamped to
  [-LOG_VAR_BOUND, LOG_VAR_BOUND]. weighted_c = exp(-s_c) * L_c (what moves the model); the
  regulariser sum_c s_c is logged as ``loss_log_var_sum``.

Logged at every logging step (means over the micro-batches since the previous one, over all
processes): ``loss_<c>`` (raw), ``loss_<c>_weighted``, ``loss_<c>_share`` (weighted_c / sum of
weighted), ``weight_<c>`` and ``loss_<c>_vs_start`` (raw / first logged value, with a warning
once a weighted component falls below ``dead_loss_ratio`` of its start); at evaluation the
same with the ``eval_`` prefix (without ``_vs_start``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from promptehr_hf.modeling_promptehr.cooccurrence import (
    CooccurrenceLoss,
    save_cooccurrence,
    tokenizer_categories,
)
from promptehr_hf.modeling_promptehr.data import CODE_ORDERS, PromptEHRDataCollator

logger = logging.getLogger(__name__)

COMPONENTS = ("lm", "age", "sex", "cooc")
WEIGHTING_MODES = ("fixed", "scheduled", "learned")
LOG_VAR_BOUND = 6.0
LOSS_WEIGHTS_FILE = "loss_weights.safetensors"
TRAINING_ARGS_JSON = "training_args.json"


@dataclass
class PromptEHRTrainingArguments(TrainingArguments):
    """TrainingArguments plus the PromptEHR loss, data and monitoring settings.

    Defaults changed from TrainingArguments: ``remove_unused_columns=False`` (the collator reads
    raw example columns), ``train_sampling_strategy="group_by_length"`` (histories range from
    nothing to hundreds of tokens), ``prediction_loss_only=True`` (never gather [B, T, V] logits).
    """

    w_age: float = field(default=0.1, metadata={"help": "weight of the age regression loss"})
    w_sex: float = field(default=0.1, metadata={"help": "weight of the sex classification loss"})
    w_cooc: float = field(default=0.1, metadata={"help": "weight of the category co-occurrence loss"})
    loss_weighting: str = field(default="fixed", metadata={"help": f"one of {WEIGHTING_MODES}"})
    loss_schedule: str | None = field(default=None, metadata={
        "help": "scheduled mode: comma list of component:weight@step, e.g. 'sex:0@500,cooc:0.05@1000' "
                "(from that optimizer step on)"})
    loss_weights_learning_rate: float = field(default=1e-2, metadata={
        "help": "learned mode: learning rate of the log-variances"})
    cooc_tau: float = field(default=5.0, metadata={"help": "pairs seen in fewer training visits are penalised"})
    code_order: str = field(default="shuffle", metadata={"help": f"order of codes in a visit: {CODE_ORDERS}"})
    mask_prob: float = field(default=0.15, metadata={"help": "BART token masking of history codes"})
    delete_prob: float = field(default=0.1, metadata={"help": "BART span deletion share of history codes"})
    keep_target_prob: float = field(default=0.0, metadata={
        "help": "chance of showing part of the target visit to the encoder (PromptEHR)"})
    max_source_length: int = field(default=256, metadata={"help": "encoder tokens (newest visits kept)"})
    max_target_length: int = field(default=96, metadata={"help": "decoder tokens of the target visit"})
    eval_generate_patients: int = field(default=64, metadata={
        "help": "patients generated at each evaluation to watch diversity (0: off)"})
    eval_generate_batch_size: int = field(default=64, metadata={"help": "batch size of that generation"})
    collapse_min_distinct_codes: int = field(default=50, metadata={
        "help": "warn (mode collapse) when the generated cohort has fewer distinct codes"})
    dead_loss_ratio: float = field(default=0.01, metadata={
        "help": "warn when a weighted loss component falls below this share of its first logged value"})
    max_minutes: float | None = field(default=None, metadata={
        "help": "time budget of this run in minutes: the schedule is shortened to the steps that fit "
                "(measured after 50 steps), and training stops (saving) when the time is up"})
    remove_unused_columns: bool = False
    train_sampling_strategy: str = "group_by_length"
    prediction_loss_only: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.loss_weighting not in WEIGHTING_MODES:
            raise ValueError(f"loss_weighting must be one of {WEIGHTING_MODES}, got {self.loss_weighting!r}")
        if (self.loss_schedule is not None) != (self.loss_weighting == "scheduled"):
            raise ValueError("loss_schedule is given exactly when loss_weighting='scheduled'")
        if self.code_order not in CODE_ORDERS:
            raise ValueError(f"code_order must be one of {CODE_ORDERS}, got {self.code_order!r}")
        if min(self.w_age, self.w_sex, self.w_cooc) < 0:
            raise ValueError("loss weights must be >= 0")
        self.parsed_schedule()  # fail early on a malformed schedule

    def base_weights(self) -> dict[str, float]:
        return {"lm": 1.0, "age": self.w_age, "sex": self.w_sex, "cooc": self.w_cooc}

    def parsed_schedule(self) -> list[tuple[int, str, float]]:
        """``loss_schedule`` as (step, component, weight), sorted by step."""
        if not self.loss_schedule:
            return []
        out = []
        for item in self.loss_schedule.split(","):
            m = re.fullmatch(r"\s*(\w+)\s*:\s*([0-9.eE+-]+)\s*@\s*(\d+)\s*", item)
            if m is None or m.group(1) not in COMPONENTS:
                raise ValueError(f"loss_schedule item {item!r}: expected component:weight@step with component in "
                                 f"{COMPONENTS}")
            out.append((int(m.group(3)), m.group(1), float(m.group(2))))
        return sorted(out)


class PromptEHRTrainer(Trainer):
    """Trainer whose loss recombines the model's ``lm_loss``/``age_loss``/``sex_loss`` with the
    co-occurrence loss on ``logits`` under fixed, scheduled or learned weights.

    Args (beyond Trainer's):
        processing_class: the PromptEHRTokenizer (required: the collator and the co-occurrence
            loss need its ids).
        cooccurrence_counts: C [K, K] over the tokenizer's categories
            (:func:`.cooccurrence.category_cooccurrence` of the training split); required when
            ``args.w_cooc > 0``. Saved as ``cooccurrence.safetensors`` with every checkpoint.
        data_collator: defaults to a PromptEHRDataCollator from ``args``; evaluation uses the same
            settings without noise.
        eval_patients, prior, generate_fn: real patients (the validation split) to compare a
            small generated cohort with at each evaluation (:class:`GenerationMonitorCallback`;
            prior: the CohortPrior of the training split).
    """

    def __init__(self, model=None, args: PromptEHRTrainingArguments | None = None, *, processing_class=None,
                 cooccurrence_counts=None, data_collator=None, eval_patients=None, prior=None, generate_fn=None,
                 **kwargs):
        if not isinstance(args, PromptEHRTrainingArguments):
            raise TypeError("PromptEHRTrainer needs PromptEHRTrainingArguments")
        if processing_class is None:
            raise ValueError("PromptEHRTrainer needs the tokenizer as processing_class")
        collator_kwargs = dict(
            tokenizer=processing_class, code_order=args.code_order, max_source_length=args.max_source_length,
            max_target_length=args.max_target_length, seed=args.seed,
        )
        if data_collator is None:
            data_collator = PromptEHRDataCollator(
                **collator_kwargs, mask_prob=args.mask_prob, delete_prob=args.delete_prob,
                keep_target_prob=args.keep_target_prob,
            )
        self.eval_data_collator = PromptEHRDataCollator(**collator_kwargs, noise=False)
        super().__init__(model=model, args=args, processing_class=processing_class, data_collator=data_collator,
                         **kwargs)
        if args.label_names is None:
            # forward() also takes age_labels/sex_labels (defaulting to x_num/x_cat); Trainer would
            # otherwise wait for all three and never compute an evaluation loss.
            self.label_names = ["labels"]
        self.loss_is_scaled_for_ga = False  # per-batch means: Trainer divides by accumulation steps

        self.cooccurrence_counts = None
        self.cooc_loss = None
        if cooccurrence_counts is not None:
            self.cooccurrence_counts = np.asarray(cooccurrence_counts)
            self.categories, cat_ids = tokenizer_categories(processing_class)
            self.cooc_loss = CooccurrenceLoss(
                torch.as_tensor(self.cooccurrence_counts), cat_ids, tau=args.cooc_tau,
                visit_start_id=processing_class.visit_start_id,
            ).to(args.device)
        elif args.w_cooc > 0:
            raise ValueError("w_cooc > 0 needs cooccurrence_counts (category_cooccurrence of the training split)")

        self._schedule = args.parsed_schedule()
        base = args.base_weights()
        self.loss_log_vars = None
        if args.loss_weighting == "learned":
            learned = [c for c in COMPONENTS if base[c] > 0]
            init = torch.tensor([-math.log(base[c]) if c in learned else 0.0 for c in COMPONENTS])
            self.loss_log_vars = nn.Parameter(init.to(args.device))
            self._learned_mask = torch.tensor([c in learned for c in COMPONENTS], device=args.device)
            if args.world_size > 1:
                self.loss_log_vars.register_hook(_all_reduce_mean)
        # [component, (raw, weighted, weight, count)] sums between logging steps, train and eval
        self._acc = {k: torch.zeros(len(COMPONENTS), 4, dtype=torch.float64) for k in ("train", "eval")}
        self._first_raw: dict[str, float] = {}
        self._dead: set[str] = set()

        self.add_callback(_TrainingHousekeeping(self))
        if eval_patients is not None and args.eval_generate_patients > 0:
            self.add_callback(GenerationMonitorCallback(self, eval_patients, prior=prior, generate_fn=generate_fn))
        if args.max_minutes is not None:
            self.add_callback(TimeBudgetCallback(self, args.max_minutes))

    # ----------------------------------------------------------------------------- weights
    def current_weights(self, step: int | None = None) -> dict[str, float]:
        """Fixed / scheduled weights at an optimizer step (default: the current one)."""
        step = self.state.global_step if step is None else step
        weights = self.args.base_weights()
        for at, name, w in self._schedule:
            if step >= at:
                weights[name] = w
        return weights

    def combine(self, raw: dict[str, torch.Tensor]):
        """Raw component losses -> (total, weighted components, effective weights): a scalar
        tensor and two dicts of scalar tensors keyed by component."""
        weighted, weights = {}, {}
        total = None
        if self.loss_log_vars is not None:
            s = self.loss_log_vars.clamp(-LOG_VAR_BOUND, LOG_VAR_BOUND)
            for i, name in enumerate(COMPONENTS):
                if name not in raw:
                    continue
                if bool(self._learned_mask[i]):
                    weights[name] = torch.exp(-s[i])
                    total = s[i] if total is None else total + s[i]
                else:  # switched off (w = 0): logged, not trained
                    weights[name] = raw[name].new_zeros(())
                weighted[name] = weights[name] * raw[name]
        else:
            fixed = self.current_weights()
            for name, value in raw.items():
                weights[name] = value.new_tensor(fixed[name])
                weighted[name] = fixed[name] * value
        parts = torch.stack(list(weighted.values())).sum()
        return (parts if total is None else parts + total), weighted, weights

    # ------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        raw = {"lm": outputs.lm_loss}
        for name in ("age", "sex"):
            value = getattr(outputs, f"{name}_loss", None)
            if value is not None:
                raw[name] = value
        if self.cooc_loss is not None:
            raw["cooc"] = self.cooc_loss(outputs.logits, inputs["labels"])
        loss, weighted, weights = self.combine(raw)
        acc = self._acc["train" if model.training else "eval"]
        for i, name in enumerate(COMPONENTS):
            if name in raw:
                acc[i] += torch.stack([raw[name].detach().double().cpu(), weighted[name].detach().double().cpu(),
                                       weights[name].detach().double().cpu(), torch.ones((), dtype=torch.float64)])
        return (loss, outputs) if return_outputs else loss

    def _drain(self, split: str, prefix: str) -> dict[str, float]:
        """Mean of the accumulated components over micro-batches and processes; then reset."""
        acc = self._acc[split]
        if self.args.world_size > 1:
            acc = self.accelerator.reduce(acc.to(self.args.device), reduction="sum").cpu()
        self._acc[split] = torch.zeros_like(self._acc[split])
        count = acc[:, 3]
        present = count > 0
        if not present.any():
            return {}
        mean = acc[:, :3] / count.clamp(min=1)[:, None]
        total = mean[present, 1].sum().item()
        logs = {}
        if self.loss_log_vars is not None and split == "train":
            logs[f"{prefix}loss_log_var_sum"] = (
                self.loss_log_vars.detach().clamp(-LOG_VAR_BOUND, LOG_VAR_BOUND)[self._learned_mask].sum().item()
            )
        for i, name in enumerate(COMPONENTS):
            if present[i]:
                raw, weighted, weight = mean[i].tolist()
                logs[f"{prefix}loss_{name}"] = raw
                logs[f"{prefix}loss_{name}_weighted"] = weighted
                logs[f"{prefix}loss_{name}_share"] = weighted / total if total else 0.0
                logs[f"{prefix}weight_{name}"] = weight
                if split == "train":
                    self._watch_dead(name, raw, weight, logs)
        return logs

    def _watch_dead(self, name: str, raw: float, weight: float, logs: dict) -> None:
        """Log ``loss_<c>_vs_start`` (raw / its first logged value; from the log history after a
        resume) and warn once when a weighted component has fallen below ``dead_loss_ratio`` of
        its start: it no longer trains anything (the prototype's sex loss died at step 14 unseen)."""
        if name not in self._first_raw:
            earlier = [h[f"loss_{name}"] for h in self.state.log_history if f"loss_{name}" in h]
            self._first_raw[name] = earlier[0] if earlier else raw
        start = self._first_raw[name]
        logs[f"loss_{name}_vs_start"] = raw / start if start else 1.0
        if weight > 0 and start > 0 and raw < self.args.dead_loss_ratio * start and name not in self._dead:
            self._dead.add(name)
            logger.warning(
                "the %s loss has fallen to %.2g%% of its start (%.4g -> %.4g) at step %d: it no longer trains "
                "anything; its weight could go (loss_weighting='scheduled', loss_schedule='%s:0@%d')",
                name, 100 * raw / start, start, raw, self.state.global_step, name, self.state.global_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss", evaluation logs "<prefix>loss"; both ranks log together.
        if "loss" in logs:
            logs.update(self._drain("train", ""))
        else:
            eval_key = next((k for k in logs if k.endswith("_loss") and not k.startswith("loss_")), None)
            if eval_key is not None:
                logs.update(self._drain("eval", eval_key[: -len("loss")]))
        super().log(logs, start_time)

    # ------------------------------------------------------------------------ data loaders
    def _with_eval_collator(self, make, *a, **k):
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return make(*a, **k)
        finally:
            self.data_collator = train_collator

    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

    # ------------------------------------------------------------------- optimizer / saving
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.loss_log_vars is not None and not any(
            p is self.loss_log_vars for g in optimizer.param_groups for p in g["params"]
        ):
            optimizer.add_param_group({"params": [self.loss_log_vars], "weight_decay": 0.0,
                                       "lr": self.args.loss_weights_learning_rate})
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Model, tokenizer, ``cooccurrence.safetensors``, and the arguments as JSON (not pickle)."""
        super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        if self.cooccurrence_counts is not None:
            save_cooccurrence(output_dir, self.cooccurrence_counts, self.categories,
                              tokenizer_categories(self.processing_class)[1])
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if os.path.exists(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        # Optimizer state holds the log-variances' moments, not their values: save those too.
        if self.loss_log_vars is not None and self.args.should_save:
            from safetensors.torch import save_file

            save_file({"log_vars": self.loss_log_vars.detach().cpu()}, os.path.join(output_dir, LOSS_WEIGHTS_FILE),
                      metadata={"components": ",".join(COMPONENTS)})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, LOSS_WEIGHTS_FILE)
        if self.loss_log_vars is not None and path is not None and os.path.isfile(path):
            from safetensors.torch import load_file

            with torch.no_grad():
                self.loss_log_vars.copy_(load_file(path)["log_vars"].to(self.loss_log_vars.device))


def _all_reduce_mean(grad: torch.Tensor) -> torch.Tensor:
    """Average a non-DDP parameter's gradient over processes (DDP only syncs the model's)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        grad = grad.clone()
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return grad


class _TrainingHousekeeping(TrainerCallback):
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
    from promptehr_hf.modeling_promptehr.generation import generate_patients

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
        from promptehr_hf.metrics.coherence import coherence

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
        import torch.distributed as dist

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
