"""Procedures and medications as code types: tokenizer, model, prior, loss and generation.

A random-init tiny model is enough for the generation checks: the grammar writes every visit in
modality order and to its per-modality targets whatever the model's scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.config import promptehr_generation_config
from promptehr_hf.modeling_promptehr.generation.patients import sample_patients
from promptehr_hf.modeling_promptehr.generation.pipeline import cms_edits, generate_patients
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.processors import VocabIndex, check_visits
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.data import PromptEHRDataCollator
from promptehr_hf.modeling_promptehr.training.losses import (
    CooccurrenceLoss,
    category_cooccurrence,
    tokenizer_categories,
)
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer, merge_visits, split_visit

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("diagnoses", "procedures", "medications")
TINY = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
            prompt_hidden_size=8)


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    return simulate(150, seed=3)


@pytest.fixture(scope="module")
def tokenizer(cohort) -> PromptEHRTokenizer:
    return PromptEHRTokenizer.from_patients(cohort, modalities=ALL)


@pytest.fixture(scope="module")
def prior(cohort) -> CohortPrior:
    return CohortPrior.from_patients(cohort, modalities=ALL)


@pytest.fixture(scope="module")
def model(tokenizer) -> PromptEHRForConditionalGeneration:
    torch.manual_seed(0)
    return PromptEHRForConditionalGeneration(PromptEHRConfig.from_preset("small", tokenizer=tokenizer, **TINY)).eval()


def _counts(tokenizer, visit_tokens) -> list[int]:
    return np.bincount([tokenizer.modality_rank(c) for c in visit_tokens], minlength=3).tolist()


# ----------------------------------------------------------------------------------- tokenizer
def test_modality_tokens_never_collide_with_diagnoses():
    # ICD-9-CM procedure 40.1 is "401", like the hypertension category.
    patients = [{"visits": [["4019", "401"]], "procedures": [["401", "4011"]], "medications": [["ASPIRIN//ASA81"]]}]
    tok = PromptEHRTokenizer.from_patients(patients, modalities=ALL)
    vocab = tok.get_vocab()
    assert {"401", "4019", "C:401", "PX:401", "PX:4011", "C:PX:40", "RX:ASPIRIN//ASA81", "C:RX:ASPIRIN"} <= set(vocab)
    ids = tok.encode_visit(merge_visits(patients[0], ALL)[0])
    assert tok.convert_ids_to_tokens(ids) == ["<v>", "C:401", "4019", "C:401", "401", "C:PX:40", "PX:401",
                                              "C:PX:40", "PX:4011", "C:RX:ASPIRIN", "RX:ASPIRIN//ASA81", "</v>"]
    assert tok.fallback_counts == {"category": 0, "unk": 0}
    # An unseen procedure of a known category folds into its catch-all, as a diagnosis does.
    assert tok.convert_ids_to_tokens(tok.encode_visit(["PX:4099"]))[1:3] == ["C:PX:40", "PX:40"]
    assert tok.fallback_counts["category"] == 1


def test_modalities_are_contiguous_code_types_and_written_in_order(tokenizer):
    ranges = tokenizer.code_type_ranges()
    assert [r[2] for r in ranges] == [1, 2, 3, 1, 2, 3]  # categories by modality, then codes by modality
    assert ranges[0][0] == min(tokenizer.category_ids) and ranges[-1][1] == len(tokenizer)
    for lo, hi, kind in ranges:
        for i in range(lo, hi):
            token = tokenizer.convert_ids_to_tokens(i).removeprefix("C:")
            assert tokenizer.modality_rank(token) == kind - 1
    # Whatever order they come in, a visit is written diagnoses, procedures, medications.
    ids = tokenizer.encode_visit(["RX:HEPARIN//HEP5", "PX:3893", "4019"])
    codes = [t for t in tokenizer.convert_ids_to_tokens(ids) if t in tokenizer.code_counts]
    assert [tokenizer.modality_rank(c) for c in codes] == sorted(tokenizer.modality_rank(c) for c in codes)


def test_merge_and_split_are_inverse(cohort):
    for patient in cohort[:20]:
        merged = merge_visits(patient, ALL)
        parts = [split_visit(v) for v in merged]
        assert [p["visits"] for p in parts] == patient["visits"]
        assert [p["procedures"] for p in parts] == patient["procedures"]
        assert [p["medications"] for p in parts] == patient["medications"]
    assert split_visit(["RX:ASPIRIN"])["medications"] == ["ASPIRIN//UNK"]  # a catch-all keeps the code form


def test_diagnosis_only_tokenizer_ignores_other_modalities(cohort, tmp_path):
    bare = [{k: v for k, v in p.items() if k not in ("procedures", "medications")} for p in cohort]
    assert PromptEHRTokenizer.from_patients(cohort).get_vocab() == PromptEHRTokenizer.from_patients(bare).get_vocab()
    tok = PromptEHRTokenizer.from_patients(cohort, modalities=ALL)
    tok.save_pretrained(tmp_path)
    again = PromptEHRTokenizer.from_pretrained(tmp_path)
    assert again.modalities == ALL and again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="modalities"):
        PromptEHRTokenizer.from_patients(cohort, modalities=("procedures",))


# ---------------------------------------------------------------------------------------- model
def test_code_type_embedding_is_added_and_saved(tokenizer, model, tmp_path):
    assert PromptEHRConfig.from_preset("small", tokenizer=PromptEHRTokenizer.from_patients(
        [{"visits": [["4019"]]}])).code_type_ranges is None  # a diagnosis-only model has none
    token_type = model.model.encoder.code_types.token_type
    px = tokenizer.convert_tokens_to_ids("C:PX:38")
    assert int(token_type[px]) == 2 and int(token_type[tokenizer.visit_start_id]) == 0
    ids = torch.tensor([[tokenizer.bos_token_id, tokenizer.visit_start_id, px, tokenizer.eos_token_id]])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), x_num=torch.tensor([[60.0]]),
                  x_cat=torch.tensor([[1]]), decoder_input_ids=ids[:, :2])
    with torch.no_grad():
        before = model(**kwargs).logits
        saved = model.model.encoder.code_types.embed.weight.clone()
        # move the procedure type only (not by a constant, which the embedding LayerNorm removes)
        model.model.encoder.code_types.embed.weight[2] += torch.linspace(-1, 1, 32)
        after = model(**kwargs).logits
        model.model.encoder.code_types.embed.weight.copy_(saved)
    assert not torch.allclose(before, after)
    model.save_pretrained(tmp_path)
    loaded = PromptEHRForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.decoder.code_types.token_type, token_type)
    assert torch.equal(loaded.model.decoder.code_types.embed.weight, model.model.decoder.code_types.embed.weight)


# ------------------------------------------------------------------------------ prior and data
def test_prior_draws_modality_counts_given_type_and_diagnoses():
    # Procedures = diagnoses count, medications = 2 x: the draw must keep the dependence.
    patients = [{"subject_id": i, "age": 50.0, "sex": "F", "visits": [[f"{400 + j}" for j in range(k)]],
                 "procedures": [[f"{30 + j}" for j in range(k)]], "medications": [[f"D{j}//F" for j in range(2 * k)]]}
                for i, k in enumerate([1, 2, 3] * 20)]
    prior = CohortPrior.from_patients(patients, modalities=ALL)
    assert prior.modalities == ALL
    drawn = prior.sample_modality_lengths(None, [1, 2, 3, 2], np.random.default_rng(0))
    assert drawn.tolist() == [[1, 2], [2, 4], [3, 6], [2, 4]]
    again = CohortPrior(prior.table)  # the JSON table reads back
    assert again.sample_modality_lengths(None, [3], np.random.default_rng(1)).tolist() == [[3, 6]]
    with pytest.raises(ValueError, match="diagnoses only"):
        CohortPrior.from_patients(patients).sample_modality_lengths(None, [1], np.random.default_rng(0))


def test_collator_keeps_modality_blocks_when_shuffling(tokenizer, cohort):
    collator = PromptEHRDataCollator(tokenizer, code_order="shuffle", max_target_length=400, noise=False)
    features = [{"subject_id": p["subject_id"], "age": p["age"], "sex": p["sex"], "visits": merge_visits(p, ALL)}
                for p in cohort[:8]]
    labels = collator(features)["labels"]
    for row, feature in zip(labels.tolist(), features):
        codes = [t for t in tokenizer.convert_ids_to_tokens([i for i in row if i >= 0]) if t in tokenizer.code_counts]
        ranks = [tokenizer.modality_rank(c) for c in codes]
        assert ranks == sorted(ranks) and sorted(codes) == sorted(set(feature["visits"][-1]))


def test_cooccurrence_counts_cross_modality_pairs_and_the_ablation_drops_them(cohort, tokenizer):
    merged = [{"visits": merge_visits(p, ALL)} for p in cohort]
    cats, ids = tokenizer_categories(tokenizer)
    counts = category_cooccurrence(merged, cats, category=tokenizer.category_of)
    modality = np.array([tokenizer.modality_rank(c) for c in cats])
    cross = modality[:, None] != modality[None, :]
    assert counts[cross].sum() > 0
    patient, t = next((p, t) for p in cohort for t, v in enumerate(p["procedures"]) if v)
    k = cats.index(tokenizer.category_of(patient["visits"][t][0]))
    j = cats.index(tokenizer.category_of("PX:" + patient["procedures"][t][0]))
    assert counts[k, j] >= 1 and counts[k, j] == counts[j, k]  # that visit's diagnosis x procedure pair
    full = CooccurrenceLoss(counts, ids, category_modality=modality)
    within = CooccurrenceLoss(counts, ids, category_modality=modality, cross_modality=False)
    assert (within.W[torch.from_numpy(cross)] == 0).all() and (full.W[torch.from_numpy(cross)] > 0).any()
    assert torch.equal(within.W[torch.from_numpy(~cross)], full.W[torch.from_numpy(~cross)])


# ---------------------------------------------------------------------------------- generation
def test_generation_writes_modalities_in_order_and_to_their_targets(model, tokenizer, prior):
    config_kwargs = dict(progress=False, times=False, cms=False)
    patients, stats = generate_patients(model, tokenizer, 30, prior=prior, seed=0, **config_kwargs)
    assert stats["ungrammatical_visits"] == 0 and stats["visits_with_duplicate_code"] == 0
    assert stats["visits_short_of_target"] == 0
    for p in patients:
        assert len(p["procedures"]) == len(p["medications"]) == len(p["visits"])
        assert all(v for v in p["visits"])  # every visit has diagnoses
        for v in p["procedures"]:
            assert all(tokenizer.convert_tokens_to_ids("PX:" + c) != tokenizer.unk_token_id for c in v)
        for v in p["medications"]:
            assert all("//" in c for c in v)
    n_px = sum(len(v) for p in patients for v in p["procedures"])
    n_rx = sum(len(v) for p in patients for v in p["medications"])
    assert n_px > 0 and n_rx > 0


def test_grammar_follows_the_per_modality_targets_exactly(model, tokenizer, prior):
    config = promptehr_generation_config(model.generation_config, cms=False, times=False)
    seeds = [{"age": 60.0, "sex": "M", "visits": [["4019", "25000", "PX:3893", "PX:9904", "RX:HEPARIN//HEP5"],
                                                   ["486", "RX:HEPARIN//HEP5", "RX:FUROSEMIDE//FURO40I"]]}]
    seeds = [{**s, "visits": [[c for c in v if c in tokenizer.code_counts] for v in s["visits"]]} for s in seeds]
    split = [split_visit(v) for v in seeds[0]["visits"]]
    seed = {"age": 60.0, "sex": "M", "visits": [s["visits"] for s in split],
            "procedures": [s["procedures"] for s in split], "medications": [s["medications"] for s in split]}
    config.seed_visits = 0  # generate every visit, each to the seed's own per-modality counts
    out, stats = sample_patients(model, tokenizer, config, mode="seeded", seed_patients=[seed] * 4, seed=1)
    want = [[len(s["visits"]), len(s["procedures"]), len(s["medications"])] for s in split]
    for p in out:
        got = [[len(d), len(x), len(m)] for d, x, m in zip(p["visits"], p["procedures"], p["medications"])]
        assert got == want
    assert stats["visits_short_of_target"] == 0


def test_check_visits_flags_a_modality_out_of_order(tokenizer):
    index = VocabIndex(tokenizer)
    ok = tokenizer.encode_visit(["4019", "RX:HEPARIN//HEP5"]) if "RX:HEPARIN//HEP5" in tokenizer.code_counts \
        else tokenizer.encode_visit([tokenizer.convert_ids_to_tokens(tokenizer.code_ids[0])])
    px = next(t for t in tokenizer.code_counts if t.startswith("PX:") and tokenizer.code_counts[t])
    dx = next(t for t in tokenizer.code_counts if tokenizer.modality_rank(t) == 0 and tokenizer.code_counts[t])
    ids = [tokenizer.visit_start_id, *tokenizer.encode_visit([px])[1:3], *tokenizer.encode_visit([dx])[1:3],
           tokenizer.visit_end_id]
    bad, _ = check_visits(index, torch.tensor([ids]))
    good, _ = check_visits(index, torch.tensor([ok]))
    assert bool(bad[0]) and not bool(good[0])


def test_given_diagnoses_keeps_them_and_generates_the_rest(model, tokenizer, prior, cohort):
    real = [p for p in cohort if all(c in tokenizer.code_counts for v in p["visits"] for c in v)][:6]
    out, stats = generate_patients(model, tokenizer, mode="given_diagnoses", seed_patients=real, prior=prior,
                                   seed=0, progress=False, times=False, cms=False)
    assert [p["visits"] for p in out] == [p["visits"] for p in real]
    assert stats["ungrammatical_visits"] == 0
    assert sum(len(v) for p in out for v in p["medications"]) > 0
    with pytest.raises(ValueError, match="given_diagnoses"):
        dx_tok = PromptEHRTokenizer.from_patients(cohort)
        dx_model = PromptEHRForConditionalGeneration(PromptEHRConfig.from_preset("small", tokenizer=dx_tok, **TINY))
        generate_patients(dx_model, dx_tok, mode="given_diagnoses", seed_patients=real, progress=False, times=False,
                          prior=CohortPrior.from_patients(cohort), cms=False)


def test_procedure_tokens_carry_the_procedure_sex_edits(tokenizer):
    edits = cms_edits(tokenizer)
    px = {c for cls in edits["classes"] for c in cls["codes"] if c.startswith("PX:")}
    female = {c for cls in edits["classes"] if "sex_female_only" in cls["edits"] for c in cls["codes"]}
    assert not any(c.startswith("RX:") for cls in edits["classes"] for c in cls["codes"])
    # ICD-9-CM procedure chapter 65-71 (female genital organs, obstetrics) is female only.
    assert {c for c in px if c[3:5] in ("65", "66", "67", "68", "69", "70", "71")} <= female


def test_diagnoses_only_generation_ignores_the_other_fields(cohort):
    """``--modalities diagnoses`` on a cohort with procedures and medications generates what the
    cohort without them generates (today's diagnosis-only output, patient for patient)."""
    bare = [{k: v for k, v in p.items() if k not in ("procedures", "medications")} for p in cohort]
    outs = []
    for patients in (cohort, bare):
        tok = PromptEHRTokenizer.from_patients(patients)
        prior = CohortPrior.from_patients(patients)
        torch.manual_seed(0)
        model = PromptEHRForConditionalGeneration(PromptEHRConfig.from_preset("small", tokenizer=tok, **TINY))
        out, _ = generate_patients(model, tok, 20, prior=prior, seed=0, progress=False, times=False)
        outs.append(out.to_list())
    assert outs[0] == outs[1]
    assert all(p["procedures"] is None and p["medications"] is None for p in outs[0])


def test_copy_filter_compares_every_modality(model, tokenizer, prior):
    first, _ = generate_patients(model, tokenizer, 12, prior=prior, seed=5, progress=False, times=False, cms=False)
    again, stats = generate_patients(model, tokenizer, 12, prior=prior, seed=5, progress=False, times=False, cms=False,
                                     exclude_patients=first)
    assert stats["copies_redrawn"] + stats["copies_dropped"] == 12  # the same seed repeats every patient
    seen = {tuple(map(tuple, merge_visits(p, ALL))) for p in first}
    assert not any(tuple(map(tuple, merge_visits(p, ALL))) in seen for p in again)
    # a training patient differing only in its medications is no copy
    other = [{**p, "medications": [[*v, "RX:NOPE//X"] for v in p["medications"]]} for p in first]
    _, stats = generate_patients(model, tokenizer, 12, prior=prior, seed=5, progress=False, times=False, cms=False,
                                 exclude_patients=other)
    assert stats["copies_redrawn"] == stats["copies_dropped"] == 0
