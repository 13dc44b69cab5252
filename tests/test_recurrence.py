"""Recurrence: categories and codes of a patient's previous visit come back as often as in training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.patients import _recurrence_rows, recurrence_log_lifts
from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.processors import RecurrenceLogitsProcessor, VocabIndex
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.visit_types import fit_visit_types, type_logit_bias
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer, code_category

pytestmark = pytest.mark.usefixtures("one_thread")

DIABETES = ["25000", "25002", "25040", "25060"]
HYPERTENSION = ["4019", "4011", "4010"]
ACUTE = ["0389", "5849", "5990", "486", "2762", "78552", "51881", "41071", "4280", "42731"]


def test_prior_counts_recurrence_against_what_the_types_predict(tmp_path):
    """Five visits of one type. Pairs: (25000 -> 25000) and (25002 -> 4019).
    Category 250: in visit t of both pairs (N = 2), back in one: O = 1; E = 2 x P(250 in a visit) = 2 x 3/5.
    Code 25000: its category recurs in its one pair (N = 1), the code too: O = 1;
    E = P(25000 | 250, type) = 2/3. Code 25002: its category does not recur: not counted."""
    patients = [
        {"subject_id": 1, "age": 60.0, "sex": "F", "visits": [["25000"], ["25000"]]},
        {"subject_id": 2, "age": 70.0, "sex": "M", "visits": [["25002"], ["4019"]]},
        {"subject_id": 3, "age": 50.0, "sex": "M", "visits": [["4019"]]},
    ]
    types = [[0, 0], [0, 0], [0]]
    prior = CohortPrior.from_patients(patients, visit_types=types, n_types=1, category=code_category)
    rec = prior.table["visit_types"]["recurrence"]
    assert rec["categories"] == {"250": [1, 1.2, 2]}
    assert rec["codes"] == {"25000": [1, 0.6667, 1]}
    # categories: p = 0.6, p* = (1 + 0.6) / 3; codes: p = 2/3, p* = (1 + 2/3) / 2
    p, target = 0.6, 1.6 / 3
    assert prior.recurrence_log_lift("categories") == pytest.approx(
        {"250": math.log(target * (1 - p) / (p * (1 - target)))})
    p, target = 0.6667, (1 + 0.6667) / 2
    assert prior.recurrence_log_lift("codes") == pytest.approx(
        {"25000": math.log(target * (1 - p) / (p * (1 - target)))})
    again = CohortPrior.load(prior.save(tmp_path))
    assert again.recurrence_log_lift("codes") == prior.recurrence_log_lift("codes")
    # without a category function, or without types, nothing is counted
    assert CohortPrior.from_patients(patients, visit_types=types, n_types=1).recurrence_log_lift("codes") == {}
    assert CohortPrior.from_patients(patients).recurrence_log_lift("codes") == {}


def test_recurrence_rows_boost_the_previous_visit_inside_each_category():
    cohort = [{"subject_id": i + 1, "age": 60.0, "sex": "F", "visits": [[d, h] for d, h in
                                                                         zip(DIABETES, HYPERTENSION * 2)]}
              for i in range(3)]
    tok = PromptEHRTokenizer.from_patients(cohort)
    index = VocabIndex(tok)
    base = index.log_code_prob.expand(2, -1).clone()
    code_lift = torch.zeros(index.size)
    code_lift[tok.convert_tokens_to_ids("25000")] = math.log(4.0)
    cat_lift = torch.zeros(len(index.category_ids) + 1)
    c250 = int(index.category_pos[tok.convert_tokens_to_ids("C:250")])
    cat_lift[c250] = math.log(2.0)
    table, cats = _recurrence_rows(tok, index, [["25000"], []], base, (code_lift * index.generable, cat_lift))
    kids = tok.category_children[tok.convert_tokens_to_ids("C:250")]
    q = base[0].exp()
    j = tok.convert_tokens_to_ids("25000")
    # row 0: 25000 four times as likely (odds), its category still sums to one; row 1 untouched
    assert float(table[0, j].exp()) == pytest.approx(float(4 * q[j] / (4 * q[j] + (1 - q[j]))), rel=1e-5)
    assert float(table[0, kids].exp().sum()) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(table[1], base[1])
    assert cats.shape == (2, len(index.category_ids))
    assert float(cats[0, c250]) == pytest.approx(math.log(2.0))
    assert float(cats[0].abs().sum()) == pytest.approx(math.log(2.0)) and float(cats[1].abs().sum()) == 0.0

    # the processor adds the lift to the category scores at a category step, nothing at a code step
    ids = torch.tensor([[tok.bos_token_id, tok.visit_start_id], [tok.bos_token_id, tok.visit_start_id]])
    scores = torch.zeros(2, index.size)
    out = RecurrenceLogitsProcessor(index, cats)(ids, scores.clone())
    plain = RecurrenceLogitsProcessor(index, torch.zeros_like(cats))(ids, scores.clone())
    c = tok.convert_tokens_to_ids("C:250")
    assert float(out[0, c] - plain[0, c]) == pytest.approx(math.log(2.0))
    out[0, c] = plain[0, c]
    torch.testing.assert_close(out, plain)


@pytest.fixture(scope="module")
def chronic_cohort() -> list[dict]:
    """300 patients, each with its own diabetes and hypertension code in every visit, plus acute codes."""
    rng = np.random.default_rng(0)
    patients = []
    for sid in range(300):
        d, h = DIABETES[sid % 4], HYPERTENSION[(sid // 4) % 3]
        visits = []
        for _ in range(int(rng.choice([2, 3]))):
            acute = list(rng.choice(ACUTE, size=2, replace=False))
            visits.append([d, h, *acute])
        patients.append({"subject_id": sid + 1, "age": float(rng.uniform(40, 85)), "sex": "FM"[sid % 2],
                         "visits": visits})
    return patients


def _repeat_rate(patients) -> float:
    """Share of the codes of a visit t that visit t+1 holds again."""
    kept = total = 0
    for p in patients:
        for a, b in zip(p["visits"][:-1], p["visits"][1:]):
            kept += len(set(a) & set(b))
            total += len(set(a))
    return kept / total


def test_generation_brings_the_previous_visit_back(chronic_cohort, tiny_config):
    """A model that knows nothing of the history (fresh weights, type bias from the mixture) keeps
    the patient's own diabetes and hypertension codes only through the recurrence weights."""
    visits = [p["visits"] for p in chronic_cohort]
    mixture = fit_visit_types([v for vs in visits for v in vs], n_types=3, min_visits=20, seed=0, progress=False)
    types = mixture.assign_patients(visits)
    prior = CohortPrior.from_patients(chronic_cohort, visit_types=types, n_types=mixture.n_types,
                                      category=code_category)
    tok = PromptEHRTokenizer.from_patients(chronic_cohort)
    cfg = PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny_config, max_position_embeddings=128,
                                      cat_cardinalities=[2, mixture.n_types], visit_type_feature_index=1)
    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.visit_type_bias.weight.copy_(torch.from_numpy(type_logit_bias(mixture, tok, cfg.vocab_size)))
    assert recurrence_log_lifts(prior, tok, VocabIndex(tok)) is not None
    kwargs = dict(prior=prior, seed=0, progress=False, stage_two="type")
    on, stats_on = generate_patients(model, tok, 150, **kwargs)
    off, stats_off = generate_patients(model, tok, 150, recurrence=False, **kwargs)
    assert stats_on["recurrence"] and not stats_off["recurrence"]
    assert stats_on["ungrammatical_visits"] == 0 and stats_on["visits_with_duplicate_code"] == 0
    real, with_rec, without = _repeat_rate(chronic_cohort), _repeat_rate(on), _repeat_rate(off)
    assert real == pytest.approx(0.6, abs=0.05)  # the 2 chronic codes, and 2 x 2/10 acute ones by chance
    # without the weights, repeats are near chance (a code drawn anew: about 1 in 4 inside its category)
    assert without < 0.35 and with_rec > without + 0.2, (real, with_rec, without)
