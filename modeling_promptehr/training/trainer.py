"""PromptEHRTrainer: LM + age + sex + co-occurrence losses, weighted and logged one by one.

Three failures of a multi-loss generator are made visible: a loss with no gradient (the
co-occurrence loss is computed on the predicted distribution, :mod:`.losses`), a component that
dies unseen (every component is logged raw, weighted and as a share of the total at every
logging step, in ``trainer_state.json``, with a warning when one fades), and mode collapse
(:class:`~.callbacks.GenerationMonitorCallback` generates a small cohort at each evaluation and
warns when the number of distinct codes falls below a threshold).

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

import json
import logging
import math
import os
import re

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from promptehr_hf.file_utils import write_text_atomic

from ..generation.processors import VocabIndex
from ..modeling_promptehr import VisitGrammar
from .callbacks import GenerationMonitorCallback, TimeBudgetCallback, TrainingHousekeepingCallback
from .data import PromptEHRDataCollator
from .losses import CooccurrenceLoss, save_cooccurrence, tokenizer_categories
from .training_args import COMPONENTS, PromptEHRTrainingArguments

logger = logging.getLogger(__name__)

LOG_VAR_BOUND = 6.0
LOSS_WEIGHTS_FILE = "loss_weights.safetensors"
TRAINING_ARGS_JSON = "training_args.json"
CHECKPOINT_COMPLETE = "checkpoint_complete.json"


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
            visit_types=getattr(getattr(model, "config", None), "visit_type_feature_index", None) is not None,
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
                category_modality=[processing_class.modality_rank(c) for c in self.categories],
                cross_modality=args.cooc_cross_modality,
            ).to(args.device)
        elif args.w_cooc > 0:
            raise ValueError("w_cooc > 0 needs cooccurrence_counts (category_cooccurrence of the training split)")

        self.lm_grammar = self._cooc_columns = None
        if args.lm_loss == "grammar":
            index = VocabIndex(processing_class, model.config.vocab_size)
            self.lm_grammar = VisitGrammar(index.head_ids, index.category_pos, index.kids, index.kid_ok).to(args.device)
            if self.cooc_loss is not None:  # the model then returns logits over the grammar's head tokens
                self._cooc_columns = self.cooc_loss.category_columns(self.lm_grammar.head_ids)

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

        self.add_callback(TrainingHousekeepingCallback(self))
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
        if self.lm_grammar is None:
            outputs = model(**inputs)
        else:
            outputs = model(**inputs, lm_grammar=self.lm_grammar)
        raw = {"lm": outputs.lm_loss}
        for name in ("age", "sex"):
            value = getattr(outputs, f"{name}_loss", None)
            if value is not None:
                raw[name] = value
        if self.cooc_loss is not None:
            raw["cooc"] = self.cooc_loss(outputs.logits, inputs["labels"], category_columns=self._cooc_columns)
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
        its start: it no longer trains anything."""
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

    # --------------------------------------------------------------------------- resuming
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """Trainer's ``train``; ``resume_from_checkpoint=True`` resumes from the newest *complete*
        checkpoint in ``args.output_dir`` (:func:`last_complete_checkpoint`), warning about newer
        incomplete ones (a save cut short, or files lost since), where Trainer would take the newest
        folder whatever it holds. A checkpoint folder given by name is used as given, with a warning
        when it is incomplete."""
        with_optimizer = not self.args.save_only_model
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir, with_optimizer=with_optimizer)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir})")
            logger.info("resuming from %s", resume_from_checkpoint)
        elif isinstance(resume_from_checkpoint, (str, os.PathLike)):
            problems = checkpoint_problems(resume_from_checkpoint, with_optimizer=with_optimizer)
            if problems:
                logger.warning("checkpoint %s is incomplete (%s); resuming from it as asked", resume_from_checkpoint,
                               "; ".join(problems))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, then a completion marker (:func:`checkpoint_problems`) once every
        process has written its part; older checkpoints are rotated out only after that, so a save
        cut short never leaves the output folder without a complete checkpoint."""
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        marker = os.path.join(output_dir, CHECKPOINT_COMPLETE)
        if self.args.should_save and os.path.exists(marker):  # saving over an earlier checkpoint of this step
            os.remove(marker)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # Trainer rotates before the marker is written: rotate here, after it
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every process's RNG state is in the folder
        if self.args.should_save:
            write_checkpoint_marker(output_dir, self.state.global_step)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

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
        write_text_atomic(os.path.join(output_dir, TRAINING_ARGS_JSON), self.args.to_json_string())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        # Optimizer state holds the log-variances' moments, not their values: save those too.
        if self.loss_log_vars is not None and self.args.should_save:
            save_file({"log_vars": self.loss_log_vars.detach().cpu()}, os.path.join(output_dir, LOSS_WEIGHTS_FILE),
                      metadata={"components": ",".join(COMPONENTS)})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, LOSS_WEIGHTS_FILE)
        if self.loss_log_vars is not None and path is not None and os.path.isfile(path):
            with torch.no_grad():
                self.loss_log_vars.copy_(load_file(path)["log_vars"].to(self.loss_log_vars.device))


_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_RNG_STATE_RE = re.compile(r"^rng_state(_\d+)?\.pth$")
_WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def write_checkpoint_marker(folder: str, global_step: int) -> None:
    """Write ``checkpoint_complete.json`` into a checkpoint folder whose files are all written: the
    step and every file's size (relative path -> bytes). Written to a temporary name and renamed,
    so the marker itself is never partial."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if not rel.startswith(CHECKPOINT_COMPLETE):  # the marker, or its temporary file
                files[rel] = os.path.getsize(path)
    marker = os.path.join(folder, CHECKPOINT_COMPLETE)
    tmp = f"{marker}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"global_step": global_step, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)


