"""Visit types: the Bernoulli mixture, the prior's type chain, the collator and generation under types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptehr_hf.datasets_scripts.schema import NO_TIMES
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.patients import type_code_log_probs
from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.processors import StageTwoLogitsProcessor, VocabIndex
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.data import PromptEHRDataCollator, build_examples
from promptehr_hf.modeling_promptehr.training.pipeline import type_visit_modalities
from promptehr_hf.modeling_promptehr.training.visit_types import auto_types, fit_visit_types, type_logit_bias
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer, merge_visits

pytestmark = pytest.mark.usefixtures("one_thread")

# Two admission templates that share no code, plus codes both can carry.
SEPSIS = ["0389", "99592", "78552", "5849", "2762"]
CARDIAC = ["41401", "4280", "42731", "5845", "2724"]  # 5845 shares category 584 with sepsis' 5849
SHARED = ["4019", "25000", "5990"]


def _visit(template: list[str], rng) -> list[str]:
    """Most of a template's codes, plus one shared code half the time (in a random order)."""
    kept = [c for c in template if rng.random() < 0.85] or template[:1]
    if rng.random() < 0.5:
        kept.append(SHARED[int(rng.integers(len(SHARED)))])
    return [kept[i] for i in rng.permutation(len(kept))]


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    """400 adults: a sepsis visit is always followed by a cardiac one and vice versa."""
    rng = np.random.default_rng(0)
    patients = []
    for sid in range(400):
        first = int(rng.integers(2))
        n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        visits = [_visit((SEPSIS, CARDIAC)[(first + t) % 2], rng) for t in range(n)]
        # Full schema dicts (time fields null): build_examples builds its Dataset with PATIENT_FEATURES.
        patients.append({"subject_id": sid + 1, "age": float(rng.uniform(40, 85)), "sex": "FM"[sid % 2],
                         "visits": visits, **NO_TIMES})
    return patients


@pytest.fixture(scope="module")
def mixture(cohort):
    return fit_visit_types([v for p in cohort for v in p["visits"]], n_types=6, min_visits=20, seed=0,
                           progress=False)


def test_mixture_separates_the_templates(cohort, mixture):
    visits = [v for p in cohort for v in p["visits"]]
    types = mixture.assign(visits)
    is_sepsis = np.array([bool(set(v) & set(SEPSIS)) for v in visits])
    # every type holds visits of one template only
    for m in np.unique(types):
        assert len(set(is_sepsis[types == m])) == 1
    # P(code | type) is high for the type's own template, low for the other's
    sepsis_type = int(types[is_sepsis][0])
    theta = dict(zip(mixture.codes, mixture.theta[sepsis_type]))
    assert min(theta[c] for c in SEPSIS) > 0.6
    assert max(theta[c] for c in CARDIAC) < 0.05
    assert np.isclose(mixture.weights.sum(), 1.0)


def test_mixture_is_deterministic_and_prunes_small_types(cohort, mixture):
    visits = [v for p in cohort for v in p["visits"]]
    again = fit_visit_types(visits, n_types=6, min_visits=20, seed=0, progress=False)
    np.testing.assert_array_equal(again.theta, mixture.theta)
    # 6 asked, but 600-odd visits over two templates cannot keep 6 types of 200+ visits each
    big = fit_visit_types(visits, n_types=6, min_visits=200, seed=0, progress=False)
    assert big.n_types < 6
    assert (np.bincount(big.assign(visits), minlength=big.n_types) > 0).all()
    with pytest.raises(ValueError):
        fit_visit_types([[], []], n_types=2, progress=False)


def test_prior_type_chain_follows_the_training_transitions(cohort, mixture):
    types = mixture.assign_patients([p["visits"] for p in cohort])
    prior = CohortPrior.from_patients(cohort, visit_types=types, n_types=mixture.n_types)
    sepsis_types = {t for p, ts in zip(cohort, types) for v, t in zip(p["visits"], ts) if set(v) & set(SEPSIS)}
    rng = np.random.default_rng(1)
    ages = np.full(500, 60.0)
    drawn = prior.sample_visit_types(ages, np.full(500, 3), rng)
    assert all(len(d) == 3 for d in drawn)
    # the training chain alternates templates: so must the drawn one
    for d in drawn:
        kinds = [int(t) in sepsis_types for t in d]
        assert kinds[0] != kinds[1] and kinds[1] != kinds[2]
    # visit lengths given the type stay within the type's training lengths
    lengths = prior.sample_codes_per_visit_by_type(np.concatenate(drawn), np.tile(np.arange(3), 500), rng)
    assert lengths.min() >= 1 and lengths.max() <= 6
    # the table survives a save / load round trip
    reloaded = CohortPrior(prior.table)
    assert reloaded.n_types == mixture.n_types
    with pytest.raises(ValueError, match="one type per visit"):
        CohortPrior.from_patients(cohort, visit_types=types[:-1], n_types=mixture.n_types)


