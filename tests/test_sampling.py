"""Stratified draws (generation/sampling.py): every draw keeps its own distribution, and a cohort's
totals stay within a draw or two of their expectation, where independent draws wander by their
sampling noise."""

from __future__ import annotations

import numpy as np

from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.sampling import (
    stratified_choice,
    stratified_uniform,
    stratified_within,
    systematic_classes,
)


def test_systematic_classes_keep_each_rows_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(4, 0.5), size=60)
    probs[0] = [0.0, 1.0, 0.0, 0.0]  # a certain class
    probs[1] = [0.5, 0.0, 0.0, 0.5]  # an impossible middle class
    rounds = 6000
    counts = np.zeros_like(probs)
    for _ in range(rounds):
        counts[np.arange(len(probs)), systematic_classes(probs, rng)] += 1
    # five standard errors of a frequency at p = 1/2
    np.testing.assert_allclose(counts / rounds, probs, atol=5 * np.sqrt(0.25 / rounds))
    assert counts[0, 1] == rounds and counts[1, 1] == counts[1, 2] == 0


def test_systematic_binary_totals_are_within_one_of_their_expectation():
    """In-hospital deaths of 5,000 patients of risks 0-60%: independent draws miss the expected
    count by about 20, the systematic draw by less than one, at every seed."""
    p = np.random.default_rng(1).beta(1.0, 8.0, 5000)
    probs = np.stack([1 - p, p], axis=1)
    misses = [abs((systematic_classes(probs, np.random.default_rng(s)) == 1).sum() - p.sum()) for s in range(30)]
    assert max(misses) < 1.0
    independent = [abs((np.random.default_rng(s).random(len(p)) < p).sum() - p.sum()) for s in range(30)]
    assert np.median(independent) > 5.0


def test_stratified_choice_counts_and_single_draws():
    probs = np.array([0.05, 0.2, 0.3, 0.45])
    for seed in range(10):
        counts = np.bincount(stratified_choice(np.arange(4), probs, 997, np.random.default_rng(seed)), minlength=4)
        assert np.all(np.abs(counts - 997 * probs) <= 2)
    rng = np.random.default_rng(0)
    singles = np.bincount([stratified_choice(np.arange(4), probs, 1, rng)[0] for _ in range(8000)], minlength=4)
    np.testing.assert_allclose(singles / 8000, probs, atol=5 * np.sqrt(0.25 / 8000))
    assert stratified_choice(np.array([7, 9]), np.array([0.0, 1.0]), 5, rng).tolist() == [9] * 5


def test_stratified_uniforms_fill_every_stratum():
    u = stratified_uniform(np.random.default_rng(0), 50)
    assert sorted(np.floor(u * 50).astype(int)) == list(range(50))
    groups = np.random.default_rng(1).integers(0, 4, 200)
    u = stratified_within(groups, np.random.default_rng(2))
    for g in range(4):
        size = int((groups == g).sum())
        assert sorted(np.floor(u[groups == g] * size).astype(int)) == list(range(size))


def test_a_cohort_prior_draws_its_visit_counts_to_within_two_patients():
    rng = np.random.default_rng(0)
    patients = [{"subject_id": i + 1, "age": 50.0, "sex": "FM"[i % 2],
                 "visits": [["4019"]] * int(rng.choice([1, 2, 3, 5], p=[0.6, 0.25, 0.1, 0.05]))}
                for i in range(400)]
    prior = CohortPrior.from_patients(patients)
    real = np.bincount([len(p["visits"]) for p in patients], minlength=6) / len(patients)
    for seed in range(5):
        drawn = prior.sample_n_visits(np.full(2000, 50.0), np.random.default_rng(seed))
        assert np.all(np.abs(np.bincount(drawn, minlength=6) - 2000 * real) <= 2)
