"""Privacy of a synthetic cohort S towards its training cohort T, with a held-out real cohort H
(patients of the same population the generator never saw) as the control.

Patients are compared as 0/1 vectors over codes (``incidence.patient_matrix``: every code of
any visit; visit order, demographics and duplicates ignored; codes normalised to the dotless
form of their code system, ``code_system``, by ``coherence.Cohort``) with the Hamming distance
``|a| + |b| - 2 a.b``. HALO (Theodorou et al. 2023) aligns visits before counting; the code-set
form is the usual simplification, and it is what a sparse dot product computes at scale. Random
samples (``n_attack``, ``seed``) are drawn without replacement and only choose the *targets* of
an attack; neighbours are always searched in the whole synthetic, training and held-out cohorts,
so that a synthetic copy of a target is always found. Where an attack takes its nearest
neighbours, ties among them are broken by index (the lowest, for one neighbour): an arbitrary
but fixed choice.

- ``exact_copy_rate``: share of S patients identical to some T patient, patients compared as
  their ordered sequence of visit code sets (code order in a visit and demographics ignored).
  ``holdout_exact_copy_rate``: the same for H patients against T — what chance alone gives in
  this population (small patients, e.g. a newborn with two codes, recur in real data).
- ``membership_inference_accuracy`` (HALO's nearest-Hamming attack): m = min(n_attack, |T|, |H|)
  members sampled from T and m non-members from H; each gets d = its Hamming distance to the
  nearest S patient. The attacker calls "member" the targets with d < c, c = median of the 2m
  distances, or the targets with d <= c, whichever of the two sets has a size closer to m (the
  first when both are as close). Accuracy over the 2m; 0.5 is ideal (S tells nothing about who
  was in T), 1.0 total leakage. Why this rule: half the targets are members, and HALO's median
  threshold means to call half of them members; Hamming distances are small integers, so many
  targets share the median value and ``d < c`` alone may call almost nobody a member (a copy
  of T puts every member, so more than half the targets, at d = 0 < nobody). Taking the side
  of the median that comes closest to half keeps the rule a function of the distances only, so
  its expected accuracy is exactly 0.5 whenever members and non-members are equally close to S,
  however many ties there are. Held-out patients identical to a training patient are at d = 0
  on a copy too, which caps the accuracy of a copy below 1.
  ``membership_inference_auc``: the threshold-free version, ROC AUC of the score -d (ties count
  1/2): the probability that a random member is closer to S than a random non-member.
- Nearest-neighbour adversarial accuracy (Yale et al. 2020): for cohorts A and S,
  AA(A, S) = 1/2 [mean_a w(a; A, S) + mean_s w(s; S, A)], the accuracy of the 1-nearest-neighbour
  classifier telling A from S: w(y; Y, Z) = the share of y's nearest neighbours in the pool
  (Y without y itself) + Z that belong to Y, i.e. 1 if y's nearest neighbour in Y is closer than
  any in Z, 0 if one in Z is closer, and on a tie at distance d the fraction k_Y / (k_Y + k_Z) of
  the k_Y + k_Z pool patients at distance d (a tie broken at random, in expectation). The means
  run over n_A = min(n_attack, |A|) patients a sampled from A and n_S = min(n_attack, |S|)
  patients s sampled from S; the pool is the whole of both cohorts. When A and S are
  independent draws from one population, E[AA] = 1/2 - 1/(2 (|A| + |S| - 1)) whatever the sizes
  and ties (the chosen neighbour is a uniform draw from the exchangeable pool).
  ``aa_train`` = AA(T, S), ``aa_holdout`` = AA(H, S); ``nnaar`` = aa_holdout - aa_train
  (NNAAR, the privacy loss; about 0 is ideal, positive when S sits closer to T than to H).
- Attribute inference: the attacker knows, of a target patient, which of the ``n_known_codes``
  codes most frequent in T (by patients) the patient has; the other codes are the sensitive
  attributes. It takes the ``attribute_k`` nearest S patients on the known codes (Hamming) and
  predicts each sensitive code present iff more than half of them have it.
  ``attribute_inference_f1``: micro F1 = 2 TP / (2 TP + FP + FN) over (target, sensitive code)
  for the m member targets above; ``attribute_inference_f1_holdout``: the same attack on the m
  non-members (what S reveals about anyone from the population); ``attribute_inference_risk`` =
  the difference (about 0 is ideal).
- Sex inference: the attacker knows all codes and predicts the sex of the nearest S patient
  (the membership neighbour). ``sex_inference_f1`` / ``sex_inference_f1_holdout``: macro F1 over
  F and M on the member / non-member targets (NaN without a ``sex`` column).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from promptehr_hf.datasets_scripts import incidence as inc
from promptehr_hf.datasets_scripts.code_systems import DEFAULT_CODE_SYSTEM
from promptehr_hf.metrics.coherence import cohorts


def _sample(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)


def _nearest_with_count(A: sp.csr_matrix, B: sp.csr_matrix, self_index: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """For each row of A: (Hamming distance to its nearest row of B, number of B rows at that
    distance). ``self_index[i]``: the row of B that is row i of A itself, left out."""
    dist = np.empty(A.shape[0], dtype=np.int64)
    count = np.empty(A.shape[0], dtype=np.int64)
    for rows, D in inc.hamming_blocks(A, B):
        if self_index is not None:
            D[np.arange(D.shape[0]), self_index[rows]] = np.iinfo(np.int32).max
        dist[rows] = D.min(axis=1)
        count[rows] = (D == dist[rows, None]).sum(axis=1)
    return dist, count


def _own_side_share(P_own: sp.csr_matrix, P_other: sp.csr_matrix, queries: np.ndarray) -> float:
    """mean over the query rows y of P_own of w(y; own, other) (module docstring, NNAAR): the
    share of y's nearest neighbours in (own without y) + other that lie in own."""
    d_own, k_own = _nearest_with_count(P_own[queries], P_own, self_index=queries)
    d_other, k_other = _nearest_with_count(P_own[queries], P_other)
    w = np.where(d_own < d_other, 1.0, 0.0)
    tie = d_own == d_other
    w[tie] = k_own[tie] / (k_own[tie] + k_other[tie])
    return float(w.mean())


