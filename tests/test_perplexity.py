"""Perplexity (lpl, mpl): the per-code scores against the model's own logits, the analytic value
of a uniform model under the visit grammar, the typed marginalisation against a brute-force sum
over type paths, training lowering it, and the report / CLI.

Tiny models; the reference computations here are written independently of the module's batched
ones (one row at a time, full logits, Python sets).
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from promptehr_hf.metrics.perplexity import perplexity
from promptehr_hf.metrics.report import evaluate_cohorts, markdown_table
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.data import PromptEHRDataCollator, build_examples
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer, code_category

pytestmark = pytest.mark.usefixtures("one_thread")

CODES = ["4019", "4011", "25000", "25001", "25060", "42731", "4280", "42832", "5849", "5845", "486", "51881",
         "5990", "2724", "2720", "0389", "99592", "2859", "2851", "41401"]
N_TYPES = 3


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    """60 patients, 1-3 visits of 1-5 codes over 20 codes in 12 categories."""
    rng = np.random.default_rng(0)
    patients = []
    for sid in range(60):
        visits = [[str(c) for c in rng.choice(CODES, size=int(rng.integers(1, 6)), replace=False)]
                  for _ in range(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])))]
        patients.append({"subject_id": sid + 1, "age": float(rng.choice([30.0, 50.0, 70.0])),
                         "sex": "FM"[int(rng.integers(2))], "visits": visits})
    return patients


@pytest.fixture(scope="module")
def tokenizer(cohort):
    return PromptEHRTokenizer.from_patients(cohort)


def _model(tokenizer, tiny_config, types: int = 0, seed: int = 0):
    extra = {"cat_cardinalities": [2, types], "visit_type_feature_index": 1} if types else {}
    cfg = PromptEHRConfig.from_preset("small", tokenizer=tokenizer, **tiny_config, max_position_embeddings=128,
                                      **extra)
    torch.manual_seed(seed)
    model = PromptEHRForConditionalGeneration(cfg).eval()
    if types:  # types that matter: a random per-type bias
        with torch.no_grad():
            model.visit_type_bias.weight.normal_(0.0, 2.0)
    return model


@pytest.fixture(scope="module")
def typed(cohort, tokenizer, tiny_config):
    """A typed tiny model and a prior whose type chain has zeros (not every type reaches every other)."""
    rng = np.random.default_rng(1)
    types = [[int(rng.integers(N_TYPES)) for _ in p["visits"]] for p in cohort]
    for t in types:  # type 2 never follows type 0: a zero in the transition table
        for j in range(1, len(t)):
            if t[j - 1] == 0 and t[j] == 2:
                t[j] = 1
    prior = CohortPrior.from_patients(cohort, visit_types=types, n_types=N_TYPES, category=code_category)
    return _model(tokenizer, tiny_config, types=N_TYPES), prior


# ----------------------------------------------------------------------------- reference
def _pairs(tok, visit):
    ids = tok.encode_visit(visit)[1:-1]
    return list(zip(ids[0::2], ids[1::2]))


def _sequence_logps(model, tok, history, age, sex, m, pairs) -> list[float]:
    """log P(pair j | earlier pairs), one row, from the full logits: a softmax over the categories
    with a code not yet used, then over the category's unused codes."""
    x_cat = [sex] if m is None else [sex, m]
    dec = [model.config.decoder_start_token_id, tok.visit_start_id] + [x for p in pairs for x in p][:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([history]), attention_mask=torch.ones(1, len(history), dtype=torch.long),
                       decoder_input_ids=torch.tensor([dec]), x_num=torch.tensor([[age]]),
                       x_cat=torch.tensor([x_cat])).logits[0].double()
    used, out = set(), []
    for j, (c, k) in enumerate(pairs):
        cats = [cc for cc in tok.category_ids if set(tok.category_children[cc]) - used]
        kids = [kk for kk in tok.category_children[c] if kk not in used]
        out.append(float(torch.log_softmax(logits[1 + 2 * j, cats], 0)[cats.index(c)]
                         + torch.log_softmax(logits[2 + 2 * j, kids], 0)[kids.index(k)]))
        used.add(k)
    return out


