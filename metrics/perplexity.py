"""Perplexity of a trained model on held-out real patients: PromptEHR's longitudinal (``lpl``) and
marginal (``mpl``) perplexities (Wang & Sun, EMNLP 2022, section 4).

PromptEHR defines, over the N codes v_t^l (code l of visit t) of the test patients,

- ``lpl = exp(-1/N sum_t sum_l log P(v_t^l | V_1:t-1))``: each code given the patient's earlier
  visits (and demographics);
- ``mpl = exp(-1/N sum_t sum_l log P(v_t^l | V_t without v_t^l, V_1:t-1))``: each code given the
  rest of its visit and the earlier visits.

How this module reads them for our model, which writes a visit as ``<v> C:cat code C:cat code ...
</v>`` (a category, then one of its codes), codes in a fixed order:

- A code's probability is that of its (category, code) pair: P(category) x P(code | category),
  both from the model's own LM scores (the network, not generation's stage two, recurrence lift
  or CMS edits), each normalised over what the visit grammar lets the model write there: the
  categories that still have a code not yet in the visit, resp. the category's codes not yet in
  the visit. ``</v>`` is left out of the normalisation, as PromptEHR's per-modality softmax over
  codes leaves out its end token: a code's probability is "which code, given that one comes".
- ``lpl``: the visit's pairs in ``code_order`` (``"seq_num"``, as stored, or ``"hierarchical"``,
  sorted, as the collator orders them), teacher-forced: code l is scored given the earlier visits
  (the encoder's history, as in training, without noise) AND the codes before it in the visit.
  By the chain rule the visit's score is log P(visit's codes | history), which is what PromptEHR's
  released code computes too (its decoder is teacher-forced over the target visit).
- ``mpl``: for each code l, the decoder is fed the visit's other codes first (in order) and code l
  last: P(v_t^l | the others) is the last pair's probability. This is the paper's leave-one-out
  conditional under the model's order (a model trained with ``code_order="shuffle"`` has seen every
  order). PromptEHR's code, with several modalities, masks a whole modality of the current visit
  and keeps the others in the encoder; with diagnoses only, a leave-one-out conditional is the
  paper's definition.
- Visit types: a model conditioned on them writes visit t given a type m_t that held-out patients
  do not carry, and the EM mixture that typed the training visits is not saved in the checkpoint.
  The types are therefore marginalised as generation draws them, from the checkpoint's cohort
  prior (first type | age band and the patient's number of visits, next type | previous type,
  ``CohortPrior.first_type_probs`` / ``transition_probs``): the types form a hidden Markov chain
  and P(V_t | V_1:t-1) = sum_m P(m_t = m | V_1:t-1) P(V_t | m, V_1:t-1), with P(m_t | V_1:t-1) from
  the forward algorithm (the posterior of the previous visit's type given that patient's codes,
  pushed through the transition table). This is the exact marginal likelihood of the codes under
  the model and the prior's chain when every type the chain reaches is scored
  (``lpl_types=None``; types of probability 0 contribute nothing). By default each visit is scored
  under the ``lpl_types`` types most likely under the chain's weights and the model's per-type
  logit bias alone (a cheap ranking, no network); the types left out count as probability 0, so
  the figure is an upper bound of the exact ``lpl``. The posterior reads the codes, not the visit
  length.
  For ``mpl`` the type of visit t is marginalised given the rest of the visit:
  P(v | rest) = sum_m w_m P(rest, v | m) / sum_m w_m P(rest | m), w_m = P(m | V_1:t-1). Each left-out
  code costs one row per type, so the sum runs over the fewest types holding ``mpl_mass``
  (0.999) of P(m | rest), at most ``mpl_types`` (8), estimated from the ``lpl`` pass: w_m times
  the visit's score under m without the left-out code's own term (the later codes' terms there
  were conditioned on it; the sum itself is computed with the code left out). Exact once the
  types cover every reachable type; not a bound otherwise.

Also returned: ``lpl_later_visits`` (visits after the first only: PromptEHR's released evaluator
scores ``lpl`` on patients with two or more visits, from their second visit), and
``lpl_median`` / ``mpl_median``, the median over codes of 1 / P(code): the statistic the released
evaluator reports (the paper's formula is the exponential of the mean negative log-probability).
Codes whose category the tokenizer does not know (``<unk>``) cannot be scored and are counted in
``n_unscored_codes``; codes outside the vocabulary with a known category are scored as their
category's catch-all token, as the tokenizer encodes them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.datasets_scripts.schema import SEXES
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.processors import VocabIndex

DEFAULT_PATIENTS = 100
DEFAULT_LPL_TYPES = 16
DEFAULT_MPL_TYPES = 8
DEFAULT_MPL_MASS = 0.999
# mpl leaves out at most this many codes per visit (a seeded random subset, weighted back to the
# visit's size): its cost grows with the square of a visit's length otherwise (36 codes a visit
# with procedures and medications).
DEFAULT_MPL_CODES = 16
DEFAULT_HISTORY_LENGTH = 256  # encoder tokens of history, as generation's default
DEFAULT_BATCH_SIZE = 128
CODE_ORDERS = ("seq_num", "hierarchical")


def _pairs(tokenizer, visit: Sequence[str]) -> tuple[list[tuple[int, int]], int]:
    """(category id, code id) pairs of a visit as the tokenizer encodes it, and the number of
    ``<unk>`` codes (unknown category) left out."""
    ids = tokenizer.encode_visit(visit)[1:-1]
    pairs, unk, i = [], 0, 0
    while i < len(ids):
        if ids[i] == tokenizer.unk_token_id:
            unk, i = unk + 1, i + 1
        else:
            pairs.append((ids[i], ids[i + 1]))
            i += 2
    return pairs, unk


class _Scorer:
    """Per-pair log-probabilities of teacher-forced rows (encoder history, demographics, type,
    pairs), in batches of rows of similar length, with the grammar's normalisation (module
    docstring)."""

    def __init__(self, model, tokenizer, batch_size: int, progress: bool):
        self.model, self.tok = model, tokenizer
        self.index = VocabIndex(tokenizer, model.config.vocab_size).to(model.device)
        self.n_cat = len(self.index.category_ids)
        self.n_kids = torch.cat([self.index.kid_ok.sum(1)[:-1], torch.zeros(1, dtype=torch.long,
                                                                             device=model.device)])
        self.batch_size, self.progress = batch_size, progress

    @torch.no_grad()
    def __call__(self, rows: list[tuple], desc: str) -> list[np.ndarray]:
        """rows: (history ids, age, x_cat list, pairs) -> one [n_pairs] float64 array per row."""
        out: list[np.ndarray] = [np.zeros(0)] * len(rows)
        order = sorted(range(len(rows)), key=lambda r: (len(rows[r][3]), len(rows[r][0])))
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not self.progress or len(batches) < 2):
            for r, scores in zip(batch, self._batch([rows[r] for r in batch])):
                out[r] = scores
        return out

    def _batch(self, rows: list[tuple]) -> list[np.ndarray]:
        model, index, dev = self.model, self.index, self.model.device
        B, S, N = len(rows), max(len(r[0]) for r in rows), max(len(r[3]) for r in rows)
        enc = torch.full((B, S), self.tok.pad_token_id, dtype=torch.long)
        enc_mask = torch.zeros((B, S), dtype=torch.long)
        pairs = torch.full((B, N, 2), index.pad_id, dtype=torch.long)
        n_pairs = torch.tensor([len(r[3]) for r in rows])
        for i, (hist, _, _, prs) in enumerate(rows):
            enc[i, : len(hist)], enc_mask[i, : len(hist)] = torch.tensor(hist), 1
            pairs[i, : len(prs)] = torch.tensor(prs, dtype=torch.long).reshape(-1, 2)
        # decoder input: start, <v>, c1, k1, ..., c_N; hidden 2j+1 predicts c_{j+1}, 2j+2 its code
        dec = torch.cat([torch.tensor([[model.config.decoder_start_token_id, index.visit_start_id]]).expand(B, 2),
                         pairs.reshape(B, 2 * N)[:, :-1]], 1)
        dec_mask = (torch.arange(2 * N + 1)[None] < 2 * n_pairs[:, None] + 1).long()
        x_cat = torch.tensor([r[2] for r in rows], dtype=torch.long)
        hidden = model.model(input_ids=enc.to(dev), attention_mask=enc_mask.to(dev), decoder_input_ids=dec.to(dev),
                             decoder_attention_mask=dec_mask.to(dev), x_cat=x_cat.to(dev),
                             x_num=torch.tensor([[float(r[1])] for r in rows], device=dev)).last_hidden_state
        valid = (torch.arange(N)[None] < n_pairs[:, None]).to(dev)  # [B, N]
        row_of = torch.arange(B, device=dev)[:, None].expand(B, N)[valid]  # [P] the row of each pair
        step = torch.arange(N, device=dev)[None].expand(B, N)[valid]  # [P] its place in the row
        pairs = pairs.to(dev)
        cats, codes = pairs[..., 0], pairs[..., 1]
        weight = model.lm_head.weight
        bias = None
        if model.visit_type_bias is not None:
            bias = model.visit_type_bias.weight[x_cat[:, model.config.visit_type_feature_index].to(dev)]  # [B, V]

        # categories: those with a code not yet in the visit
        cat_pos = index.category_pos[cats]  # [B, N]
        used = torch.zeros(B, N + 1, self.n_cat + 1, device=dev)
        used[:, 1:].scatter_(2, cat_pos[..., None], valid[..., None].float())
        used = used.cumsum(1)[:, :N]  # [B, N, n_cat + 1] codes of each category before step j
        open_cat = (self.n_kids[None, None] - used > 0)[..., : self.n_cat][valid]  # [P, n_cat]
        cat_logits = hidden[:, 1::2][valid] @ weight[index.category_ids].T  # [P, n_cat]
        if bias is not None:
            cat_logits = cat_logits + bias[:, index.category_ids][row_of]
        cat_logp = torch.log_softmax(cat_logits.float().masked_fill(~open_cat, float("-inf")), -1)
        cat_score = cat_logp.gather(1, cat_pos[valid][:, None])[:, 0]

        # codes: the category's codes not yet in the visit
        kids, kid_ok = index.kids[cat_pos[valid]], index.kid_ok[cat_pos[valid]]  # [P, K]
        earlier = codes[row_of] * (torch.arange(N, device=dev)[None] < step[:, None])  # [P, N], 0 = none
        kid_ok = kid_ok & ~(kids[..., None] == earlier[:, None, :]).any(-1)
        code_logits = torch.einsum("pd,pkd->pk", hidden[:, 2::2][valid], weight[kids])
        if bias is not None:
            code_logits = code_logits + bias[row_of[:, None], kids]
        code_logp = torch.log_softmax(code_logits.float().masked_fill(~kid_ok, float("-inf")), -1)
        hit = (kids == codes[valid][:, None]) & kid_ok
        code_score = code_logp.masked_fill(~hit, 0.0).sum(1)
        scores = (cat_score + code_score).double().cpu().numpy()
        return np.split(scores, np.cumsum(n_pairs.numpy())[:-1])


class _TypeProxy:
    """A cheap ranking of the visit types for a visit, without the network: the model's per-type
    logit bias alone, log-softmax over the categories and over each category's codes, summed over
    the visit's pairs."""

    def __init__(self, model, index: VocabIndex):
        bias = model.visit_type_bias.weight.detach().float().cpu()  # [M, V]
        self.category_pos = index.category_pos.cpu()
        self.cat = torch.log_softmax(bias[:, index.category_ids.cpu()], -1)  # [M, n_cat]
        kids, kid_ok = index.kids.cpu(), index.kid_ok.cpu()
        per_kid = torch.log_softmax(bias[:, kids].masked_fill(~kid_ok, float("-inf")), -1)  # [M, n_cat + 1, K]
        self.code = torch.zeros_like(bias)
        self.code[:, kids[kid_ok]] = per_kid[:, kid_ok]

    def __call__(self, pairs: list[tuple[int, int]], types: np.ndarray) -> np.ndarray:
        cats, codes = torch.tensor(pairs, dtype=torch.long).T
        rows = torch.as_tensor(types, dtype=torch.long)
        return (self.cat[rows][:, self.category_pos[cats]].sum(1) + self.code[rows][:, codes].sum(1)).double().numpy()


