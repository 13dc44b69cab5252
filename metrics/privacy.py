"""Privacy of a synthetic cohort S towards its training cohort T, with a held-out real cohort H
(patients of the same population the generator never saw) as the control.

Patients are compared as 0/1 vectors over codes (``incidence.patient_matrix``: every code of
any visit; visit order, demographics and duplicates ignored) with the Hamming distance
``|a| + |b| - 2 a.b``. HALO (Theodorou et al. 2023) aligns visits before counting; the code-set
form is the usual simplification, and it is what a sparse dot product computes at scale. Random
samples (``n_attack``, ``seed``) are drawn without replacement; ties in nearest neighbours go to
the lowest index.

- ``exact_copy_rate``: share of S patients identical to some T patient, patients compared as
  their ordered sequence of visit code sets (code order in a visit and demographics ignored).
  ``holdout_exact_copy_rate``: the same for H patients against T — what chance alone gives in
  this population (small patients, e.g. a newborn with two codes, recur in real data).
- ``membership_inference_accuracy`` (HALO's nearest-Hamming attack): m = min(n_attack, |T|, |H|)
  members sampled from T and m non-members from H; each gets d = its Hamming distance to the
  nearest S patient; the attacker says "member" iff d < median of the 2m distances. Accuracy
  over the 2m; 0.5 is ideal (S tells nothing about who was in T), 1.0 total leakage.
  ``membership_inference_auc``: the threshold-free version, AUC of the score -d (ties count 1/2).
- Nearest-neighbour adversarial accuracy (Yale et al. 2020), on n = min(n_attack, |T|, |H|, |S|)
  patients sampled from each of T, H, S: for cohorts A, B,
  AA(A, S) = 1/2 [mean_a 1(d_S(a) > d_A(a)) + mean_s 1(d_A(s) > d_S(s))], where d_X(y) is the
  distance from y to its nearest neighbour in X, leaving y itself out when y is in X.
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
from promptehr_hf.metrics.coherence import cohorts


def _sample(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)


def _nearest_both(A: sp.csr_matrix, B: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(nearest distance to B for each row of A, nearest distance to A for each row of B)."""
    row = np.empty(A.shape[0], dtype=np.int64)
    col = np.full(B.shape[0], np.iinfo(np.int64).max)
    for rows, D in inc.hamming_blocks(A, B):
        row[rows] = D.min(axis=1)
        np.minimum(col, D.min(axis=0), out=col)
    return row, col


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
            attribute_k: int = 1, seed: int = 0) -> dict[str, Any]:
    """All metrics of the module docstring.

    Args:
        synthetic, train, holdout: cohorts (patient dicts, a ``datasets.Dataset`` or a dict of
            columns; ``visits`` needed, ``sex`` for sex inference).
        n_attack: cap on the patients sampled per cohort for the attacks (cost ~ n_attack x |S|).
        n_known_codes: the attacker's known codes (most frequent in train).
        attribute_k: neighbours voting in attribute inference. seed: sampling seed.
    Returns:
        dict of floats (and sample sizes as ints), keys as documented above.
    """
    cs, vocab = cohorts({"synthetic": synthetic, "train": train, "holdout": holdout})
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
        out["membership_inference_accuracy"] = float(np.mean((dist < np.median(dist)) == is_member))
        out["membership_inference_auc"] = _auc(-dist.astype(np.float64), is_member)
    else:
        out["membership_inference_accuracy"] = out["membership_inference_auc"] = float("nan")

    # NNAAR on equal samples of T, H, S.
    n = min(n_attack, T.n_patients, H.n_patients, S.n_patients)
    if n >= 2:
        t = PT[_sample(T.n_patients, n, rng)]
        h = PH[_sample(H.n_patients, n, rng)]
        s = PS[_sample(S.n_patients, n, rng)]
        d_ss, _ = inc.nearest_hamming(s, s, exclude_self=True)
        aa = {}
        for name, a in (("train", t), ("holdout", h)):
            d_aa, _ = inc.nearest_hamming(a, a, exclude_self=True)
            d_as, d_sa = _nearest_both(a, s)
            aa[name] = 0.5 * (np.mean(d_as > d_aa) + np.mean(d_sa > d_ss))
        out["aa_train"], out["aa_holdout"] = float(aa["train"]), float(aa["holdout"])
        out["nnaar"] = float(aa["holdout"] - aa["train"])
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