def _uniform_logps(tok, pairs) -> list[float]:
    """The same under uniform logits: -log(open categories) - log(open codes of the category)."""
    used, out = set(), []
    for c, k in pairs:
        n_cats = sum(1 for cc in tok.category_ids if set(tok.category_children[cc]) - used)
        n_kids = sum(1 for kk in tok.category_children[c] if kk not in used)
        out.append(-math.log(n_cats) - math.log(n_kids))
        used.add(k)
    return out


# ----------------------------------------------------------------------------- tests
def test_scores_are_the_models_grammar_normalised_probabilities(cohort, tokenizer, tiny_config, typed):
    """lpl of an untyped model = the per-pair log-probabilities of the full logits, summed."""
    model = _model(tokenizer, tiny_config)
    patients = cohort[:12]
    res = perplexity(model, tokenizer, patients, max_patients=None, progress=False)
    ref_l, ref_m = [], []
    for p in patients:
        sex = "FM".index(p["sex"])
        for t, visit in enumerate(p["visits"]):
            hist, prs = tokenizer.encode_history(p["visits"][:t], 256), _pairs(tokenizer, visit)
            ref_l += _sequence_logps(model, tokenizer, hist, p["age"], sex, None, prs)
            ref_m += [_sequence_logps(model, tokenizer, hist, p["age"], sex, None, prs[:j] + prs[j + 1:] + [prs[j]])[-1]
                      for j in range(len(prs))]
    assert res["n_codes"] == len(ref_l) == sum(len(v) for p in patients for v in p["visits"])
    assert res["lpl_nll"] == pytest.approx(-sum(ref_l), rel=1e-5)
    assert res["mpl_nll"] == pytest.approx(-sum(ref_m), rel=1e-5)
    assert res["lpl"] == pytest.approx(math.exp(-np.mean(ref_l)), rel=1e-5)
    assert res["lpl_median"] == pytest.approx(float(np.median(np.exp(-np.array(ref_l)))), rel=1e-5)
    assert 1.0 <= res["lpl"] < math.inf and 1.0 <= res["mpl"] < math.inf


@pytest.mark.parametrize("types", [0, N_TYPES])
def test_uniform_logits_give_the_grammars_count(cohort, tokenizer, tiny_config, typed, types):
    """Zero output weights (tied to the embeddings) and bias: every allowed token is equally likely,
    so a code's probability is 1 / (open categories x open codes of its category), whatever the
    types; the perplexity is that count's geometric mean, not the vocabulary size."""
    model = _model(tokenizer, tiny_config, types=types)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
        if types:
            model.visit_type_bias.weight.zero_()
    assert not model.lm_head.weight.detach().any()
    res = perplexity(model, tokenizer, cohort, typed[1] if types else None, max_patients=None, lpl_types=None,
                     mpl_types=N_TYPES, mpl_mass=1.0, progress=False)
    lpl = [x for p in cohort for v in p["visits"] for x in _uniform_logps(tokenizer, _pairs(tokenizer, v))]
    mpl = [_uniform_logps(tokenizer, prs[:j] + prs[j + 1:] + [prs[j]])[-1]
           for p in cohort for v in p["visits"] for prs in [_pairs(tokenizer, v)] for j in range(len(prs))]
    # (the logits are softmaxed in float32)
    assert res["lpl"] == pytest.approx(math.exp(-np.mean(lpl)), rel=1e-6)
    assert res["mpl"] == pytest.approx(math.exp(-np.mean(mpl)), rel=1e-6)
    # a visit's first code: 1 / (categories x codes of its category) exactly
    first = _pairs(tokenizer, cohort[0]["visits"][0])[0]
    assert _uniform_logps(tokenizer, [first])[0] == -math.log(len(tokenizer.category_ids)
                                                              * len(tokenizer.category_children[first[0]]))