def test_collator_appends_the_visit_type_to_x_cat(cohort, mixture):
    types = mixture.assign_patients([p["visits"] for p in cohort])
    tok = PromptEHRTokenizer.from_patients(cohort)
    examples = build_examples(cohort[:20], visit_types=types[:20])
    want = [t for ts in types[:20] for t in ts]
    assert examples["visit_type"] == want
    batch = PromptEHRDataCollator(tok, visit_types=True)(examples.select(range(8)).to_list())
    assert batch["x_cat"].shape == (8, 2)
    assert batch["x_cat"][:, 1].tolist() == want[:8]
    plain = PromptEHRDataCollator(tok)(build_examples(cohort[:4]).to_list())
    assert plain["x_cat"].shape[1] == 1
    with pytest.raises(ValueError, match="visit_type"):
        PromptEHRDataCollator(tok, visit_types=True)(build_examples(cohort[:4]).to_list())


def test_generation_writes_each_visit_under_its_drawn_type(cohort, mixture, tiny_config):
    """The model sees [sex, type] with the type drawn from the prior's chain: a model whose type
    prompt decides the visit must reproduce the chain's alternation."""
    types = mixture.assign_patients([p["visits"] for p in cohort])
    prior = CohortPrior.from_patients(cohort, visit_types=types, n_types=mixture.n_types)
    tok = PromptEHRTokenizer.from_patients(cohort)
    cfg = PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny_config, max_position_embeddings=128,
                                      cat_cardinalities=[2, mixture.n_types], visit_type_feature_index=1)
    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(cfg).eval()
    seen = []
    hook = model.get_encoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["x_cat"].clone()), with_kwargs=True)
    try:
        patients, stats = generate_patients(model, tok, 30, prior=prior, seed=0, progress=False)
    finally:
        hook.remove()
    assert len(patients) == 30 and stats["ungrammatical_visits"] == 0
    x_cat = torch.cat(seen)
    assert x_cat.shape[1] == 2
    assert set(x_cat[:, 1].tolist()) <= set(range(mixture.n_types))
    # one encoder row per generated visit, each under a type of the chain
    assert len(x_cat) == sum(len(p["visits"]) for p in patients)
    again, _ = generate_patients(model, tok, 30, prior=prior, seed=0, progress=False)
    assert again.to_list() == patients.to_list()
    with pytest.raises(ValueError, match="no visit types"):
        generate_patients(model, tok, 5, prior=CohortPrior.from_patients(cohort), seed=0, progress=False)


def test_config_rejects_a_bad_type_column(tiny_config):
    with pytest.raises(ValueError, match="visit_type_feature_index"):
        PromptEHRConfig(**tiny_config, cat_cardinalities=[2, 4], visit_type_feature_index=0)
    with pytest.raises(ValueError, match="visit_type_feature_index"):
        PromptEHRConfig(**tiny_config, cat_cardinalities=[2], visit_type_feature_index=1)


