"""LogitsProcessors that make every generated visit valid by construction.

One decoder call writes one visit: ``<decoder start> <v> C:cat code C:cat code ... </v>``. Each
row of the batch is its own patient (own age, sex, target visit length); every processor is
vectorised over the batch, with no Python loop per row or per code.

Processors (use :func:`visit_logits_processors` to build the chain in the right order):

- :class:`StageTwoLogitsProcessor`: after a category token, the next token is one of that
  category's codes, sampled by the model's scores (``"model"``), by the training
  P(code | category) (``"empirical"``: the scores are replaced by log-probabilities), by the
  training P(code | category, visit type) of each row (``"type"``) or uniformly; the last three
  can also weigh each code by its within-visit pair scores with the codes already written
  (:class:`PairScores`).
- :class:`NoRepeatCodeLogitsProcessor`: a code already written in this visit is forbidden.
- :class:`CMSEditLogitsProcessor`: the CMS Medicare Code Editor age/sex edits of each row's
  patient (:class:`CMSEditTable`, from the edit data a checkpoint carries); categories all of
  whose codes are forbidden are forbidden too.
- :class:`VisitGrammarLogitsProcessor`: ``<v>`` first, then (category, one of its codes) pairs,
  then ``</v>``; at least one code; visit-length control (``</v>`` forbidden before the row's
  target number of codes and forced at it), or model-decided length up to a cap. It knows the
  CMS-forbidden codes and the codes already used, so it never offers a category with no code
  left for the row, and a row is never left with nothing to sample. It must come last.
- :class:`InverseCDFSamplingLogitsProcessor`: the draw (after any temperature / top-k / top-p).

At any step a row can only take one of the children of its last category or one of ~1,000
non-code tokens (:class:`VisitStep`'s two column blocks), so the processors work on those blocks
and :class:`VisitLogitsProcessor` runs the chain with one gather and one scatter of the [B, V]
scores per step (a [B, V] pass costs far more than the blocks at large batches). Under
:func:`~.decoding.visit_decoding` (``generate``'s ``custom_generate``) even those two passes go:
the loop hands the chain the blocks and picks the token there (:meth:`VisitStep.select`).

Shipped with the checkpoint in ``custom_generate/``: imports only torch and transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

STAGE_TWO_MODES = ("model", "empirical", "type", "uniform")
NEG_INF = float("-inf")


class VocabIndex:
    """Token-type lookup tables of a PromptEHR tokenizer as tensors of width ``size``.

    ``size`` is the width of the model's scores (``config.vocab_size``; at least ``len(tokenizer)``).
    Built once per generation run and shared by every processor.

    Attributes:
        is_code, is_category: [size] bool.
        generable: [size] bool, code tokens seen in training (P(code | category) > 0); a
            tokenizer's empty catch-all is a code token that is not generable.
        code_category: [size] long, the category id of a code token, -1 elsewhere.
        log_code_prob: [size] float, log P(code | category) from training, -inf elsewhere.
        code_ids, code_ids_category: [n_codes] long, code ids and their category ids.
        category_ids: [n_cat] long; category_pos: [size] long, a category token's position in
            category_ids (n_cat elsewhere); code_category_pos: [size] long, the position of a code's
            category (n_cat elsewhere).
        kids: [n_cat + 1, K] long, the code ids of category k padded with ``pad_id`` (K = the
            largest category; the last row is all padding); kid_ok: [n_cat + 1, K] bool, the
            real entries. Code steps work on these K columns, not on the whole vocabulary.
        head_ids: [n_cat + 3] long, every non-code token the grammar can allow: ``<pad>``,
            ``<v>``, ``</v>``, then the categories in category_ids order.
        tokens: list[str], id -> token string (``""`` beyond the tokenizer).
        n_modalities: the tokenizer's modalities (1: diagnoses only); token_modality: [size]
            long, a category's or code's modality (0 = diagnoses, then procedures, medications;
            0 elsewhere); category_modality: [n_cat + 1] long, per category position (the dummy
            slot gets n_modalities).
    """

    def __init__(self, tokenizer, size: int | None = None):
        n_tok = len(tokenizer)
        size = n_tok if size is None else int(size)
        if size < n_tok:
            raise ValueError(f"VocabIndex: score width {size} is smaller than the tokenizer ({n_tok} tokens)")
        self.size = size
        self.pad_id = int(tokenizer.pad_token_id)
        self.visit_start_id = int(tokenizer.visit_start_id)
        self.visit_end_id = int(tokenizer.visit_end_id)
        pairs = torch.tensor(sorted(tokenizer.code_category.items()), dtype=torch.long).reshape(-1, 2)
        self.code_ids = pairs[:, 0].contiguous()
        self.code_ids_category = pairs[:, 1].contiguous()
        self.is_code = torch.zeros(size, dtype=torch.bool)
        self.is_code[self.code_ids] = True
        self.is_category = torch.zeros(size, dtype=torch.bool)
        self.is_category[torch.tensor(list(tokenizer.category_ids), dtype=torch.long)] = True
        self.code_category = torch.full((size,), -1, dtype=torch.long)
        self.code_category[self.code_ids] = self.code_ids_category
        probs = torch.tensor([tokenizer.code_probs.get(int(i), 0.0) for i in self.code_ids], dtype=torch.float64)
        self.log_code_prob = torch.full((size,), NEG_INF)
        self.log_code_prob[self.code_ids] = probs.log().float()
        # A catch-all code never seen in training (P = 0) is never generated.
        self.generable = self.is_code & (self.log_code_prob > NEG_INF)
        # Category-indexed views: category k (0..n_cat-1) is token category_ids[k]; index n_cat
        # is a dummy "no category" slot, so gathers never need a branch.
        self.category_ids = torch.tensor(sorted(tokenizer.category_ids), dtype=torch.long)
        n_cat = len(self.category_ids)
        self.category_pos = torch.full((size,), n_cat, dtype=torch.long)
        self.category_pos[self.category_ids] = torch.arange(n_cat)
        self.code_category_pos = torch.full((size,), n_cat, dtype=torch.long)
        self.code_category_pos[self.code_ids] = self.category_pos[self.code_ids_category]
        pos, order = self.code_category_pos[self.code_ids].sort(stable=True)
        rank = torch.arange(len(pos)) - torch.searchsorted(pos, pos)  # place inside its category
        width = int(rank.max()) + 1 if len(pos) else 1
        self.kids = torch.full((n_cat + 1, width), self.pad_id, dtype=torch.long)
        self.kids[pos, rank] = self.code_ids[order]
        self.kid_ok = torch.zeros(n_cat + 1, width, dtype=torch.bool)
        self.kid_ok[pos, rank] = True
        specials = torch.tensor([self.pad_id, self.visit_start_id, self.visit_end_id], dtype=torch.long)
        self.head_ids = torch.cat([specials, self.category_ids])
        if not bool((self.head_ids[1:] > self.head_ids[:-1]).all()):  # VisitStep.select relies on it
            raise ValueError("VocabIndex: expected the ids <pad> < <v> < </v> < every category "
                             "(PromptEHRTokenizer's layout)")
        self.tokens = tokenizer.convert_ids_to_tokens(list(range(n_tok))) + [""] * (size - n_tok)
        self.n_modalities = len(getattr(tokenizer, "modalities", ("diagnoses",)))
        self.token_modality = torch.zeros(size, dtype=torch.long)
        if self.n_modalities > 1:  # the tokenizer's code types (1 + modality) as id ranges
            for lo, hi, code_type in tokenizer.code_type_ranges():
                self.token_modality[lo:hi] = code_type - 1
        self.category_modality = torch.cat([self.token_modality[self.category_ids],
                                            torch.tensor([self.n_modalities])])

    def to(self, device) -> "VocabIndex":
        """Move the lookup tensors to ``device`` (the model's); returns self."""
        for name in ("code_ids", "code_ids_category", "is_code", "is_category", "code_category", "log_code_prob",
                     "generable", "category_ids", "category_pos", "code_category_pos", "kids",
                     "kid_ok", "head_ids", "token_modality", "category_modality"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.is_code.device

    def check_width(self, scores: torch.Tensor) -> None:
        if scores.shape[-1] != self.size:
            raise ValueError(
                f"scores have width {scores.shape[-1]} but the VocabIndex was built for {self.size}; "
                "build it with size=model.config.vocab_size"
            )


# Positions inside the head block (VocabIndex.head_ids order).
HEAD_PAD, HEAD_START, HEAD_END, HEAD_CATS = 0, 1, 2, 3


class PairScores(NamedTuple):
    """A training cohort's within-visit code pairs over token ids, for stage two given the visit.

    The score of a candidate code c given a code v already in the visit (same modality) is the
    smoothed log ratio of the visits holding both to the visits expected if they were independent,
    log((n + 1) / (E + 1)) with E = N(v) N(c) / N. A pair seen in fewer visits than the cohort
    prior's threshold is not stored; its n is taken as min(E, ``censored``): unknown, so as
    expected when few visits were expected, low when the pair should have been common.

    Fields: ``visits`` [V] float, N(token) (0 off the codes); ``n_visits``, N; ``censored``;
    and the stored pairs in compressed rows: given token ``i``, the candidates
    ``col[crow[i]:crow[i + 1]]`` gain ``value[...]`` = log((n + 1) / (min(E, censored) + 1)) over
    the score of an unstored pair (``crow`` [V + 1] long, ``col`` [nnz] long, ``value`` [nnz] float).
    """

    crow: torch.Tensor
    col: torch.Tensor
    value: torch.Tensor
    visits: torch.Tensor
    n_visits: float
    censored: float

    def to(self, device) -> "PairScores":
        return self._replace(**{k: getattr(self, k).to(device) for k in ("crow", "col", "value", "visits")})

    def unstored(self, given: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[B, K] the scores of the candidates ``candidates`` [B, K] (token ids) summed over the
        codes ``given`` [B, T] (token ids; a non-code adds 0) as if no pair were stored."""
        expected = self.visits[given][:, :, None] * self.visits[candidates][:, None, :] / self.n_visits
        return (torch.log1p(expected.clamp(max=self.censored)) - torch.log1p(expected)).sum(1)


class VisitStep:
    """One decoding step of a batch of visits: each row's state and the grammar's two column blocks.

    A row's next token can only be one of the K children of its last category (a code step) or
    one of ``index.head_ids`` (``<pad>``, ``<v>``, ``</v>``, the categories): the *kid block*
    [B, K] and the *head block* [B, H] (H = n_cat + 3). Visit processors work on these blocks,
    ~1,000 columns, instead of the [B, V] vocabulary. Under the grammar all unfinished rows of a
    batch are in the same phase at every step (``<v>``, then alternating category / code).

    Attributes (all [B]): ``last`` token; ``at_code`` (last is a category: next is one of its
    codes); ``started`` / ``ended`` (``<v>`` / ``</v>`` written); ``open`` (next is a category or
    ``</v>``). ``kids`` [B, K] long (padding = ``pad_id``), ``kid_ok`` [B, K] bool (real children).
    """

    def __init__(self, index: VocabIndex, input_ids: torch.Tensor):
        self.index, self.input_ids = index, input_ids
        self.last = input_ids[:, -1]
        self.at_code = index.is_category[self.last]
        self.started = (input_ids == index.visit_start_id).any(1)
        self.ended = (input_ids == index.visit_end_id).any(1)
        self.open = self.started & ~self.ended & ~self.at_code
        pos = index.category_pos[self.last]
        self.kids, self.kid_ok = index.kids[pos], index.kid_ok[pos]
        self._used = None

    @property
    def kid_used(self) -> torch.Tensor:
        """[B, K] bool: the child is already in the row's visit (computed once per step)."""
        if self._used is None:
            self._used = (self.kids[:, :, None] == self.input_ids[:, None, :]).any(-1)
        return self._used

    def gather(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, V] scores -> (kid block [B, K], padding at -inf; head block [B, H])."""
        self.index.check_width(scores)
        return scores.gather(1, self.kids).masked_fill(~self.kid_ok, NEG_INF), scores[:, self.index.head_ids]

    def select(self, kid: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """[B] next token ids: the best-scoring block column of each row, the lowest token id on a
        tie, as argmax over the scattered [B, V] scores would pick (both blocks are in ascending
        token order, so each block's first maximum is its lowest id)."""
        kid = kid.masked_fill(~self.kid_ok, NEG_INF)
        k, h = kid.argmax(1, keepdim=True), head.argmax(1, keepdim=True)
        kid_best, head_best = kid.gather(1, k)[:, 0], head.gather(1, h)[:, 0]
        kid_id, head_id = self.kids.gather(1, k)[:, 0], self.index.head_ids[h[:, 0]]
        take_kid = (kid_best > head_best) | ((kid_best == head_best) & (kid_id < head_id))
        return torch.where(take_kid, kid_id, head_id)

    def scatter(self, kid: torch.Tensor, head: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The blocks back as [B, V] scores shaped like ``like``, -inf outside the blocks."""
        out = torch.full_like(like, NEG_INF)
        out.scatter_(1, self.kids, kid.masked_fill(~self.kid_ok, NEG_INF))  # padding hits <pad>: rewritten next
        out[:, self.index.head_ids] = head
        return out


def _with_categories(head: torch.Tensor, categories: torch.Tensor) -> torch.Tensor:
    """The head block with its category columns replaced by ``categories`` [B, n_cat]."""
    return torch.cat([head[:, :HEAD_CATS], categories], 1)


class VisitBlockProcessor(LogitsProcessor):
    """Base of the visit processors: ``process(step, kid, head) -> (kid, head)`` on the blocks of
    a :class:`VisitStep`.

    Called alone on [B, V] scores, a visit processor returns scores that are -inf outside the
    blocks (no token of a visit lives there). :class:`VisitLogitsProcessor` runs a whole chain on
    the blocks with one gather and one scatter per step, since a [B, V] pass costs far more than
    the blocks.
    """

    index: VocabIndex

    def process(self, step: VisitStep, kid: torch.Tensor, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = VisitStep(self.index, input_ids)
        return step.scatter(*self.process(step, *step.gather(scores)), like=scores)


class StageTwoLogitsProcessor(VisitBlockProcessor):
    """Stage two: after a category token, the next token is one of that category's codes.

    mode ``"model"`` keeps the model's scores (the grammar restricts them to the category's
    children); ``"empirical"`` replaces them by log P(code | category) from training; ``"type"``
    by each row's own log P(code | category, visit type) (``code_log_probs`` [B, V]);
    ``"uniform"`` makes the children equally likely. Rows at a code position get -inf on the
    head block.

    With ``"empirical"`` / ``"type"`` / ``"uniform"`` the code constraints (CMS ``codes_forbidden``, codes
    already in the visit) act as rejection sampling of the (category, code) pair: at a category
    step each category's score gets + log(stage-two mass still allowed for the row). Merely
    renormalising over the allowed codes would hand a forbidden code's mass to its allowed
    siblings (a man given C:V84 would always get its sex-neutral codes), which distorts
    P(code | category) whenever stage one picks a category its patient can only partly receive.
    Both terms are multiplied by ``temperature``, so that the temperature warper applied
    afterwards leaves them intact.

    ``pair_scores`` (:class:`PairScores`, from the cohort prior's within-visit pair counts)
    conditions the code on the codes already in the visit: each candidate's log P(code |
    category, ...) gets ``pair_weight / sqrt(m)`` times the sum of its pair scores given those m
    codes of its modality. Codes bundled in one stay (bypass with its grafts, a stent with its
    adjuncts, one ventilation duration and not the other) then come out together, which a draw
    blind to the visit cannot do inside wide categories; the square root tempers a sum of log
    ratios that treats the visit's codes as independent evidence. The stored pairs' part is
    gathered as the rows write codes (state: one processor per decoder call). Not applied with
    ``"model"``.
    """

    def __init__(self, index: VocabIndex, mode: str = "model", temperature: float = 1.0,
                 codes_forbidden: torch.Tensor | None = None, no_repeat: bool = True,
                 code_log_probs: torch.Tensor | None = None, pair_scores: PairScores | None = None,
                 pair_weight: float = 0.0):
        if mode not in STAGE_TWO_MODES:
            raise ValueError(f"stage_two must be one of {STAGE_TWO_MODES}, got {mode!r}")
        if (mode == "type") != (code_log_probs is not None):
            raise ValueError("stage_two='type' needs code_log_probs [B, V] (each row's P(code | category, type)), "
                             "and only it takes them")
        self.index, self.mode = index, mode
        self.temperature = float(temperature) if temperature else 1.0
        self.codes_forbidden, self.no_repeat = codes_forbidden, no_repeat
        if mode == "empirical":
            self.log_q = index.log_code_prob
        elif mode == "type":
            self.log_q = code_log_probs
        else:  # uniform over the generable children
            n_kids = torch.cat([allowed_per_category(index, None)[0], torch.ones(1, device=index.device)])
            self.log_q = torch.where(index.generable, -n_kids[index.code_category_pos].log(), NEG_INF)
        self._log_q_t = self.log_q * self.temperature
        self._q = self.log_q.exp()
        self._mass = None  # [B or 1, n_cat] stage-two mass not forbidden, on first category step
        self.pair_scores = pair_scores if pair_scores is not None and float(pair_weight) != 0.0 else None
        self.pair_weight = float(pair_weight) * self.temperature
        self._context = self._written = None  # [B, V] stored-pair scores given the visit's codes so far

    def _observe(self, step: VisitStep) -> None:
        """Add the stored-pair scores given each code the rows wrote since the last call to their context."""
        ids, index = step.input_ids, self.index
        if self._context is None:
            self._context = torch.zeros(ids.shape[0], index.size, device=ids.device)
            self._written = 0
        new = ids[:, self._written:]
        self._written = ids.shape[1]
        rows, col = torch.nonzero(index.is_code[new], as_tuple=True)
        if len(rows) == 0:
            return
        given = new[rows, col]
        crow = self.pair_scores.crow
        start, n = crow[given], crow[given + 1] - crow[given]
        total = int(n.sum())
        if total == 0:
            return
        first = torch.cumsum(n, 0) - n
        entry = start.repeat_interleave(n) + torch.arange(total, device=ids.device) - first.repeat_interleave(n)
        self._context.index_put_((rows.repeat_interleave(n), self.pair_scores.col[entry]),
                                 self.pair_scores.value[entry].to(self._context.dtype), accumulate=True)

    def _pair_lift(self, step: VisitStep) -> torch.Tensor:
        """[B, K] pair_weight / sqrt(m) x each child's pair scores summed over the m codes of its
        modality already in the row's visit (0 for a row with none)."""
        ids, index = step.input_ids, self.index
        modality = index.category_modality[index.category_pos[step.last]]
        same = index.is_code[ids] & (index.token_modality[ids] == modality[:, None])  # [B, T]
        scores = self.pair_scores.unstored(torch.where(same, ids, index.pad_id), step.kids)
        scores = scores + self._context.gather(1, step.kids)
        m = same.sum(1, keepdim=True)
        return torch.where(m > 0, scores * self.pair_weight / m.clamp(min=1).sqrt(), 0.0)

    def process(self, step, kid, head):
        if self.mode == "model":
            return kid, head
        index = self.index
        if self.pair_scores is not None:
            self._observe(step)
        if bool(step.at_code.any()):
            code = step.at_code[:, None]
            log_q = self._log_q_t.to(kid.dtype)
            kid = torch.where(code, log_q.gather(1, step.kids) if log_q.dim() == 2 else log_q[step.kids], kid)
            if self.pair_scores is not None:
                kid = torch.where(code, kid + self._pair_lift(step).to(kid.dtype), kid)
            head = head.masked_fill(code, NEG_INF)
        if bool(step.open.any()):  # weight each category by its allowed stage-two mass
            q = self._q
            if self._mass is None:
                self._mass = allowed_per_category(index, self.codes_forbidden, weight=q)
            mass = self._mass
            if self.no_repeat:
                ids = step.input_ids
                used = torch.zeros(ids.shape[0], mass.shape[1] + 1, device=index.device)
                q_ids = q.gather(1, ids) if q.dim() == 2 else q[ids]
                used.scatter_add_(1, index.code_category_pos[ids], q_ids * index.is_code[ids])
                mass = mass - used[:, :-1]
            weight = (self.temperature * mass.clamp(min=0).log()).to(head.dtype)
            head = _with_categories(head, head[:, HEAD_CATS:] + weight)
        return kid, head


class RecurrenceLogitsProcessor(VisitBlockProcessor):
    """At category steps, add each row's ``category_log_lift`` [B, n_cat] (log of how much more
    often a category of the patient's previous visit recurs than the visit types predict; 0 for
    the others) to the category scores, times ``temperature`` so that the temperature warper
    applied afterwards leaves it intact."""

    def __init__(self, index: VocabIndex, category_log_lift: torch.Tensor, temperature: float = 1.0):
        self.index = index
        self.weight = category_log_lift * (float(temperature) if temperature else 1.0)

    def process(self, step, kid, head):
        if bool(step.open.any()):
            head = _with_categories(head, head[:, HEAD_CATS:] + self.weight.to(head.dtype))
        return kid, head


class NoRepeatCodeLogitsProcessor(VisitBlockProcessor):
    """Forbid every code token already written in the row's visit (one visit per decoder call)."""

    def __init__(self, index: VocabIndex):
        self.index = index

    def process(self, step, kid, head):
        if bool(step.at_code.any()):  # codes are not allowed at category steps anyway
            kid = kid.masked_fill(step.kid_used, NEG_INF)
        return kid, head


class CMSEditLogitsProcessor(VisitBlockProcessor):
    """The CMS Medicare Code Editor age/sex edits, per row.

    A [n_edit_classes, V] mask (which code carries which edit class) is combined with a
    [B, n_edit_classes] matrix (which classes each row's age/sex breaks), once at construction
    (:class:`CMSEditTable`). Forbids the row's forbidden codes, and categories all of whose codes
    are forbidden for the row.

    Args:
        index: the VocabIndex.
        ages: B ages in years; sexes: B values "F"/"M" (or 0/1, F=0).
        edit_table: the :class:`CMSEditTable` of the vocabulary, built once and reused across batches.

    Attributes: ``codes_forbidden`` [B, V] bool; ``codes_allowed_per_category`` [B, n_cat] float
    (:func:`allowed_per_category`, in ``index.category_ids`` order); ``categories_forbidden``
    [B, n_cat] bool (no code allowed).
    """

    def __init__(self, index: VocabIndex, ages: Sequence[float], sexes: Sequence, edit_table: "CMSEditTable"):
        self.index = index
        self.codes_forbidden = edit_table.forbidden_codes(ages, sexes).to(index.device)
        self.codes_allowed_per_category = allowed_per_category(index, self.codes_forbidden)
        self.categories_forbidden = self.codes_allowed_per_category == 0

    def process(self, step, kid, head):
        kid = kid.masked_fill(self.codes_forbidden.gather(1, step.kids), NEG_INF)
        if bool(step.open.any()):
            head = _with_categories(head, head[:, HEAD_CATS:].masked_fill(self.categories_forbidden, NEG_INF))
        return kid, head


class CMSEditTable:
    """Which vocabulary codes carry which CMS edit class, and which classes an (age, sex) breaks.

    Args:
        index: the VocabIndex.
        edits: the CMS edits of the vocabulary's codes, as a checkpoint's generation config carries
            them (``cms_edits``, written at save time from the tables of the tokenizer's code system)::

                {"age_ranges": {"age_newborn": [0, 0], ...},          # whole-year ages allowed
                 "sex_conflicts": {"sex_female_only": "M", ...},      # the sex each sex edit forbids
                 "classes": [{"edits": ["sex_female_only", "age_maternity"], "codes": ["650", ...]}, ...]}

            A code breaks a patient's (age, sex) when one edit of its class does: a sex edit for
            the conflicting sex, an age edit when the age, truncated to whole years, is outside
            [lo, hi]. Codes that are not code tokens of the vocabulary are ignored.

    Attributes: ``classes``: the edit classes (tuples of edit names) that hold a vocabulary code;
    ``class_mask``: [n_classes, V] bool.
    """

    def __init__(self, index: VocabIndex, edits: dict):
        self.age_ranges = {name: (int(lo), int(hi)) for name, (lo, hi) in edits["age_ranges"].items()}
        self.sex_conflicts = {name: _sex_letter(sex) for name, sex in edits["sex_conflicts"].items()}
        code_id = {index.tokens[i]: i for i in index.code_ids.tolist()}
        self.classes: list[tuple[str, ...]] = []
        rows = []
        for entry in edits["classes"]:
            names = tuple(entry["edits"])
            unknown = [e for e in names if e not in self.age_ranges and e not in self.sex_conflicts]
            if unknown:
                raise ValueError(f"CMS edits: {unknown} are neither in age_ranges nor in sex_conflicts")
            ids = [code_id[c] for c in entry["codes"] if c in code_id]
            if ids:
                self.classes.append(names)
                rows.append(ids)
        self.class_mask = torch.zeros(len(self.classes), index.size, dtype=torch.bool)
        for k, ids in enumerate(rows):
            self.class_mask[k, ids] = True
        self._broken: dict[tuple[float, str], tuple[bool, ...]] = {}

    def _breaks(self, edit: str, years: int, sex: str) -> bool:
        if edit in self.sex_conflicts:
            return sex == self.sex_conflicts[edit]
        lo, hi = self.age_ranges[edit]
        return not lo <= years <= hi

    def broken(self, age: float, sex: str) -> tuple[bool, ...]:
        """Which edit classes a patient of this age (years, in [0, 125)) and sex breaks (cached
        per (age, sex))."""
        key = (float(age), sex)
        hit = self._broken.get(key)
        if hit is None:
            if not 0 <= key[0] < 125:  # NaN fails too
                raise ValueError(f"CMS edits: age must be in [0, 125) years, got {age!r}")
            years = int(key[0])
            hit = tuple(any(self._breaks(e, years, sex) for e in names) for names in self.classes)
            self._broken[key] = hit
        return hit

    def forbidden_codes(self, ages: Sequence[float], sexes: Sequence) -> torch.Tensor:
        """[B, V] bool: the codes each (age, sex) row may not receive."""
        sexes = [_sex_letter(s) for s in sexes]
        if len(ages) != len(sexes):
            raise ValueError(f"CMS edits: {len(ages)} ages but {len(sexes)} sexes")
        if not self.classes:
            return torch.zeros(len(ages), self.class_mask.shape[1], dtype=torch.bool)
        rows = torch.tensor([self.broken(float(a), s) for a, s in zip(ages, sexes)], dtype=torch.float32)
        return (rows.reshape(len(ages), -1) @ self.class_mask.float()) > 0


def _sex_letter(sex) -> str:
    if sex in ("F", "M"):
        return sex
    if sex in (0, 1):
        return "FM"[int(sex)]
    raise ValueError(f"sex must be 'F', 'M', 0 (F) or 1 (M), got {sex!r}")


def allowed_per_category(index: VocabIndex, codes_forbidden: torch.Tensor | None, batch_size: int = 1,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n_cat] float: per category, how many of its generable codes are not in ``codes_forbidden``
    (or, with ``weight`` [V] or [B, V], their summed weight).

    ``codes_forbidden``: [B, V] bool, or None (nothing forbidden: [batch_size, n_cat]).
    """
    w = index.generable.float() if weight is None else weight * index.generable
    ok = w[..., index.code_ids]
    if ok.dim() == 1:
        ok = ok[None, :].expand(batch_size, -1)
    if codes_forbidden is not None:
        ok = ok * ~codes_forbidden[:, index.code_ids]
    counts = torch.zeros(ok.shape[0], len(index.category_ids) + 1, device=index.device)
    counts.scatter_add_(1, index.code_category_pos[index.code_ids].expand(ok.shape[0], -1), ok)
    return counts[:, :-1]


class VisitGrammarLogitsProcessor(VisitBlockProcessor):
    """The visit grammar with visit-length control; the last of the masking processors.

    Allowed next tokens per row:
    - before ``<v>``: ``<v>``;  after ``</v>``: ``<pad>`` (the row is finished);
    - after a category: its generable codes, less ``codes_forbidden`` and (``no_repeat``) those
      already used;
    - after ``<v>`` or a code: the categories that still have an available code (not in
      ``codes_forbidden`` for the row and, with ``no_repeat``, not yet in the visit), and ``</v>``
      once the visit holds ``min_codes`` codes (never right after ``<v>``); only ``</v>`` once it
      holds ``max_codes``. ``</v>`` is also allowed when no category is left.
    If earlier processors left a row with every allowed token at -inf (e.g. empirical stage two
    on a category whose remaining codes were never seen in training), it samples uniformly
    among the allowed tokens, so generate never meets an all -inf row.

    Multimodal vocabularies (``index.n_modalities > 1``): a visit writes its diagnoses, then its
    procedures, then its medications. With targets, ``n_codes`` counts the diagnoses and
    ``modality_codes`` [B, M - 1] the codes of each later modality: only the categories of the
    first modality still short of its target (and with a category left) are allowed, and ``</v>``
    once every modality is done. Without targets, the first code is a diagnosis and each later
    category is of the last code's modality or a later one.

    Args:
        index: the VocabIndex.
        n_codes: [B] target codes per visit (data-driven length: min = max = target), or None;
            the diagnoses only in a multimodal vocabulary.
        modality_codes: [B, M - 1] targets of the other modalities (multimodal, with ``n_codes``).
        max_codes: cap on codes per visit when ``n_codes`` is None (model-decided length).
        codes_forbidden: [B, V] bool codes the row may never receive (the CMS processor's
            ``codes_forbidden``), or None.
        no_repeat: codes already in the visit are unavailable (NoRepeatCodeLogitsProcessor is on).
        available: ``allowed_per_category(index, codes_forbidden)`` if already computed (the CMS
            processor's ``codes_allowed_per_category``); computed on the first call otherwise.
    """

    def __init__(self, index: VocabIndex, n_codes=None, max_codes: int | None = None,
                 codes_forbidden: torch.Tensor | None = None, no_repeat: bool = True,
                 available: torch.Tensor | None = None, modality_codes=None):
        self.index, self.no_repeat = index, no_repeat
        self.targets = None  # [B, M] per-modality targets of a multimodal vocabulary
        if index.n_modalities > 1 and n_codes is not None:
            extra = torch.zeros(len(n_codes), index.n_modalities - 1, dtype=torch.long) if modality_codes is None \
                else torch.as_tensor(modality_codes, dtype=torch.long)
            if extra.shape != (len(n_codes), index.n_modalities - 1) or bool((extra < 0).any()):
                raise ValueError(f"VisitGrammarLogitsProcessor: modality_codes must be [{len(n_codes)}, "
                                 f"{index.n_modalities - 1}] counts >= 0")
            self.targets = torch.cat([torch.as_tensor(n_codes, dtype=torch.long)[:, None], extra], 1).to(index.device)
            n_codes = self.targets.sum(1)
        elif modality_codes is not None:
            raise ValueError("VisitGrammarLogitsProcessor: modality_codes needs n_codes and a multimodal vocabulary")
        if n_codes is None:
            if max_codes is None or max_codes < 1:
                raise ValueError("VisitGrammarLogitsProcessor: give n_codes (per-row targets) or max_codes >= 1")
            self.min_codes, self.max_codes = 1, int(max_codes)
        else:
            n_codes = torch.as_tensor(n_codes, dtype=torch.long, device=index.device)
            if bool((n_codes < 1).any()):
                raise ValueError("VisitGrammarLogitsProcessor: every target visit length must be >= 1")
            self.min_codes = self.max_codes = n_codes
        self.codes_forbidden = codes_forbidden
        self._available = available  # [B or 1, n_cat] statically available codes per category

    def process(self, step, kid, head):
        index = self.index
        B = kid.shape[0]
        kid_ok = step.kid_ok
        if bool(step.at_code.any()):
            kid_ok = kid_ok & index.generable[step.kids]
            # Also here (not only in their processors), so the fallback below stays valid.
            if self.codes_forbidden is not None:
                kid_ok = kid_ok & ~self.codes_forbidden.gather(1, step.kids)
            if self.no_repeat:
                kid_ok = kid_ok & ~step.kid_used
        cat_ok = torch.zeros(B, head.shape[1] - HEAD_CATS, dtype=torch.bool, device=index.device)
        can_end = torch.zeros(B, dtype=torch.bool, device=index.device)
        open_ = step.open
        if bool(open_.any()):
            is_code = index.is_code[step.input_ids]  # [B, L]
            n_codes = is_code.sum(1)
            if self._available is None:
                self._available = allowed_per_category(index, self.codes_forbidden)
            available = self._available  # [B or 1, n_cat]
            if self.no_repeat:  # minus the codes already written, counted per category
                used = torch.zeros(B, available.shape[1] + 1, device=index.device)
                used.scatter_add_(1, index.code_category_pos[step.input_ids], is_code.float())
                available = available - used[:, :-1]
            has_code = available > 0  # [B, n_cat]
            if index.n_modalities > 1:
                has_code = has_code & self._modality_section(step, is_code, has_code)
            must_end = open_ & (n_codes >= self.max_codes)
            can_end = open_ & (step.last != index.visit_start_id) & (n_codes >= self.min_codes)
            can_end |= must_end | (open_ & ~has_code.any(1))
            cat_ok = has_code & (open_ & ~must_end)[:, None]
        head_ok = torch.cat([torch.stack([step.ended, ~step.started, can_end], 1), cat_ok], 1)
        dead = ~(((kid > NEG_INF) & kid_ok).any(1) | ((head > NEG_INF) & head_ok).any(1))
        if bool(dead.any()):  # defensive: never all-forbidden; uniform over the allowed tokens
            head_ok[:, HEAD_END] |= dead & ~(kid_ok.any(1) | head_ok.any(1))
            kid, head = kid.masked_fill(dead[:, None], 0.0), head.masked_fill(dead[:, None], 0.0)
        return kid.masked_fill(~kid_ok, NEG_INF), head.masked_fill(~head_ok, NEG_INF)

    def _modality_section(self, step: VisitStep, is_code: torch.Tensor, has_code: torch.Tensor) -> torch.Tensor:
        """[B, n_cat] bool: the categories of the modality each row may write next."""
        index = self.index
        cat_mod = index.category_modality[:-1]  # [n_cat]
        if self.targets is None:  # the last code's modality or a later one; a diagnosis first
            last = torch.where(is_code, index.token_modality[step.input_ids], -1).max(1).values.clamp(min=0)
            first = ~is_code.any(1)
            return (cat_mod[None, :] >= last[:, None]) & (~first[:, None] | (cat_mod[None, :] == 0))
        B, M = self.targets.shape
        written = torch.zeros(B, M + 1, device=index.device)
        written.scatter_add_(1, torch.where(is_code, index.token_modality[step.input_ids], M), is_code.float())
        mod_has = torch.zeros(B, M + 1, device=index.device)
        mod_has.scatter_add_(1, cat_mod.expand(B, -1), has_code.float())
        todo = (written[:, :M] < self.targets) & (mod_has[:, :M] > 0)  # [B, M]
        current = torch.where(todo.any(1), todo.int().argmax(1), M)  # the first modality left
        return cat_mod[None, :] == current[:, None]


class GivenTokensLogitsProcessor(VisitBlockProcessor):
    """Force each row's given tokens first (e.g. a real visit's diagnoses, ``(category, code)``
    pairs as ``tokenizer.encode_visit`` writes them), then leave the row to the chain: generation
    of the other modalities given the diagnoses. Goes after the grammar (whose diagnosis target
    must be the number of given codes) and before the sampler.

    Args:
        index: the VocabIndex.
        given: [B, L] long, each row's tokens after ``<v>``, padded with -1.
    """

    def __init__(self, index: VocabIndex, given: torch.Tensor):
        self.index = index
        self.given = torch.as_tensor(given, dtype=torch.long).to(index.device)

    def process(self, step, kid, head):
        p = step.input_ids.shape[1] - 2  # tokens written after <decoder start> <v>
        if p < 0 or p >= self.given.shape[1]:
            return kid, head
        token = self.given[:, p]
        force = (token >= 0) & step.started & ~step.ended
        if not bool(force.any()):
            return kid, head
        # a padding child is <pad>, never a given token: it stays at -inf
        kid = torch.where(force[:, None], torch.where(step.kids == token[:, None], 0.0, NEG_INF).to(kid.dtype), kid)
        on_head = self.index.head_ids[None, :] == token[:, None]
        head = torch.where(force[:, None], torch.where(on_head, 0.0, NEG_INF).to(head.dtype), head)
        return kid, head


class InverseCDFSamplingLogitsProcessor(VisitBlockProcessor):
    """Draw each row's next token from softmax(scores); return scores whose argmax is that token.

    Used with ``generate(do_sample=False)``: sampling happens here (inverse CDF: one uniform
    number per row against the cumulative probabilities), and greedy decoding picks the drawn
    token. Same distribution as generate's own sampling, without ``torch.multinomial``, which is
    slow on wide CPU scores. Draws from the global torch RNG. Must be the last processor (after
    any temperature / top-k / top-p warper).

    Without ``index`` it draws over all columns of any scores; with a :class:`VocabIndex` it is
    a visit processor and draws over the blocks (the only columns the grammar leaves finite).
    """

    def __init__(self, index: VocabIndex | None = None):
        self.index = index

    @staticmethod
    def draw(scores: torch.Tensor) -> torch.Tensor:
        """[B, n] scores -> [B, 1] drawn column."""
        probs = torch.softmax(scores.float(), -1)
        cdf = probs.cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True)  # right: a zero-probability token is never hit
        past_end = token >= cdf.shape[1]  # u rounded up to the total: take the most likely token
        if bool(past_end.any()):
            token = torch.where(past_end, probs.argmax(-1, keepdim=True), token)
        return token

    def process(self, step, kid, head):
        both = torch.cat([kid, head], 1)
        drawn = torch.full_like(both, NEG_INF).scatter_(1, self.draw(both), 0.0)
        return drawn[:, : kid.shape[1]], drawn[:, kid.shape[1]:]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.index is not None:
            return super().__call__(input_ids, scores)
        return torch.full_like(scores, NEG_INF).scatter_(1, self.draw(scores), 0.0)


class VisitLogitsProcessor(LogitsProcessor):
    """A chain of visit processors run on the blocks of one :class:`VisitStep`.

    One gather before and one scatter after the chain, instead of one [B, V] pass per processor.
    ``processors`` holds :class:`VisitBlockProcessor` s and width-agnostic warpers (transformers'
    temperature, top-k, top-p), which see the blocks side by side ([B, K + H]; the rest of the
    vocabulary is -inf anyway, so they select the same tokens).
    """

    def __init__(self, index: VocabIndex, processors: Sequence[LogitsProcessor]):
        self.index, self.processors = index, list(processors)

    @property
    def reads_code_scores(self) -> bool:
        """Whether the model's scores of code tokens matter: not when the chain opens with an
        empirical, type or uniform stage two, which replaces them before anything reads them."""
        first = self.processors[0] if self.processors else None
        return not (isinstance(first, StageTwoLogitsProcessor) and first.mode != "model")

    def process(self, step: VisitStep, kid: torch.Tensor, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the chain on the blocks of ``step``: (kid [B, K], head [B, H]) -> the same, processed."""
        for p in self.processors:
            if isinstance(p, VisitBlockProcessor):
                kid, head = p.process(step, kid, head)
            else:
                both = p(step.input_ids, torch.cat([kid, head], 1))
                kid, head = both[:, : kid.shape[1]], both[:, kid.shape[1]:]
        return kid, head

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = VisitStep(self.index, input_ids)
        return step.scatter(*self.process(step, *step.gather(scores)), like=scores)


def sampling_processors(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        index: VocabIndex | None = None) -> list[LogitsProcessor]:
    """The sampling tail of the processor list: transformers' warpers, then the sampler (a visit
    processor when ``index`` is given)."""
    tail: list[LogitsProcessor] = []
    if temperature is not None and float(temperature) != 1.0:
        tail.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        tail.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and float(top_p) < 1.0:
        tail.append(TopPLogitsWarper(float(top_p)))
    return [*tail, InverseCDFSamplingLogitsProcessor(index)]


def visit_logits_processors(
    index: VocabIndex,
    ages: Sequence[float],
    sexes: Sequence,
    n_codes=None,
    max_codes: int | None = None,
    stage_two: str = "empirical",
    temperature: float = 1.0,
    cms: bool = True,
    edit_table: CMSEditTable | None = None,
    sample: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    code_log_probs: torch.Tensor | None = None,
    category_log_lift: torch.Tensor | None = None,
    modality_codes=None,
    given: torch.Tensor | None = None,
    pair_scores: PairScores | None = None,
    pair_weight: float = 0.0,
) -> LogitsProcessorList:
    """The processors for one batch of visits, as one :class:`VisitLogitsProcessor` whose
    ``processors`` are, in order: stage two, recurrence (with ``category_log_lift``), no-repeat,
    CMS, grammar, the given tokens (with ``given``), then (``sample``)
    temperature / top-k / top-p and the sampler.

    Args:
        ages, sexes: per row (B).  n_codes: [B] target codes per visit, or None with max_codes.
        stage_two: "model" | "empirical" | "type" | "uniform".  cms: apply the CMS age/sex edits.
        code_log_probs: [B, V] each row's log P(code | category, visit type) (stage_two="type").
        pair_scores, pair_weight: stage two given the visit's codes so far (:class:`PairScores`
            and their weight; :class:`StageTwoLogitsProcessor`).
        category_log_lift: [B, n_cat] added to the category scores (:class:`RecurrenceLogitsProcessor`).
        modality_codes: [B, M - 1] targets of the modalities after the diagnoses (a multimodal
            vocabulary; ``n_codes`` then counts the diagnoses).
        given: [B, L] tokens forced first in each row, padded with -1 (:class:`GivenTokensLogitsProcessor`).
        edit_table: the vocabulary's CMSEditTable, reused across batches (required with cms).
        sample: end with :func:`sampling_processors` (use with ``generate(do_sample=False)``);
            without it, pass temperature / top_k / top_p to generate's own sampling instead.
    """
    forbidden = available = None
    constraints: list[LogitsProcessor] = [NoRepeatCodeLogitsProcessor(index)]
    if cms:
        if edit_table is None:
            raise ValueError("cms=True needs the vocabulary's CMSEditTable (edit_table=)")
        cms_processor = CMSEditLogitsProcessor(index, ages, sexes, edit_table=edit_table)
        constraints.append(cms_processor)
        forbidden, available = cms_processor.codes_forbidden, cms_processor.codes_allowed_per_category
    processors: list[LogitsProcessor] = [
        StageTwoLogitsProcessor(index, stage_two, temperature=temperature, codes_forbidden=forbidden, no_repeat=True,
                                code_log_probs=code_log_probs, pair_scores=pair_scores, pair_weight=pair_weight),
        *constraints,
    ]
    if category_log_lift is not None:
        processors.insert(1, RecurrenceLogitsProcessor(index, category_log_lift, temperature=temperature))
    processors.append(VisitGrammarLogitsProcessor(index, n_codes=n_codes, max_codes=max_codes,
                                                  codes_forbidden=forbidden, no_repeat=True, available=available,
                                                  modality_codes=modality_codes))
    if given is not None:
        processors.append(GivenTokensLogitsProcessor(index, given))
    if sample:
        processors += sampling_processors(temperature, top_k, top_p, index=index)
    return LogitsProcessorList([VisitLogitsProcessor(index, processors)])


def check_visits(index: VocabIndex, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate generated visits after the fact (independently of the processors).

    Args:
        ids: [B, T] decoder outputs without the decoder start token: ``<v> (category code)+ </v>``
            then padding.
    Returns:
        (ungrammatical [B] bool, duplicate [B] bool): a row breaks the grammar (wrong first or
        last token, a code not of the preceding category, no code, anything but padding after
        ``</v>``, a code of an earlier modality after one of a later modality); a row writes some
        code twice.
    """
    ids = ids.to(index.device)
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)[None, :]
    is_end = ids == index.visit_end_id
    has_end = is_end.any(1)
    end = torch.where(has_end, is_end.int().argmax(1), torch.full_like(has_end, T, dtype=torch.long))[:, None]
    body = (pos >= 1) & (pos < end)
    odd = pos % 2 == 1
    prev = torch.cat([ids[:, :1], ids[:, :-1]], 1)
    cat_ok = ~(body & odd) | index.is_category[ids]
    code_ok = ~(body & ~odd) | (index.is_code[ids] & (index.code_category[ids] == prev))
    pad_ok = (pos <= end) | (ids == index.pad_id)
    ok = has_end & (ids[:, 0] == index.visit_start_id) & (end[:, 0] % 2 == 1) & (end[:, 0] >= 3)
    ok &= cat_ok.all(1) & code_ok.all(1) & pad_ok.all(1)
    if index.n_modalities > 1:  # diagnoses, then procedures, then medications
        modality = torch.where(body & index.is_code[ids], index.token_modality[ids], -1)
        ok &= (modality.cummax(1).values <= torch.where(modality >= 0, modality, index.n_modalities)).all(1)
    codes = torch.where(index.is_code[ids], ids, -1 - pos.expand(B, -1)).sort(1).values  # non-codes unique
    duplicate = (codes[:, 1:] == codes[:, :-1]).any(1)
    return ~ok, duplicate


def max_new_tokens_for(max_codes: int) -> int:
    """Decoder steps for a visit of up to max_codes codes: <v>, 2 per code, </v>, one spare."""
    return 2 * int(max_codes) + 3


__all__ = [
    "STAGE_TWO_MODES",
    "VocabIndex",
    "StageTwoLogitsProcessor",
    "NoRepeatCodeLogitsProcessor",
    "RecurrenceLogitsProcessor",
    "CMSEditLogitsProcessor",
    "CMSEditTable",
    "VisitGrammarLogitsProcessor",
    "GivenTokensLogitsProcessor",
    "VisitBlockProcessor",
    "VisitLogitsProcessor",
    "VisitStep",
    "allowed_per_category",
    "visit_logits_processors",
    "InverseCDFSamplingLogitsProcessor",
    "sampling_processors",
    "max_new_tokens_for",
    "check_visits",
]