def test_type_chain_is_the_priors_normalised_counts(cohort, typed):
    prior = typed[1]
    transition = prior.transition_probs()
    table = prior.table["visit_types"]
    for p in cohort[:40]:
        band, k = int(prior.age_band([p["age"]])[0]), min(len(p["visits"]), 3)
        cell = table["first_by_visits"][str(band)][str(k)]
        counts = np.array([cell.get(str(m), 0) for m in range(N_TYPES)], dtype=float)
        np.testing.assert_allclose(prior.first_type_probs([p["age"]], [len(p["visits"])])[0], counts / counts.sum())
    for m, cell in table["transition"].items():
        counts = np.array([cell.get(str(k), 0) for k in range(N_TYPES)], dtype=float)
        np.testing.assert_allclose(transition[int(m)], counts / counts.sum())
    assert transition[0, 2] == 0.0  # the fixture's forbidden transition


def test_typed_marginalisation_equals_the_brute_force_sum(cohort, tokenizer, typed):
    """lpl: log P(all visits) = log sum over every type path of P(path) x P(codes | path); mpl: the
    leave-one-out conditional with the visit's type weighted by P(type | earlier visits)."""
    model, prior = typed
    transition = prior.transition_probs()
    patients = [p for p in cohort if len(p["visits"]) >= 2][:5]
    res = perplexity(model, tokenizer, patients, prior, max_patients=None, lpl_types=None, mpl_types=N_TYPES,
                     mpl_mass=1.0, progress=False)
    lpl_total = mpl_total = 0.0
    for p in patients:
        sex, first = "FM".index(p["sex"]), prior.first_type_probs([p["age"]], [len(p["visits"])])[0]
        hists = [tokenizer.encode_history(p["visits"][:t], 256) for t in range(len(p["visits"]))]
        prs = [_pairs(tokenizer, v) for v in p["visits"]]
        emit = {(t, m): sum(_sequence_logps(model, tokenizer, hists[t], p["age"], sex, m, prs[t]))
                for t in range(len(prs)) for m in range(N_TYPES)}

        def chain(path, first=first):
            return first[path[0]] * np.prod([transition[a, b] for a, b in zip(path, path[1:])])

        T = len(prs)
        lpl_total += math.log(sum(chain(path) * math.exp(sum(emit[t, m] for t, m in enumerate(path)))
                                  for path in itertools.product(range(N_TYPES), repeat=T)))
        for t in range(T):  # P(type of visit t | visits before t), by brute force
            w = np.zeros(N_TYPES)
            for path in itertools.product(range(N_TYPES), repeat=t + 1):
                w[path[-1]] += chain(path) * math.exp(sum(emit[s, m] for s, m in enumerate(path[:-1])))
            w /= w.sum()
            for j in range(len(prs[t])):
                order = prs[t][:j] + prs[t][j + 1:] + [prs[t][j]]
                lp = [_sequence_logps(model, tokenizer, hists[t], p["age"], sex, m, order) for m in range(N_TYPES)]
                num = sum(w[m] * math.exp(sum(lp[m])) for m in range(N_TYPES))
                den = sum(w[m] * math.exp(sum(lp[m][:-1])) for m in range(N_TYPES))
                mpl_total += math.log(num / den)
    assert res["n_types"] == N_TYPES
    assert res["lpl_nll"] == pytest.approx(-lpl_total, rel=1e-6)
    assert res["mpl_nll"] == pytest.approx(-mpl_total, rel=1e-6)
    # fewer types per visit: the left-out types count as probability 0, an upper bound of lpl
    pruned = perplexity(model, tokenizer, patients, prior, max_patients=None, lpl_types=1, mpl_types=1,
                        progress=False)
    assert pruned["lpl_nll"] > res["lpl_nll"]


def test_typed_model_needs_its_prior(cohort, tokenizer, typed):
    with pytest.raises(ValueError, match="cohort prior"):
        perplexity(typed[0], tokenizer, cohort[:3], None, progress=False)