def test_type_bias_starts_from_the_mixture_and_moves_the_logits(cohort, mixture, tiny_config):
    types = mixture.assign_patients([p["visits"] for p in cohort])
    tok = PromptEHRTokenizer.from_patients(cohort)
    cfg = PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny_config, max_position_embeddings=128,
                                      cat_cardinalities=[2, mixture.n_types], visit_type_feature_index=1)
    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(cfg).eval()
    assert torch.count_nonzero(model.visit_type_bias.weight) == 0  # a fresh model: no bias
    bias = type_logit_bias(mixture, tok, cfg.vocab_size)
    assert bias.shape == (mixture.n_types, cfg.vocab_size)
    sepsis = next(t for p, ts in zip(cohort, types) for v, t in zip(p["visits"], ts) if set(v) & set(SEPSIS))
    ids = tok.convert_tokens_to_ids
    # the sepsis type favours sepsis categories over cardiac ones by orders of magnitude
    assert bias[sepsis, ids("C:038")] > np.log(0.6) and bias[sepsis, ids("C:414")] < np.log(0.05)
    # a code alone in its category is certain given the category
    assert abs(bias[sepsis, ids("99592")]) < 1e-6
    with torch.no_grad():
        model.visit_type_bias.weight.copy_(torch.from_numpy(bias))
    batch = {"input_ids": torch.tensor([[tok.bos_token_id, tok.eos_token_id]] * 2),
             "decoder_input_ids": torch.tensor([[tok.bos_token_id, tok.visit_start_id]] * 2),
             "x_num": torch.tensor([[60.0], [60.0]]), "x_cat": torch.tensor([[0, sepsis], [0, 1 - sepsis % 2]])}
    with torch.no_grad():
        with_bias = model(**batch).logits[:, -1]
        model.visit_type_bias.weight.zero_()
        without = model(**batch).logits[:, -1]
    torch.testing.assert_close(with_bias - without, torch.from_numpy(bias)[batch["x_cat"][:, 1]])
    with pytest.raises(ValueError, match="x_cat"):
        model(**{**batch, "x_cat": None})


def test_type_stage_two_table_and_processor(cohort, mixture):
    types = mixture.assign_patients([p["visits"] for p in cohort])
    prior = CohortPrior.from_patients(cohort, visit_types=types, n_types=mixture.n_types)
    tok = PromptEHRTokenizer.from_patients(cohort)
    index = VocabIndex(tok)
    table = type_code_log_probs(prior, tok, index)
    assert table.shape == (mixture.n_types, len(tok))
    # each type's P(code | category) sums to one over every category's generable codes
    probs = table.double().exp()
    for kids in tok.category_children.values():
        np.testing.assert_allclose(probs[:, kids].sum(1).numpy(), 1.0, rtol=1e-6)
    assert torch.isinf(table[:, ~index.generable]).all()
    # inside category 584, the sepsis type writes 5849 and the cardiac type 5845
    sepsis = next(t for p, ts in zip(cohort, types) for v, t in zip(p["visits"], ts) if set(v) & set(SEPSIS))
    cardiac = next(t for p, ts in zip(cohort, types) for v, t in zip(p["visits"], ts) if set(v) & set(CARDIAC))
    code = tok.convert_tokens_to_ids("5849")
    assert table[sepsis, code].exp() > 0.9 and table[cardiac, code].exp() < 0.1

    # The processor with every row's table equal to the type-blind P(code | category) is the
    # empirical stage two, at code steps and at category steps.
    torch.manual_seed(0)
    ids = torch.tensor([[tok.bos_token_id, tok.visit_start_id, tok.convert_tokens_to_ids("C:276")],
                        [tok.bos_token_id, tok.visit_start_id, tok.visit_start_id]])
    scores = torch.randn(2, len(tok))
    blind = StageTwoLogitsProcessor(index, "empirical")(ids, scores.clone())
    same = StageTwoLogitsProcessor(index, "type", code_log_probs=index.log_code_prob.expand(2, -1))(ids, scores.clone())
    torch.testing.assert_close(same, blind)
    typed = StageTwoLogitsProcessor(index, "type", code_log_probs=table[[sepsis, cardiac]])(ids, scores.clone())
    kids = tok.category_children[tok.convert_tokens_to_ids("C:276")]
    torch.testing.assert_close(typed[0, kids], table[sepsis, kids])
    with pytest.raises(ValueError, match="code_log_probs"):
        StageTwoLogitsProcessor(index, "type")


def test_type_stage_two_needs_a_typed_model(cohort, tiny_config):
    tok = PromptEHRTokenizer.from_patients(cohort)
    cfg = PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny_config, max_position_embeddings=128)
    model = PromptEHRForConditionalGeneration(cfg).eval()
    with pytest.raises(ValueError, match="visit types"):
        generate_patients(model, tok, 5, prior=CohortPrior.from_patients(cohort), stage_two="type", progress=False)


def test_auto_types_scale_with_the_training_visits():
    assert [auto_types(n) for n in (10, 5_000, 12_445, 44_000, 10**6)] == [32, 64, 128, 256, 256]