def _membership_accuracy(dist: np.ndarray, is_member: np.ndarray) -> float:
    """Accuracy of the median rule of the module docstring: "member" iff d < c or iff d <= c
    (c = median of dist), whichever calls a number of targets closer to the number of members."""
    c = np.median(dist)
    below, at_or_below = dist < c, dist <= c
    half = is_member.sum()
    said = at_or_below if abs(int(at_or_below.sum()) - half) < abs(int(below.sum()) - half) else below
    return float(np.mean(said == is_member))


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of scores for binary labels (Mann-Whitney, ties counted 1/2)."""
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _f1(pred: sp.csr_matrix, true: sp.csr_matrix) -> float:
    tp = pred.multiply(true).sum()
    denom = pred.sum() + true.sum()
    return float(2 * tp / denom) if denom else float("nan")


def _macro_f1(pred: np.ndarray, true: np.ndarray) -> float:
    scores = []
    for label in ("F", "M"):
        tp = np.sum((pred == label) & (true == label))
        denom = np.sum(pred == label) + np.sum(true == label)
        if denom:
            scores.append(2 * tp / denom)
    return float(np.mean(scores)) if scores else float("nan")


def _knn_vote(A: sp.csr_matrix, B: sp.csr_matrix, values: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """For each row of A, the 0/1 rows of ``values`` (aligned with B) held by more than half of
    the k nearest B rows (Hamming on A/B's columns). [n_a, values.shape[1]]."""
    k = min(k, B.shape[0])
    votes = []
    for _, D in inc.hamming_blocks(A, B):
        idx = np.argmin(D, axis=1)[:, None] if k == 1 else np.argpartition(D, k - 1, axis=1)[:, :k]
        n = idx.shape[0]
        pick = sp.csr_matrix((np.ones(idx.size, np.int32), (np.repeat(np.arange(n), k), idx.ravel())),
                             shape=(n, B.shape[0]))
        votes.append(sp.csr_matrix(pick @ values))
    V = sp.vstack(votes, format="csr") if votes else sp.csr_matrix((0, values.shape[1]), dtype=np.int32)
    V.data = (2 * V.data > k).astype(np.int32)
    V.eliminate_zeros()
    return V


def privacy(synthetic: Any, train: Any, holdout: Any, *, n_attack: int = 2000, n_known_codes: int = 100,
            attribute_k: int = 1, seed: int = 0, code_system: str = DEFAULT_CODE_SYSTEM) -> dict[str, Any]:
    """All metrics of the module docstring.

    Args:
        synthetic, train, holdout: cohorts (patient dicts, a ``datasets.Dataset`` or a dict of
            columns; ``visits`` needed, ``sex`` for sex inference).
        n_attack: cap on the target patients sampled per cohort for the attacks (cost ~
            n_attack x (|S| + |T| + |H|) distances).
        n_known_codes: the attacker's known codes (most frequent in train).
        attribute_k: neighbours voting in attribute inference. seed: sampling seed.
        code_system: ``"icd9cm"`` or ``"icd10cm"``, the cohorts' codes (their normalisation).
    Returns:
        dict of floats (and sample sizes as ints), keys as documented above.
    """
    cs, vocab = cohorts({"synthetic": synthetic, "train": train, "holdout": holdout}, code_system)
    S, T, H = cs["synthetic"], cs["train"], cs["holdout"]
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"n_synthetic_patients": S.n_patients, "n_train_patients": T.n_patients,
                           "n_holdout_patients": H.n_patients}

    out["exact_copy_rate"] = float(S.found_in(T).mean()) if S.n_patients else float("nan")
    out["holdout_exact_copy_rate"] = float(H.found_in(T).mean()) if H.n_patients else float("nan")

    PS, PT, PH = S.patients(), T.patients(), H.patients()

    # Membership inference: members from T, non-members from H, nearest synthetic patient.
    m = min(n_attack, T.n_patients, H.n_patients)
    members, others = _sample(T.n_patients, m, rng), _sample(H.n_patients, m, rng)
    targets = sp.vstack([PT[members], PH[others]], format="csr")
    is_member = np.r_[np.ones(m, bool), np.zeros(m, bool)]
    out["n_attack"] = m
    if m and S.n_patients:
        dist, nearest = inc.nearest_hamming(targets, PS)
        out["membership_inference_accuracy"] = _membership_accuracy(dist, is_member)
        out["membership_inference_auc"] = _auc(-dist.astype(np.float64), is_member)
    else:
        out["membership_inference_accuracy"] = out["membership_inference_auc"] = float("nan")

    # NNAAR: sampled query patients, neighbours in the whole cohorts.
    if min(T.n_patients, H.n_patients, S.n_patients) >= 2:
        queries = {name: _sample(c.n_patients, min(n_attack, c.n_patients), rng)
                   for name, c in (("train", T), ("holdout", H), ("synthetic", S))}
        for name, PA in (("train", PT), ("holdout", PH)):
            out[f"aa_{name}"] = 0.5 * (_own_side_share(PA, PS, queries[name])
                                       + _own_side_share(PS, PA, queries["synthetic"]))
        out["nnaar"] = out["aa_holdout"] - out["aa_train"]
    else:
        out["aa_train"] = out["aa_holdout"] = out["nnaar"] = float("nan")

    # Attribute inference on the membership targets.
    if m and S.n_patients:
        freq = np.asarray(PT.sum(axis=0)).ravel()
        known = np.argsort(-freq, kind="stable")[: min(n_known_codes, int((freq > 0).sum()))]
        hidden = np.setdiff1d(np.arange(len(vocab)), known)
        pred = _knn_vote(targets[:, known], PS[:, known], PS[:, hidden], attribute_k)
        true = targets[:, hidden]
        out["attribute_inference_f1"] = _f1(pred[:m], true[:m])
        out["attribute_inference_f1_holdout"] = _f1(pred[m:], true[m:])
        out["attribute_inference_risk"] = out["attribute_inference_f1"] - out["attribute_inference_f1_holdout"]
    else:
        out["attribute_inference_f1"] = out["attribute_inference_f1_holdout"] = float("nan")
        out["attribute_inference_risk"] = float("nan")

    if m and S.n_patients and S.sex is not None and T.sex is not None and H.sex is not None:
        guess = S.sex[nearest]
        out["sex_inference_f1"] = _macro_f1(guess[:m], T.sex[members])
        out["sex_inference_f1_holdout"] = _macro_f1(guess[m:], H.sex[others])
    else:
        out["sex_inference_f1"] = out["sex_inference_f1_holdout"] = float("nan")
    return out
