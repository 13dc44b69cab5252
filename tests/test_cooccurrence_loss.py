"""The co-occurrence loss reaches the model: gradient, brute-force equality, direction; counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptehr_hf.modeling_promptehr.training.losses import (
    CooccurrenceLoss,
    load_cooccurrence,
    penalty_weights,
    save_cooccurrence,
)

V_START, V_END, PAD = 5, 6, -100
CAT_IDS = [7, 9, 11, 13, 15, 17]  # K = 6 category tokens in a vocabulary of 24
CODE_IDS = [8, 10, 12, 14, 16, 18, 19, 20]
VOCAB = 24


def brute_force(logits, labels, counts, cat_ids, tau, visit_start_id):
    """The loss formula of the losses module docstring, with plain Python loops."""
    W = [[tau / (c + 1.0) if c < tau else 0.0 for c in row] for row in counts.tolist()]
    index = {t: i for i, t in enumerate(cat_ids)}
    penalties = []
    for b in range(labels.shape[0]):
        seen: list[int] = []
        for t in range(labels.shape[1]):
            lab = int(labels[b, t])
            if lab == visit_start_id:
                seen = []
                continue
            if lab not in index:
                continue
            if seen:
                z = [float(logits[b, t, c]) for c in cat_ids]
                m = max(z)
                e = [np.exp(v - m) for v in z]
                p = [v / sum(e) for v in e]
                S = sorted(set(seen))
                penalties.append(sum(p[k] * sum(W[s][k] for s in S) / len(S) for k in range(len(cat_ids))))
            seen.append(index[lab])
    return float(np.mean(penalties))


def random_labels(gen, B=5, T=19):
    """Rows of <v> (cat code)* </v>, sometimes two visits, categories repeating, -100 padding."""
    rows = []
    for b in range(B):
        row = []
        for _ in range(1 + (b % 2)):
            row.append(V_START)
            for _ in range(int(gen.integers(1, 5))):
                row += [CAT_IDS[int(gen.integers(0, len(CAT_IDS)))], CODE_IDS[int(gen.integers(0, len(CODE_IDS)))]]
            row.append(V_END)
        rows.append(row[:T] + [PAD] * (T - len(row[:T])))
    return torch.tensor(rows)


def test_matches_brute_force_and_has_gradient():
    gen = np.random.default_rng(0)
    counts = torch.tensor(gen.integers(0, 9, size=(6, 6)))
    counts = counts + counts.T
    labels = random_labels(gen)
    logits = torch.randn(labels.shape[0], labels.shape[1], VOCAB, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
    loss_fn = CooccurrenceLoss(counts, CAT_IDS, tau=6.0, visit_start_id=V_START)
    loss = loss_fn(logits, labels)
    expected = brute_force(logits.detach(), labels, counts, CAT_IDS, 6.0, V_START)
    assert abs(loss.item() - expected) < 1e-5, (loss.item(), expected)
    loss.backward()
    grad = logits.grad
    assert grad.abs().sum() > 0
    # The gradient lives only on category logits at positions with a non-empty S.
    assert grad[..., CODE_IDS].abs().sum() == 0
    assert grad[:, 0].abs().sum() == 0  # <v> position: no category label


def test_lower_when_mass_on_frequent_pairs():
    counts = torch.zeros(6, 6, dtype=torch.long)
    counts[0, 1] = counts[1, 0] = 100  # categories 0 and 1 co-occur all the time; 0 and 2 never
    labels = torch.tensor([[V_START, CAT_IDS[0], 8, CAT_IDS[3], 10, V_END]])
    loss_fn = CooccurrenceLoss(counts, CAT_IDS, tau=5.0, visit_start_id=V_START)
    frequent = torch.zeros(1, 6, VOCAB)
    rare = torch.zeros(1, 6, VOCAB)
    frequent[0, 3, CAT_IDS[1]] = 8.0  # after category 0, predict its frequent partner
    rare[0, 3, CAT_IDS[2]] = 8.0  # ... or a pair never seen in training
    lf, lr = loss_fn(frequent, labels).item(), loss_fn(rare, labels).item()
    assert lf < 0.05 * lr, (lf, lr)
    assert lr > 4.0  # nearly all mass on W = tau / 1


def test_empty_s_contributes_nothing():
    counts = torch.zeros(6, 6, dtype=torch.long)
    loss_fn = CooccurrenceLoss(counts, CAT_IDS, tau=5.0, visit_start_id=V_START)
    labels = torch.tensor([[V_START, CAT_IDS[0], 8, V_END, PAD]])  # one category: S always empty
    logits = torch.randn(1, 5, VOCAB, requires_grad=True)
    loss = loss_fn(logits, labels)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    # Same category twice: S = {itself}, the diagonal is used.
    labels = torch.tensor([[V_START, CAT_IDS[0], 8, CAT_IDS[0], 10, V_END]])
    assert loss_fn(torch.zeros(1, 6, VOCAB), labels).item() == pytest.approx(5.0)


def test_penalty_weights_and_file_round_trip(tmp_path):
    counts = torch.tensor([[0, 4, 5], [4, 1, 9], [5, 9, 2]])
    W = penalty_weights(counts, tau=5.0)
    assert W[0, 1].item() == pytest.approx(1.0) and W[0, 2].item() == 0.0 and W[0, 0].item() == 5.0
    save_cooccurrence(str(tmp_path), counts, ["401", "250", "E880"], [7, 9, 11])
    c2, cats, ids = load_cooccurrence(str(tmp_path))
    assert torch.equal(c2, counts) and cats == ["401", "250", "E880"] and ids.tolist() == [7, 9, 11]
    assert CooccurrenceLoss.from_file(str(tmp_path)).W.shape == (3, 3)


def test_category_counts_from_visits():
    from promptehr_hf.modeling_promptehr.training.losses import category_cooccurrence

    patients = [
        {"subject_id": 1, "age": 60.0, "sex": "M", "visits": [["4019", "4011", "25000"], ["4280", "25000"]]},
        {"subject_id": 2, "age": 70.0, "sex": "F", "visits": [["4019", "4280", "E8800"]]},
    ]
    cats = ["250", "401", "428", "E880", "999"]  # 999 never occurs
    C = category_cooccurrence(patients, cats)
    expected = np.array([
        # 250 401 428 E880 999
        [0, 1, 1, 0, 0],  # 250: with 401 (visit 1), with 428 (visit 2)
        [1, 1, 1, 1, 0],  # 401: diagonal 1 = visit 1 holds two 401 codes (4019, 4011)
        [1, 1, 0, 1, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ])
    assert C.dtype == np.int64 and (C == expected).all(), C