def test_training_lowers_perplexity_and_the_sample_is_capped(cohort, tokenizer, tiny_config):
    """A model trained to memorise 16 patients scores them far better than before training."""
    patients = cohort[:16]
    model = _model(tokenizer, tiny_config)
    before = perplexity(model, tokenizer, patients, max_patients=None, progress=False)
    collate = PromptEHRDataCollator(tokenizer, noise=False)
    examples = build_examples(patients).to_list()
    batch = collate(examples)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    after = perplexity(model, tokenizer, patients, max_patients=None, progress=False)
    assert 1.0 <= after["lpl"] < before["lpl"] / 2
    assert 1.0 <= after["mpl"] < before["mpl"] / 2
    capped = perplexity(model, tokenizer, cohort, max_patients=5, progress=False, seed=3)
    assert capped["n_patients"] == 5 and capped["n_visits"] >= 5


def test_unknown_categories_are_counted_not_scored(cohort, tokenizer, tiny_config):
    model = _model(tokenizer, tiny_config)
    base = perplexity(model, tokenizer, cohort[:4], max_patients=None, progress=False)
    # category V99 is unknown; in the last visits only, so that no history changes
    odd = [dict(p, visits=p["visits"][:-1] + [p["visits"][-1] + ["V9999"]]) for p in cohort[:4]]
    res = perplexity(model, tokenizer, odd, max_patients=None, progress=False)
    assert res["n_unscored_codes"] == 4
    assert (res["n_codes"], res["lpl_nll"]) == (base["n_codes"], pytest.approx(base["lpl_nll"], rel=1e-6))


def test_report_section_and_cli_option(cohort, tokenizer, tiny_config, typed, tmp_path):
    import datasets

    from promptehr_hf.cli import main

    model, prior = typed
    res = perplexity(model, tokenizer, cohort, prior, max_patients=10, progress=False)
    result = evaluate_cohorts(cohort[:30], cohort[30:], plots=False, utility=False, perplexity=res)
    table = markdown_table(result)
    assert "## Perplexity" in table and f"| longitudinal perplexity (lpl) | {res['lpl']:.4g} | lower |" in table
    assert result["perplexity"] is res and "perplexity" in result["meta"]

    model_dir, data = tmp_path / "model", tmp_path / "data"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prior.save(model_dir)
    data.mkdir()
    datasets.Dataset.from_list(cohort[30:]).to_parquet(str(data / "test.parquet"))
    datasets.Dataset.from_list(cohort[:30]).to_parquet(str(data / "synthetic.parquet"))
    out = tmp_path / "report"
    assert main(["evaluate", "--real", str(data / "test.parquet"), "--synthetic", str(data / "synthetic.parquet"),
                 "--out", str(out), "--no-plots", "--model", str(model_dir), "--perplexity-patients", "10"]) == 0
    saved = json.loads((out / "metrics.json").read_text())["perplexity"]
    assert saved["n_patients"] == 10 and saved["n_types"] == N_TYPES and saved["lpl"] >= 1.0
    assert "## Perplexity" in (out / "metrics.md").read_text()
    assert main(["evaluate", "--real", str(data / "test.parquet"), "--synthetic", str(data / "synthetic.parquet"),
                 "--out", str(model_dir / "r"), "--model", str(model_dir)]) == 2  # output inside an input


def test_mpl_leaves_out_a_weighted_subset_of_long_visits(cohort, tokenizer, tiny_config):
    """With at most 2 codes left out per visit, mpl weighs each by (visit's codes / 2): its total
    estimates the full one; with a cap above every visit's length it is the full figure."""
    model = _model(tokenizer, tiny_config)
    patients = cohort[:30]
    full = perplexity(model, tokenizer, patients, max_patients=None, progress=False, mpl_codes=None)
    above = perplexity(model, tokenizer, patients, max_patients=None, progress=False, mpl_codes=5)
    capped = perplexity(model, tokenizer, patients, max_patients=None, progress=False, mpl_codes=2)
    assert above["mpl"] == full["mpl"] and above["mpl_codes_left_out"] == full["n_codes"]
    lengths = [len(v) for p in patients for v in p["visits"]]
    assert capped["mpl_codes_left_out"] == sum(min(n, 2) for n in lengths) < full["n_codes"]
    assert capped["lpl"] == full["lpl"]  # lpl scores every code
    assert capped["mpl"] == pytest.approx(full["mpl"], rel=0.1)
