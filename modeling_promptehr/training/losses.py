"""Category co-occurrence counts and the differentiable co-occurrence loss.

The penalty is an expectation under the model's own predicted distribution over category tokens
(not a function of the labels, which would be a constant with no gradient), so it moves the
logits.

Counts ``C`` [K, K] over the K category tokens of the tokenizer, from the training visits:
``C[s, k]`` (s != k) = number of training visits that contain both category s and category k.
Built with sparse products: X [n_visits, n_codes] (0/1 visit x code incidence, from
``datasets_scripts.incidence``) times the code -> category map [n_codes, K] gives N [n_visits, K],
the number of distinct codes of each category in each visit; with B = (N > 0), ``C = Bᵀ B``.

Diagonal: ``(Bᵀ B)[k, k]`` would be the number of visits with category k, which says nothing
about the event the loss scores on the diagonal: category k predicted again after k in the
same visit (two codes of one category, e.g. 4019 and 4011). So ``C[k, k]`` = number of visits
with at least two distinct codes of category k, ``(N >= 2).sum(0)``.

Loss: at each decoder position whose label is a category token, with
S = the distinct categories at earlier positions of the same visit,
``penalty = sum_k p(k) * mean_{s in S} W[s, k]`` where p is the softmax over the category-token
logits only and ``W[s, k] = tau / (C[s, k] + 1)`` if ``C[s, k] < tau`` else 0. Positions with an
empty S contribute nothing; the loss is the mean over contributing positions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from promptehr_hf.datasets_scripts import code_systems
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM
from promptehr_hf.datasets_scripts.incidence import group_columns, visit_matrix
from promptehr_hf.file_utils import atomic_write

COOCCURRENCE_FILE = "cooccurrence.safetensors"
CATEGORY_PREFIX = "C:"  # the tokenizer's category-token prefix (tokenizer contract)


def tokenizer_categories(tokenizer) -> tuple[list[str], list[int]]:
    """(category strings, their token ids) of a PromptEHRTokenizer, in ``category_ids`` order."""
    ids = list(tokenizer.category_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    bad = [t for t in tokens if not t.startswith(CATEGORY_PREFIX)]
    if bad:
        raise ValueError(f"tokenizer category tokens must start with {CATEGORY_PREFIX!r}: {bad[:5]}")
    return [t[len(CATEGORY_PREFIX):] for t in tokens], ids


def category_cooccurrence(patients: Iterable[dict], categories: Sequence[str],
                          code_system: str = DEFAULT_CODE_SYSTEM, category=None) -> np.ndarray:
    """Category co-occurrence counts from training visits (see the module docstring).

    Args:
        patients: patient dicts (schema of CONTRACTS.md) or a datasets.Dataset of them.
        categories: the K category strings ("401", "E880", ...) indexing the result; codes of
            other categories are ignored (the model cannot predict them).
        code_system: the codes' system ("icd9cm" or "icd10cm", the tokenizer's
            ``code_system``), whose ``category`` maps a code to its category.
        category: code token -> category (a multimodal tokenizer's ``category_of``), for visits
            of code tokens (``tokenizer.merge_visits``), counted as they are; then pairs across
            modalities (a diagnosis category with a procedure category) are counted too.
    Returns:
        C: int64 array [K, K], symmetric; off-diagonal = visits with both categories, diagonal =
        visits with >= 2 distinct codes of that category.
    """
    if category is None:
        category = code_systems.code_system(code_system).category
        X, codes = visit_matrix(patients, code_system=code_system)  # [n_visits, n_codes] 0/1
    else:
        X, codes = visit_matrix(patients, code_system=None)
    M, groups = group_columns(codes, category)  # [n_codes, n_groups] code -> its category
    col = {g: i for i, g in enumerate(groups)}
    # groups -> the requested categories, in their order (groups the caller lacks are dropped)
    pairs = [(col[c], k) for k, c in enumerate(categories) if c in col]
    rows, cols = (np.array(x, dtype=np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    P = sp.csr_matrix((np.ones(len(rows), np.int64), (rows, cols)), shape=(len(groups), len(categories)))
    N = (sp.csr_matrix(X, dtype=np.int64) @ M @ P).tocsr()  # [n_visits, K] distinct codes per category
    B = N.copy()
    B.data = (B.data > 0).astype(np.int64)
    C = (B.T @ B).toarray()
    np.fill_diagonal(C, np.asarray((N >= 2).sum(axis=0)).ravel())
    return C.astype(np.int64)


def save_cooccurrence(directory: str, counts: np.ndarray | torch.Tensor, categories: Sequence[str],
                      category_token_ids: Sequence[int]) -> str:
    """Write ``cooccurrence.safetensors`` into directory (atomically); returns its path.

    Tensors: ``counts`` int64 [K, K], ``category_token_ids`` int64 [K]; metadata ``categories``
    (JSON list of K strings) and how the diagonal is defined.
    """
    counts = torch.as_tensor(np.asarray(counts), dtype=torch.int64).contiguous()
    ids = torch.as_tensor(list(category_token_ids), dtype=torch.int64)
    k = len(categories)
    if counts.shape != (k, k) or ids.shape != (k,):
        raise ValueError(f"save_cooccurrence: counts {tuple(counts.shape)} / ids {tuple(ids.shape)} do not match "
                         f"{k} categories")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, COOCCURRENCE_FILE)
    metadata = {"format": "pt", "categories": json.dumps(list(categories)),
                "diagonal": "visits with >= 2 distinct codes of the category"}
    atomic_write(path, lambda tmp: save_file({"counts": counts, "category_token_ids": ids}, tmp, metadata=metadata))
    return path


def load_cooccurrence(path: str) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Read ``cooccurrence.safetensors`` (a file, or the directory holding it).

    Returns (counts int64 [K, K], categories list of K strings, category_token_ids int64 [K]).
    """
    if os.path.isdir(path):
        path = os.path.join(path, COOCCURRENCE_FILE)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            counts, ids = f.get_tensor("counts"), f.get_tensor("category_token_ids")
    except (OSError, KeyError) as err:
        raise ValueError(f"load_cooccurrence: cannot read {path}: {err}") from err
    if "categories" not in meta:
        raise ValueError(f"load_cooccurrence: {path} has no 'categories' metadata")
    return counts, json.loads(meta["categories"]), ids


def penalty_weights(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """W [K, K] float32: ``tau / (C + 1)`` where ``C < tau``, else 0."""
    c = counts.to(torch.float32)
    return torch.where(c < tau, tau / (c + 1.0), torch.zeros_like(c))


class CooccurrenceLoss(nn.Module):
    """Differentiable category co-occurrence penalty on the decoder's predicted distribution.

    Args:
        counts: C [K, K] (see :func:`category_cooccurrence`).
        category_token_ids: the K token ids of the categories, in the order of C.
        tau: pairs seen in fewer than tau training visits are penalised, by tau / (C + 1).
        visit_start_id: ``<v>`` id; labels may hold several visits, S resets at each ``<v>``.
        category_modality: the modality (0 = diagnoses, 1, 2, ...) of each of the K categories,
            with ``cross_modality=False`` only: pairs of categories of two modalities are then
            never penalised (the ablation of the cross-modality pairs).
    """

    def __init__(self, counts: torch.Tensor, category_token_ids: Sequence[int] | torch.Tensor,
                 tau: float = 5.0, visit_start_id: int | None = None,
                 category_modality: Sequence[int] | None = None, cross_modality: bool = True):
        super().__init__()
        ids = torch.as_tensor(category_token_ids, dtype=torch.long)
        counts = torch.as_tensor(counts)
        if counts.shape != (len(ids), len(ids)):
            raise ValueError(f"CooccurrenceLoss: counts {tuple(counts.shape)} vs {len(ids)} category ids")
        self.tau = float(tau)
        self.visit_start_id = visit_start_id
        lookup = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        # Buffers, not parameters: moved with .to(device), never trained, not in the optimizer.
        weights = penalty_weights(counts, self.tau)
        if not cross_modality:
            if category_modality is None:
                raise ValueError("CooccurrenceLoss: cross_modality=False needs category_modality")
            modality = torch.as_tensor(list(category_modality), dtype=torch.long)
            weights = weights * (modality[:, None] == modality[None, :])
        self.register_buffer("W", weights, persistent=False)
        self.register_buffer("category_token_ids", ids, persistent=False)
        self.register_buffer("token_to_category", lookup, persistent=False)

    @classmethod
    def from_file(cls, path: str, tau: float = 5.0, visit_start_id: int | None = None) -> "CooccurrenceLoss":
        counts, _, ids = load_cooccurrence(path)
        return cls(counts, ids, tau=tau, visit_start_id=visit_start_id)

    def label_categories(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] labels (-100 = ignored) -> [B, T] category index in 0..K-1, or -1."""
        n = self.token_to_category.numel()
        inside = (labels >= 0) & (labels < n)
        return torch.where(inside, self.token_to_category[labels.clamp(0, n - 1)], labels.new_full((), -1))

    def category_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """[K] the column of each category in logits whose column c scores token ``columns[c]``
        (``columns`` ascending, holding every category: ``VocabIndex.head_ids``, the columns of the
        grammar-restricted LM loss's logits). ValueError otherwise."""
        pos = torch.searchsorted(columns, self.category_token_ids)
        if bool((pos >= len(columns)).any()) or not bool((columns[pos] == self.category_token_ids).all()):
            raise ValueError("CooccurrenceLoss: columns must be ascending and hold every category token")
        return pos

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, category_columns: torch.Tensor | None = None
                ) -> torch.Tensor:
        """logits [B, T, V] (position t predicts labels[:, t]), labels [B, T] -> scalar penalty.
        ``category_columns`` [K]: logits hold other columns than the vocabulary's, the category k in
        column ``category_columns[k]`` (:meth:`category_columns`); default: the category token ids.

        Zero (still attached to the graph) when no position has a non-empty S.
        """
        B, T = labels.shape
        cat = self.label_categories(labels)  # [B, T]
        is_cat = cat >= 0
        pos = torch.arange(T, device=labels.device)
        # Visit index of each position: S resets at every <v> label.
        if self.visit_start_id is None:
            visit = torch.zeros_like(labels)
        else:
            visit = (labels == self.visit_start_id).long().cumsum(1)
        # A category counts once in S however many of its codes came before: keep only its
        # first occurrence in the visit ([B, T, T] comparison; T is one visit, tens of tokens).
        earlier_same = ((cat[:, :, None] == cat[:, None, :]) & (visit[:, :, None] == visit[:, None, :])
                        & (pos[None, :, None] > pos[None, None, :]) & is_cat[:, :, None])
        first = is_cat & ~earlier_same.any(-1)
        with torch.no_grad():
            # Sum of W rows of the distinct categories at earlier positions of the same visit:
            # exclusive cumsum over positions, minus its value at the visit's start.
            rows = self.W[cat.clamp(min=0)].double() * first[..., None]  # [B, T, K]
            n_first = first.double()
            cum_rows = rows.cumsum(1) - rows
            cum_n = n_first.cumsum(1) - n_first
            if self.visit_start_id is None:
                start = torch.zeros_like(labels)
            else:  # index of the latest <v> at or before each position
                start = torch.where(labels == self.visit_start_id, pos, 0).cummax(1).values
            cum_rows = cum_rows - cum_rows.gather(1, start[..., None].expand_as(cum_rows))
            size_s = cum_n - cum_n.gather(1, start)  # |S| [B, T]
            use = is_cat & (size_s > 0)
            mean_w = (cum_rows[use] / size_s[use][:, None]).to(logits.dtype)  # [N, K]
        if mean_w.shape[0] == 0:
            return logits.sum() * 0.0
        ids = self.category_token_ids if category_columns is None else category_columns
        cat_logits = logits[use].index_select(-1, ids)  # [N, K]
        p = torch.softmax(cat_logits.float(), dim=-1)
        return (p * mean_w.float()).sum(-1).mean()