def _one_type_cohort():
    """One visit type; returning patients' first visits are of a second type, and every type's later
    visits are longer than its first ones (as chronic patients' are)."""
    patients, types = [], []
    for i in range(300):
        n = 1 + i % 3  # 1, 2 or 3 visits
        first_type = 0 if n == 1 else 1
        visits = [["4019"] * 1 if n == 1 else ["25000", "4019"]] + [["25000", "4019", "5849", "2724"]] * (n - 1)
        patients.append({"subject_id": i, "age": 60.0, "sex": "F", "visits": [list(dict.fromkeys(v)) for v in visits]})
        types.append([first_type] + [1] * (n - 1))
    return patients, types


def test_prior_draws_first_types_given_visit_count_and_lengths_given_index():
    patients, types = _one_type_cohort()
    prior = CohortPrior.from_patients(patients, visit_types=types, n_types=2)
    rng = np.random.default_rng(0)
    n_visits = np.tile([1, 2, 3], 400)
    drawn = prior.sample_visit_types(np.full(len(n_visits), 60.0), n_visits, rng)
    first = np.array([d[0] for d in drawn])
    # single-visit patients start in type 0, returning ones in type 1: as in training
    assert (first[n_visits == 1] == 0).all() and (first[n_visits > 1] == 1).all()
    flat = np.concatenate(drawn)
    index = np.concatenate([np.arange(k) for k in n_visits])
    lengths = prior.sample_codes_per_visit_by_type(flat, index, rng)
    # type 1 holds 2 codes at a first visit and 4 at a later one
    assert (lengths[(flat == 1) & (index == 0)] == 2).all() and (lengths[index > 0] == 4).all()
    # a prior counted before these tables existed falls back to the band and the type alone
    old = {**prior.table, "visit_types": {k: v for k, v in prior.table["visit_types"].items()
                                          if k not in ("first_by_visits", "codes_per_visit_by_index")}}
    again = CohortPrior(old).sample_visit_types(np.full(3000, 60.0), np.full(3000, 1), rng)
    assert 0 < np.mean([d[0] == 1 for d in again]) < 1


def test_types_over_every_modality_separate_stays_the_diagnoses_cannot():
    """Bypass and stent stays share their diagnoses and differ in their procedures: types fitted on
    the diagnoses alone mix them, types fitted on every modality (the default) keep them apart,
    and the model's type bias then starts from each kind of stay's procedures."""
    rng = np.random.default_rng(0)
    bypass, stent = ["3615", "3961", "3612"], ["3606", "0066", "0045"]
    patients = []
    for sid in range(300):
        kind = sid % 2
        dx = [c for c in ["41401", "4019", "2724", "25000"] if rng.random() < 0.8] or ["41401"]
        px = [c for c in (bypass, stent)[kind] if rng.random() < 0.9] or (bypass, stent)[kind][:1]
        patients.append({"subject_id": sid + 1, "age": 65.0, "sex": "M", "visits": [dx], "procedures": [px]})
    modalities = ("diagnoses", "procedures")
    tok = PromptEHRTokenizer.from_patients(patients, modalities=modalities)
    is_bypass = np.arange(300) % 2 == 0

    def purity(type_modalities: tuple[str, ...]) -> tuple[float, object]:
        visits = [merge_visits(p, type_modalities)[0] for p in patients]
        mixture = fit_visit_types(visits, n_types=4, min_visits=20, seed=0, progress=False)
        types = mixture.assign(visits)
        # the share of visits whose type holds mostly their own kind of stay
        major = {m: is_bypass[types == m].mean() >= 0.5 for m in np.unique(types)}
        return float(np.mean([major[m] == b for m, b in zip(types, is_bypass)])), mixture

    assert type_visit_modalities("all", modalities) == modalities
    assert type_visit_modalities("diagnoses", modalities) == ("diagnoses",)
    with pytest.raises(ValueError, match="visit-type-modalities"):
        type_visit_modalities("procedures", modalities)
    dx_only, _ = purity(("diagnoses",))
    every, mixture = purity(modalities)
    assert dx_only < 0.7 and every > 0.95
    bias = type_logit_bias(mixture, tok)
    types = mixture.assign([merge_visits(p, modalities)[0] for p in patients[:2]])  # a bypass, a stent
    code = tok.convert_tokens_to_ids("PX:3615")
    assert bias[types[0], code] > bias[types[1], code] + 2