def checkpoint_problems(folder: str, *, with_optimizer: bool = True) -> list[str]:
    """What keeps ``folder`` from being a complete checkpoint; an empty list when it is one.

    Complete: its ``checkpoint_complete.json`` (written by PromptEHRTrainer after everything else)
    is readable, every file it lists is there with the size it lists, and the list holds what a
    resume needs: model weights, ``trainer_state.json`` and, with ``with_optimizer`` (unless the
    run saves the model only), ``optimizer.pt``, ``scheduler.pt`` and an RNG state."""
    if not os.path.isdir(folder):
        return ["not a folder"]
    try:
        with open(os.path.join(folder, CHECKPOINT_COMPLETE), encoding="utf-8") as f:
            files = dict(json.load(f)["files"])
    except FileNotFoundError:
        return [f"no {CHECKPOINT_COMPLETE}: its save did not finish"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"unreadable {CHECKPOINT_COMPLETE} ({e})"]
    problems = []
    for rel, size in files.items():
        path = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(path):
            problems.append(f"{rel} missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{rel} has {os.path.getsize(path)} bytes, {size} when saved")
    needed = {"model weights": any(name in files for name in _WEIGHTS), TRAINER_STATE_NAME: TRAINER_STATE_NAME in files}
    if with_optimizer:
        needed |= {OPTIMIZER_NAME: OPTIMIZER_NAME in files, SCHEDULER_NAME: SCHEDULER_NAME in files,
                   "RNG state": any(_RNG_STATE_RE.match(name) for name in files)}
    return problems + [f"no {what} saved" for what, saved in needed.items() if not saved]


def last_complete_checkpoint(output_dir: str, *, with_optimizer: bool = True) -> str | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` that is complete
    (:func:`checkpoint_problems`), or None. Each newer, incomplete one is skipped with a
    ``logger.warning`` naming the folder and what it lacks."""
    if not os.path.isdir(output_dir):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))),
                   reverse=True)
    for _, name in found:
        path = os.path.join(output_dir, name)
        problems = checkpoint_problems(path, with_optimizer=with_optimizer)
        if not problems:
            return path
        logger.warning("checkpoint %s is incomplete (%s): not resuming from it", path, "; ".join(problems))
    return None


def _all_reduce_mean(grad: torch.Tensor) -> torch.Tensor:
    """Average a non-DDP parameter's gradient over processes (DDP only syncs the model's)."""
    if dist.is_available() and dist.is_initialized():
        grad = grad.clone()
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    return grad