def _logsumexp(x: np.ndarray) -> float:
    top = float(np.max(x))
    return top + math.log(float(np.sum(np.exp(x - top)))) if math.isfinite(top) else top


@torch.no_grad()
def perplexity(model, tokenizer, patients: Any, prior: CohortPrior | None = None, *,
               max_patients: int | None = DEFAULT_PATIENTS, lpl_types: int | None = DEFAULT_LPL_TYPES,
               mpl_types: int = DEFAULT_MPL_TYPES, mpl_mass: float = DEFAULT_MPL_MASS,
               code_order: str = "seq_num", max_history_length: int = DEFAULT_HISTORY_LENGTH,
               batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, progress: bool = True,
               mpl_codes: int | None = DEFAULT_MPL_CODES) -> dict[str, Any]:
    """``lpl`` and ``mpl`` of ``model`` on ``patients`` (definitions: module docstring).

    Args:
        model: a PromptEHRForConditionalGeneration (put in eval mode here).
        tokenizer: its PromptEHRTokenizer.
        patients: held-out patients: dicts (or a table) with ``age``, ``sex``, ``visits``.
        prior: the checkpoint's CohortPrior; required when the model is conditioned on visit types
            (its type chain), unused otherwise.
        max_patients: score a random sample of this many patients (``seed``); None: all.
        lpl_types: types per visit over which ``lpl`` marginalises: the most likely ones under the
            type chain's weights and the model's per-type logit bias alone (a cheap ranking); the
            others count as probability 0, so the figure is an upper bound of the exact ``lpl``.
            None: every type the chain reaches (exact).
        mpl_types, mpl_mass: ``mpl`` marginalises each left-out code's visit type over the fewest
            types holding ``mpl_mass`` of their estimated posterior given the rest of the visit,
            at most ``mpl_types``, among those ``lpl`` scored.
        mpl_codes: ``mpl`` leaves out at most this many codes of a visit, a random subset
            (``seed``) whose terms each weigh (visit's codes / codes left out), so that the figure
            estimates the mean over every code; None: every code.
        code_order: ``"seq_num"`` (codes as stored) or ``"hierarchical"`` (sorted).
        max_history_length: encoder tokens of history (the newest visits that fit).

    Returns: ``lpl``, ``mpl``, ``lpl_later_visits``, ``lpl_median``, ``mpl_median``,
    ``lpl_nll`` / ``mpl_nll`` (total negative log-probability, nats), ``n_codes``,
    ``n_codes_later_visits``, ``n_unscored_codes``, ``n_patients``, ``n_visits``, ``n_types``
    (0: untyped), ``lpl_types`` / ``mpl_types`` (None: untyped), ``mpl_mean_types`` (types
    ``mpl`` summed over per code, on average), ``mpl_codes_left_out`` (codes ``mpl`` scored),
    ``mpl_codes`` (the cap), ``code_order``, ``seconds``.
    Perplexities are NaN when no code was scored.
    """
    if code_order not in CODE_ORDERS:
        raise ValueError(f"code_order must be one of {CODE_ORDERS}, got {code_order!r}")
    if min(mpl_types, batch_size, lpl_types or 1, max_patients or 1, mpl_codes or 1) < 1:
        raise ValueError("mpl_types, lpl_types, batch_size, max_patients and mpl_codes must be >= 1")
    if not 0.0 < mpl_mass <= 1.0:
        raise ValueError(f"mpl_mass must be in (0, 1], got {mpl_mass}")
    t0 = time.perf_counter()
    model.eval()
    ages, sexes = inc.cohort_column(patients, "age"), inc.cohort_column(patients, "sex")
    all_visits = inc.cohort_column(patients, "visits")
    chosen = np.arange(len(all_visits))
    if max_patients is not None and len(chosen) > max_patients:
        chosen = np.sort(np.random.default_rng(seed).choice(len(chosen), size=max_patients, replace=False))
    type_index = getattr(model.config, "visit_type_feature_index", None)
    typed = type_index is not None
    if typed:
        if prior is None or not prior.n_types:
            raise ValueError("the model is conditioned on visit types: pass its cohort prior (cohort_prior.json) "
                             "with the type chain")
        n_types = model.config.cat_cardinalities[type_index]
        if prior.n_types != n_types:
            raise ValueError(f"the cohort prior has {prior.n_types} visit types, the model {n_types}")
        firsts = prior.first_type_probs([float(ages[i]) for i in chosen], [len(all_visits[i]) for i in chosen])
        transition = prior.transition_probs()
    else:
        n_types = 0
    history_cap = min(max_history_length, model.config.max_position_embeddings - model.config.num_prompts)

    # one entry per scored patient: demographics, and per visit its pairs and its history
    plan, n_unscored = [], 0
    for k, i in enumerate(chosen):
        visits = [sorted(v) if code_order == "hierarchical" else list(v) for v in all_visits[i]]
        encoded = [_pairs(tokenizer, v) for v in visits]
        n_unscored += sum(u for _, u in encoded)
        plan.append({"age": float(ages[i]), "sex": SEXES.index(sexes[i]), "first": firsts[k] if typed else None,
                     "pairs": [p for p, _ in encoded],
                     "history": [tokenizer.encode_history(visits[:t], history_cap) for t in range(len(visits))]})

    def x_cat(p: dict, m: int | None) -> list[int]:
        return [p["sex"]] if m is None else [p["sex"], int(m)]

    scorer = _Scorer(model, tokenizer, batch_size, progress)
    proxy = _TypeProxy(model, scorer.index) if typed and lpl_types is not None else None
    # lpl, one round per visit index: a typed visit t is scored under every type its weights
    # P(m | V_1:t-1) reach (or the lpl_types most likely ones), then the posterior is updated
    lpl_codes, lpl_later, weights = [], [], {}
    by_type: dict[tuple, dict] = {}  # (patient, visit) -> {type: per-pair log-probabilities}
    alpha: dict[int, np.ndarray] = {}
    for t in range(max((len(p["pairs"]) for p in plan), default=0)):
        rows, keys, cands = [], [], {}
        for a, p in enumerate(plan):
            if t >= len(p["pairs"]):
                continue
            if typed:
                w = p["first"] if t == 0 else alpha[a] @ transition
                weights[a, t] = w
                cand = np.nonzero(w > 0)[0]
                if proxy is not None and p["pairs"][t] and len(cand) > lpl_types:
                    guess = np.log(w[cand]) + proxy(p["pairs"][t], cand)
                    cand = np.sort(cand[np.argsort(-guess, kind="stable")[:lpl_types]])
                cands[a] = cand
            for m in ([int(m) for m in cands[a]] if typed else [None]):
                if p["pairs"][t]:
                    rows.append((p["history"][t], p["age"], x_cat(p, m), p["pairs"][t]))
                    keys.append((a, m))
        scores = dict(zip(keys, scorer(rows, f"perplexity: lpl, visit {t + 1}")))
        for (a, m), pair_scores in scores.items():
            by_type.setdefault((a, t), {})[m] = pair_scores
        for a, p in enumerate(plan):
            if t >= len(p["pairs"]):
                continue
            n = len(p["pairs"][t])
            if typed:  # forward algorithm over the candidate types
                cand, w = cands[a], weights[a, t]
                log_w = np.log(w[cand])
                cum = (np.stack([np.cumsum(scores[a, int(m)]) for m in cand]) if n
                       else np.zeros((len(cand), 0)))  # [types, pairs] log P(pairs <= l | type)
                # code l given the codes before it: P(pairs <= l) / P(pairs < l), types marginalised
                # (P(pairs < 1) = 1: with lpl_types, the types left out count as probability 0)
                joint = [0.0] + [_logsumexp(log_w + cum[:, j]) for j in range(n)]
                codes = np.diff(joint).tolist()
                alpha[a] = np.zeros(len(w))
                alpha[a][cand] = np.exp(log_w + (cum[:, -1] if n else 0.0) - joint[-1])
            else:
                codes = scores[a, None].tolist() if n else []
            lpl_codes += codes
            if t > 0:
                lpl_later += codes

    # mpl: every (patient, visit, left-out code, likely type) row: the other codes, then that one
    rows, keys, mpl_sets, n_mpl_types, left_out = [], [], {}, [], {}
    pick = np.random.default_rng([seed, 1])
    for a, p in enumerate(plan):
        for t, prs in enumerate(p["pairs"]):
            n = len(prs)
            left_out[a, t] = (range(n) if mpl_codes is None or n <= mpl_codes
                              else np.sort(pick.choice(n, size=mpl_codes, replace=False)).tolist())
            for lo in left_out[a, t]:
                rest = prs[:lo] + prs[lo + 1:]
                types = [None]
                if typed:
                    # the types holding mpl_mass of P(m | rest), estimated from the lpl pass: the
                    # visit's score under each type without the left-out code's own term
                    scored_types = by_type[a, t]
                    cand = np.array(sorted(scored_types))
                    guess = np.log(weights[a, t][cand]) + np.array(
                        [scored_types[m].sum() - scored_types[m][lo] for m in cand])
                    post = np.exp(guess - guess.max())
                    post /= post.sum()
                    order = np.argsort(-post, kind="stable")
                    k = min(int(np.searchsorted(np.cumsum(post[order]), mpl_mass)) + 1, mpl_types, len(cand))
                    types = mpl_sets[a, t, lo] = sorted(int(m) for m in cand[order[:k]])
                    n_mpl_types.append(k)
                for m in types:
                    rows.append((p["history"][t], p["age"], x_cat(p, m), rest + [prs[lo]]))
                    keys.append((a, t, lo, m))
    scored = dict(zip(keys, scorer(rows, "perplexity: mpl")))
    mpl_scores, mpl_weights = [], []
    for a, p in enumerate(plan):
        for t, prs in enumerate(p["pairs"]):
            mpl_weights += [len(prs) / len(left_out[a, t])] * len(left_out[a, t])
            for lo in left_out[a, t]:
                if typed:
                    ms = mpl_sets[a, t, lo]
                    log_w = np.log(weights[a, t][ms])
                    rest = np.array([scored[a, t, lo, m][:-1].sum() for m in ms])
                    last = np.array([scored[a, t, lo, m][-1] for m in ms])
                    mpl_scores.append(_logsumexp(log_w + rest + last) - _logsumexp(log_w + rest))
                else:
                    mpl_scores.append(float(scored[a, t, lo, None][-1]))

    def ppl(logps: list[float], weights: list[float] | None = None) -> float:
        return math.exp(-float(np.average(logps, weights=weights))) if logps else float("nan")

    def median(logps: list[float]) -> float:
        return float(np.median(np.exp(-np.asarray(logps)))) if logps else float("nan")

    return {
        "lpl": ppl(lpl_codes), "mpl": ppl(mpl_scores, mpl_weights), "lpl_later_visits": ppl(lpl_later),
        "lpl_median": median(lpl_codes), "mpl_median": median(mpl_scores),
        "lpl_nll": -float(np.sum(lpl_codes)), "mpl_nll": -float(np.dot(mpl_scores, mpl_weights)),
        "mpl_codes_left_out": len(mpl_scores), "mpl_codes": mpl_codes,
        "n_codes": len(lpl_codes), "n_codes_later_visits": len(lpl_later), "n_unscored_codes": n_unscored,
        "n_patients": len(plan), "n_visits": sum(len(p["pairs"]) for p in plan), "n_types": n_types,
        "lpl_types": lpl_types if typed else None,
        "mpl_types": mpl_types if typed else None,
        "mpl_mean_types": float(np.mean(n_mpl_types)) if n_mpl_types else None, "code_order": code_order,
        "seconds": round(time.perf_counter() - t0, 2),
    }


__all__ = ["DEFAULT_LPL_TYPES", "DEFAULT_MPL_CODES", "DEFAULT_MPL_MASS", "DEFAULT_MPL_TYPES", "DEFAULT_PATIENTS",
           "perplexity"]
