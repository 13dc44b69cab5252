"""PromptEHRTrainingArguments: TrainingArguments plus the PromptEHR losses, data noise and monitoring."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .data import CODE_ORDERS

COMPONENTS = ("lm", "age", "sex", "cooc")
WEIGHTING_MODES = ("fixed", "scheduled", "learned")
LM_LOSSES = ("full", "grammar")


@dataclass
class PromptEHRTrainingArguments(TrainingArguments):
    """TrainingArguments plus the PromptEHR loss, data and monitoring settings.

    Defaults changed from TrainingArguments: ``remove_unused_columns=False`` (the collator reads
    raw example columns), ``train_sampling_strategy="group_by_length"`` (histories range from
    nothing to hundreds of tokens), ``prediction_loss_only=True`` (never gather [B, T, V] logits).
    """

    lm_loss: str = field(default="full", metadata={
        "help": "'full': each decoder position's softmax covers the whole vocabulary; 'grammar': only the "
                "tokens the visit grammar allows there (the categories and visit markers; after a category, "
                "its codes), the distribution generation samples from"})
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
    cooc_cross_modality: bool = field(default=True, metadata={
        "help": "the co-occurrence loss also scores pairs of categories of two modalities (multimodal "
                "tokenizers; False: within a modality only)"})
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
        "help": "time budget of this run in minutes: the schedule is fitted to the steps that fit (measured "
                "after a few warm-up steps, and re-planned as the pace changes), and training stops (saving) when "
                "the time is up"})
    remove_unused_columns: bool = False
    train_sampling_strategy: str = "group_by_length"
    prediction_loss_only: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.loss_weighting not in WEIGHTING_MODES:
            raise ValueError(f"loss_weighting must be one of {WEIGHTING_MODES}, got {self.loss_weighting!r}")
        if (self.loss_schedule is not None) != (self.loss_weighting == "scheduled"):
            raise ValueError("loss_schedule is given exactly when loss_weighting='scheduled'")
        if self.lm_loss not in LM_LOSSES:
            raise ValueError(f"lm_loss must be one of {LM_LOSSES}, got {self.lm_loss!r}")
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
