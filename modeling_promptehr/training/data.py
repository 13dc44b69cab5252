"""Training examples for PromptEHR: one per (patient, target visit), and their collator.

Example t of a patient: the encoder reads the demographics (``x_num`` = [age in years],
``x_cat`` = [sex, F=0 / M=1], then visit t's type when the model is conditioned on visit types)
and the history ``visits[:t]`` (newest visits that fit, with BART noise); the decoder writes
visit t, ``<v> C:cat code ... </v>``. The first visit (t = 0) has the
empty history ``<s> </s>``: most MIMIC patients have a single admission.

Examples keep raw codes; the collator tokenizes, so that the order of codes inside a visit
(``seq_num`` | ``shuffle`` | ``hierarchical``) and the noise are drawn anew every epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from promptehr_hf.datasets_scripts.cohort_io import patients_to_dataset
from promptehr_hf.datasets_scripts.schema import SEXES

CODE_ORDERS = ("seq_num", "shuffle", "hierarchical")
IGNORE_INDEX = -100
EXAMPLE_FEATURES = datasets.Features({
    "subject_id": datasets.Value("int64"),
    "age": datasets.Value("float32"),
    "sex": datasets.Value("string"),
    # visits[:t + 1] of the patient: the history, then the target visit last
    "visits": datasets.List(datasets.List(datasets.Value("string"))),
    "length": datasets.Value("int32"),  # estimated encoder + decoder tokens (for length grouping)
    "visit_type": datasets.Value("int32"),  # type of the target visit (-1: no visit types)
})


def visit_tokens(n_codes: np.ndarray | int) -> np.ndarray | int:
    """Tokens of an encoded visit with n codes: ``<v>`` + (category, code) pairs + ``</v>``."""
    return 2 + 2 * n_codes


def build_examples(patients: datasets.Dataset | Iterable[dict], max_source_length: int = 256,
                   max_target_length: int = 96, num_proc: int | None = None,
                   visit_types: Sequence[Sequence[int]] | None = None) -> datasets.Dataset:
    """Patients -> one example per (patient, visit t), with ``length`` and ``visit_type`` columns.

    Args:
        patients: a datasets.Dataset with PATIENT_FEATURES, or patient dicts.
        max_source_length / max_target_length: caps used for the length estimate.
        visit_types: the type of every visit of every patient (patients' order), or None (-1).
    Returns:
        datasets.Dataset with EXAMPLE_FEATURES, ``sum(len(p.visits))`` rows, held in memory: no
        cache file is written (patient rows stay out of the datasets cache, whatever ``patients``
        was loaded from).
    """
    if not isinstance(patients, datasets.Dataset):
        patients = patients_to_dataset(list(patients))  # dicts without times read as null times

    if visit_types is not None and len(visit_types) != len(patients):
        raise ValueError(f"build_examples: visit_types has {len(visit_types)} patients, the cohort {len(patients)}")

    def explode(batch: dict[str, list], rows: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in EXAMPLE_FEATURES}
        for row, sid, age, sex, visits in zip(rows, batch["subject_id"], batch["age"], batch["sex"], batch["visits"]):
            types = visit_types[row] if visit_types is not None else [-1] * len(visits)
            if len(types) != len(visits):
                raise ValueError(f"build_examples: patient {sid} has {len(visits)} visits but {len(types)} visit types")
            sizes = visit_tokens(np.array([len(v) for v in visits], dtype=np.int64))
            history = 2 + np.concatenate([[0], np.cumsum(sizes)[:-1]])  # <s> ... </s> before visit t
            lengths = np.minimum(history, max_source_length) + np.minimum(sizes, max_target_length)
            for t in range(len(visits)):
                out["subject_id"].append(sid)
                out["age"].append(age)
                out["sex"].append(sex)
                out["visits"].append(visits[: t + 1])
                out["length"].append(int(lengths[t]))
                out["visit_type"].append(int(types[t]))
        return out

    return patients.map(explode, batched=True, with_indices=True, batch_size=1000,
                        remove_columns=patients.column_names,
                        features=EXAMPLE_FEATURES, num_proc=num_proc, keep_in_memory=True,
                        desc="training examples")


@dataclass
class PromptEHRDataCollator:
    """Tokenize, noise and pad a list of examples into model inputs.

    Returns a dict of tensors: ``input_ids`` / ``attention_mask`` [B, S] (encoder, padded with
    ``pad_token_id``), ``labels`` [B, T] (the target visit, padded with -100), ``x_num`` [B, 1]
    float (age in years), ``x_cat`` [B, 1] long (sex, F=0, M=1), or [B, 2] (sex, visit type)
    with ``visit_types``.

    Args:
        tokenizer: a PromptEHRTokenizer.
        code_order: ``seq_num`` (as stored), ``shuffle`` (a fresh permutation of every visit at
            every call, from a seeded RNG) or ``hierarchical`` (sorted by code, so codes of one
            category sit together, categories in code order); inside each modality of a
            multimodal tokenizer (diagnoses, then procedures, then medications).
        mask_prob: chance that a history category/code token becomes ``<mask>`` (BART token masking).
        delete_prob: expected share of history category/code tokens deleted, in spans of mean
            length ``delete_span`` (Poisson; BART span deletion).
        keep_target_prob: chance that a random part (up to ``keep_target_frac`` of its codes,
            at least one, never all) of the target visit is appended to the encoder's history as
            a partial visit (PromptEHR); the decoder still writes the whole visit.
        noise: False disables masking, deletion and target keeping (evaluation).
        visit_types: append each example's ``visit_type`` to ``x_cat`` (a model conditioned on
            visit types, ``config.visit_type_feature_index`` = 1).

    Randomness (shuffles, noise) is a pure function of (``seed``, ``epoch``, the batch's
    examples): the trainer sets ``epoch`` at each epoch start, so every epoch draws anew, and a
    run resumed from a checkpoint sees exactly the batches of the original run (a stateful RNG
    would not survive the DataLoader's one-batch prefetch). With ``persistent_workers`` the
    workers' copies would not see ``epoch`` change: keep it off.
    """

    tokenizer: Any
    code_order: str = "seq_num"
    max_source_length: int = 256
    max_target_length: int = 96
    mask_prob: float = 0.0
    delete_prob: float = 0.0
    delete_span: float = 3.0
    keep_target_prob: float = 0.0
    keep_target_frac: float = 0.5
    noise: bool = True
    visit_types: bool = False
    seed: int = 0
    epoch: int = 0

    def __post_init__(self):
        if self.code_order not in CODE_ORDERS:
            raise ValueError(f"code_order must be one of {CODE_ORDERS}, got {self.code_order!r}")
        for name in ("mask_prob", "delete_prob", "keep_target_prob", "keep_target_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_target_length < 4:
            raise ValueError("max_target_length must leave room for <v> category code </v>")
        tok = self.tokenizer
        self._structure = np.array(sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                           tok.visit_start_id, tok.visit_end_id}))

    def _order(self, visit: Sequence[str], rng: np.random.Generator) -> list[str]:
        if self.code_order == "shuffle":
            out = [visit[i] for i in rng.permutation(len(visit))]
        elif self.code_order == "hierarchical":
            out = sorted(visit)
        else:
            out = list(visit)
        if len(getattr(self.tokenizer, "modalities", ())) > 1:  # modality blocks in order, before any truncation
            out.sort(key=self.tokenizer.modality_rank)
        return out

    def _noise(self, ids: list[int], rng: np.random.Generator) -> list[int]:
        """BART span deletion then token masking, on category/code tokens only."""
        a = np.asarray(ids, dtype=np.int64)
        eligible = ~np.isin(a, self._structure)
        n = len(a)
        keep = np.ones(n, dtype=bool)
        if self.delete_prob > 0:
            pos = np.arange(n)
            starts = eligible & (rng.random(n) < self.delete_prob / self.delete_span)
            ends = np.where(starts, pos + np.maximum(rng.poisson(self.delete_span, n), 1), 0)
            covered = np.maximum.accumulate(ends) > pos  # inside a span started at or before here
            keep = ~(covered & eligible)
        if self.mask_prob > 0:
            a = np.where(eligible & (rng.random(n) < self.mask_prob), self.tokenizer.mask_token_id, a)
        return a[keep].tolist()

    def _target_codes(self, visit: list[str]) -> list[str]:
        return visit[: (self.max_target_length - 2) // 2]  # (category, code) pairs + <v> </v>

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # An example is (subject_id, t + 1): unique, and stable across runs.
        rng = np.random.default_rng([self.seed, self.epoch] + [
            x for f in features for x in (int(f["subject_id"]) % 2**63, len(f["visits"]))
        ])
        tok = self.tokenizer
        sources, targets = [], []
        for f in features:
            visits = [self._order(v, rng) for v in f["visits"]]
            history, target = visits[:-1], self._target_codes(visits[-1])
            noisy = self.noise and (self.mask_prob > 0 or self.delete_prob > 0)
            if self.noise and len(target) > 1 and rng.random() < self.keep_target_prob:
                n_keep = int(rng.integers(1, min(len(target), max(2, int(len(target) * self.keep_target_frac) + 1))))
                history = [*history, [target[i] for i in np.sort(rng.choice(len(target), n_keep, replace=False))]]
            src = tok.encode_history(history, self.max_source_length)
            sources.append(self._noise(src, rng) if noisy else src)
            targets.append(tok.encode_visit(target))
        S, T = max(map(len, sources)), max(map(len, targets))
        cat = [[SEXES.index(f["sex"])] for f in features]
        if self.visit_types:
            if any(f.get("visit_type", -1) < 0 for f in features):
                raise ValueError("PromptEHRDataCollator: visit_types=True needs every example's visit_type")
            cat = [[*c, int(f["visit_type"])] for c, f in zip(cat, features)]
        input_ids = torch.full((len(features), S), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), S), dtype=torch.long)
        labels = torch.full((len(features), T), IGNORE_INDEX, dtype=torch.long)
        for i, (src, tgt) in enumerate(zip(sources, targets)):
            input_ids[i, : len(src)] = torch.tensor(src)
            attention_mask[i, : len(src)] = 1
            labels[i, : len(tgt)] = torch.tensor(tgt)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "x_num": torch.tensor([[float(f["age"])] for f in features], dtype=torch.float32),
            "x_cat": torch.tensor(cat, dtype=torch.long),
        }
