"""Stage two given the visit's codes: the prior's within-visit pair counts, their scores, the
processor that adds them, and generation writing bundled codes together."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import numpy as np
import pytest
import torch

from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.patients import code_pair_scores
from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients
from promptehr_hf.modeling_promptehr.generation.prior import PAIR_MIN_COUNT, CohortPrior
from promptehr_hf.modeling_promptehr.generation.processors import VocabIndex, visit_logits_processors
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Two bundles across two categories: 250.00 comes with 401.9, 250.01 with 401.1.
BUNDLES = (("25000", "4019"), ("25001", "4011"))


@pytest.fixture(scope="module")
def bundled() -> list[dict]:
    """300 patients; every visit holds one bundle (its two codes in random order) and one code of 428."""
    rng = np.random.default_rng(0)
    patients = []
    for sid in range(300):
        visit = [*BUNDLES[int(rng.integers(2))], ["4280", "42832"][int(rng.integers(2))]]
        patients.append({"subject_id": sid + 1, "age": 60.0, "sex": "FM"[sid % 2],
                         "visits": [[str(c) for c in rng.permutation(visit)]]})
    return patients


def test_pair_counts_are_exact_per_modality_and_drop_rare_pairs():
    """Stored pairs = brute-force counts >= the threshold, per modality; visits per code exact."""
    rng = np.random.default_rng(1)
    dx, px = ["4019", "25000", "4280", "5849", "486"], ["3615", "3961", "9604", "9671"]
    patients = []
    for sid in range(120):
        visits = [[str(c) for c in rng.choice(dx, size=int(rng.integers(1, 5)), replace=False)]
                  for _ in range(int(rng.integers(1, 3)))]
        procedures = [[str(c) for c in rng.choice(px, size=int(rng.integers(0, 4)), replace=False)] for _ in visits]
        patients.append({"subject_id": sid, "age": 50.0, "sex": "F", "visits": visits, "procedures": procedures})
    for sid in range(PAIR_MIN_COUNT - 1):  # a pair one visit short of the threshold
        patients.append({"subject_id": 1000 + sid, "age": 50.0, "sex": "F", "visits": [["0389", "99592"]],
                         "procedures": [[]]})
    prior = CohortPrior.from_patients(patients, modalities=("diagnoses", "procedures"))
    table = prior.table["code_pairs"]
    assert table["min_count"] == PAIR_MIN_COUNT and table["n_visits"] == sum(len(p["visits"]) for p in patients)
    for name, prefix, field in (("diagnoses", "", "visits"), ("procedures", "PX:", "procedures")):
        expected = Counter(pair for p in patients for v in p[field] for pair in combinations(sorted(set(v)), 2))
        expected = {(prefix + a, prefix + b): n for (a, b), n in expected.items() if n >= PAIR_MIN_COUNT}
        cell = table["modalities"][name]
        got = {(cell["codes"][a], cell["codes"][b]): n for a, b, n in zip(cell["a"], cell["b"], cell["n"])}
        assert got == expected and len(got) > 3
        visits = Counter(prefix + c for p in patients for v in p[field] for c in set(v))
        assert dict(zip(cell["codes"], cell["visits"])) == {c: visits[c] for c in cell["codes"]}
    codes = table["modalities"]["diagnoses"]["codes"]
    assert "0389" in codes and ("0389", "99592") not in {(codes[a], codes[b]) for a, b in
                                                         zip(table["modalities"]["diagnoses"]["a"],
                                                             table["modalities"]["diagnoses"]["b"])}
    tokens, visits, n_visits, min_count, a, b, n = prior.code_pairs()
    assert n_visits == table["n_visits"] and min_count == PAIR_MIN_COUNT and len(a) == len(b) == len(n)
    assert len(tokens) == len(visits) == len(dx) + 2 + len(px)  # every code, with its visits
    assert not any(tokens[i].startswith("PX:") != tokens[j].startswith("PX:") for i, j in zip(a, b))


def _lift(prior: CohortPrior, given: str, code: str) -> float:
    """The pair score by hand: log((n + 1) / (E + 1)), E = N(given) N(code) / N, an unstored
    pair's n taken as min(E, (min_count - 1) / 2)."""
    tokens, visits, n_visits, min_count, a, b, n = prior.code_pairs()
    pos = {t: i for i, t in enumerate(tokens)}
    expected = visits[pos[given]] * visits[pos[code]] / n_visits
    stored = {frozenset((tokens[i], tokens[j])): k for i, j, k in zip(a, b, n)}
    count = stored.get(frozenset((given, code)), min(expected, (min_count - 1) / 2))
    return float(np.log((count + 1) / (expected + 1)))


def test_stage_two_adds_the_pair_scores_of_the_codes_written(bundled):
    """Kid scores = temperature x (log P(code | category) + weight / sqrt(m) x the sum of the pair
    scores given the m codes of the modality already in the visit); a code counts once."""
    tok = PromptEHRTokenizer.from_patients(bundled)
    prior = CohortPrior.from_patients(bundled)
    index = VocabIndex(tok)
    ids = tok.convert_tokens_to_ids
    weight, temperature = 0.7, 0.8
    (chain,) = visit_logits_processors(index, [60.0], ["F"], n_codes=[3], stage_two="empirical", cms=False,
                                       temperature=temperature, pair_scores=code_pair_scores(prior, tok, index),
                                       pair_weight=weight)
    stage_two = chain.processors[0]
    written = [tok.bos_token_id, tok.visit_start_id, ids("C:401"), ids("4019"), ids("C:428"), ids("4280")]
    for t in range(2, len(written) + 1):  # the chain sees every step, as generate runs it
        stage_two(torch.tensor([written[:t]]), torch.zeros(1, index.size))
    out = stage_two(torch.tensor([written + [ids("C:250")]]), torch.zeros(1, index.size))
    again = stage_two(torch.tensor([written + [ids("C:250")]]), torch.zeros(1, index.size))  # same step: no recount
    assert torch.equal(out, again)
    for code in ("25000", "25001"):
        lift = (_lift(prior, "4019", code) + _lift(prior, "4280", code)) * weight / np.sqrt(2)
        expected = temperature * (np.log(tok.code_probs[ids(code)]) + lift)
        assert out[0, ids(code)].item() == pytest.approx(expected, rel=1e-4)
    assert _lift(prior, "4019", "25000") > 0.5 and _lift(prior, "4019", "25001") < -3  # bundled / never together


def test_generation_writes_bundles_together(bundled, tiny_config):
    """Visits holding both categories 250 and 401: the bundle's codes together in most of them
    with the pair scores, in about half without (P(code | category) alone is 50/50)."""
    tok = PromptEHRTokenizer.from_patients(bundled)
    prior = CohortPrior.from_patients(bundled)
    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(
        PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny_config, max_position_embeddings=64)).eval()
    bundles = {frozenset(b) for b in BUNDLES}

    def bundled_share(weight: float) -> float:
        ds, _ = generate_patients(model, tok, 400, prior=prior, stage_two="empirical", pair_weight=weight,
                                  batch_size=128, seed=0, progress=False)
        both = [v for vs in ds["visits"] for v in vs
                if any(c.startswith("250") for c in v) and any(c.startswith("401") for c in v)]
        assert len(both) > 100
        return np.mean([any(b <= set(v) for b in bundles) for v in both])

    assert bundled_share(0.7) > 0.8
    assert 0.35 < bundled_share(0.0) < 0.65
