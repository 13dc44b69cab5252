"""Generation: LogitsProcessors, CohortPrior, the visit loop, modes, CLI round trip.

A tiny untrained model is enough here: validity must hold by construction whatever the model
says. The briefly trained model and the 10,000-patient figures are in benchmarks/generation.py.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from promptehr_hf.datasets_scripts import icd9
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.pipeline import cms_edits, generate_patients
from promptehr_hf.modeling_promptehr.generation.prior import PRIOR_FILE, CohortPrior
from promptehr_hf.modeling_promptehr.generation.processors import (
    CMSEditTable,
    InverseCDFSamplingLogitsProcessor,
    VocabIndex,
    check_visits,
    visit_logits_processors,
)
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Codes carrying every kind of CMS edit, so that random scores would break them if unchecked.
EDIT_CODES = ["V3000", "V3001", "7793", "76519", "185", "60000", "6202", "6180", "650", "64891", "V270", "V242",
              "V8402", "V8404"]  # C:V84 mixes female-only codes with sex-neutral ones (V8409, V8481)
PLAIN_CODES = ["4019", "4011", "25000", "25001", "25060", "42731", "4280", "42832", "5849", "5845",
               "486", "51881", "5990", "2724", "2720", "0389", "99592", "2859", "2851", "41401", "V8409", "V8481"]


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    """~400 patients over ~15 categories (so each category gets many codes), every edit class."""
    rng = np.random.default_rng(0)
    codes = PLAIN_CODES + EDIT_CODES
    weights = rng.dirichlet(np.ones(len(codes)) * 0.7)
    patients = []
    for sid in range(400):
        sex = "FM"[int(rng.integers(2))]
        age = float(rng.choice([0.0, 5.0, 30.0, 50.0, 70.0, 90.0], p=[0.15, 0.05, 0.2, 0.2, 0.3, 0.1]))
        visits = []
        for _ in range(int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1]))):
            k = int(rng.integers(1, 9))
            visit = [str(c) for c in rng.choice(codes, size=k, replace=False, p=weights)]
            visit = [c for c in visit if icd9.check(c, age, sex) is None] or ["4019"]
            visits.append(visit)
        patients.append({"subject_id": sid + 1, "age": age, "sex": sex, "visits": visits})
    return patients


@pytest.fixture(scope="module")
def tokenizer(cohort):
    return PromptEHRTokenizer.from_patients(cohort)


@pytest.fixture(scope="module")
def prior(cohort):
    return CohortPrior.from_patients(cohort)


@pytest.fixture(scope="module")
def model(tokenizer, tiny_config):
    torch.manual_seed(0)
    cfg = PromptEHRConfig.from_preset(
        "small", tokenizer=tokenizer, **tiny_config, max_position_embeddings=128)
    return PromptEHRForConditionalGeneration(cfg).eval()


def _grammatical(ids: list[int], tok) -> bool:
    """Plain-Python oracle: <v> (category, one of its codes)+ </v> then padding."""
    ids = list(ids)
    while ids and ids[-1] == tok.pad_token_id:
        ids.pop()
    if len(ids) < 4 or ids[0] != tok.visit_start_id or ids[-1] != tok.visit_end_id:
        return False
    body = ids[1:-1]
    if len(body) % 2:
        return False
    return all(c in tok.category_children and x in tok.category_children[c] for c, x in zip(body[::2], body[1::2]))


def _edit_table(index, tokenizer) -> CMSEditTable:
    """The vocabulary's CMS edits, as a checkpoint's generation config carries them."""
    return CMSEditTable(index, cms_edits(tokenizer))


def _decode_with_random_scores(tok, index, processors, batch, steps, generator):
    ids = torch.full((batch, 1), tok.bos_token_id)
    for _ in range(steps):
        scores = processors(ids, torch.randn(batch, index.size, generator=generator) * 3)
        probs = torch.softmax(scores, -1)
        assert torch.isfinite(probs).all()
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], 1)
    return ids[:, 1:]


# ------------------------------------------------------------------------------ processors
def test_processors_grammar_length_duplicates_cms_with_random_scores(tokenizer):
    """Whatever the scores, every row is grammatical, as long as its target, duplicate-free, CMS-valid."""
    g = torch.Generator().manual_seed(1)
    index = VocabIndex(tokenizer, size=len(tokenizer) + 5)  # a model vocab wider than the tokenizer
    B = 120
    ages = [float(a) for a in np.resize([0.0, 0.5, 8.0, 16.0, 30.0, 60.0, 89.0], B)]
    sexes = ["F", "M"] * (B // 2)
    targets = torch.from_numpy(np.resize(np.arange(1, 16), B))
    procs = visit_logits_processors(index, ages, sexes, n_codes=targets, stage_two="model",
                                    edit_table=_edit_table(index, tokenizer))
    out = _decode_with_random_scores(tokenizer, index, procs, B, 2 * 15 + 3, g)
    ungrammatical, duplicate = check_visits(index, out)
    assert not ungrammatical.any() and not duplicate.any()
    n_edit_codes = 0
    for r in range(B):
        assert _grammatical(out[r].tolist(), tokenizer), tokenizer.convert_ids_to_tokens(out[r].tolist())
        (visit,) = tokenizer.decode_visits(out[r])
        assert len(visit) == len(set(visit)) == int(targets[r])
        assert all(icd9.check(c, ages[r], sexes[r]) is None for c in visit)
        n_edit_codes += sum(icd9.edit_of(c) is not None for c in visit)
    assert n_edit_codes > 20  # the edit classes were really in play


def test_processors_stop_when_categories_run_out(tokenizer):
    """A target longer than the codes a row may receive ends the visit instead of failing."""
    index = VocabIndex(tokenizer)
    procs = visit_logits_processors(index, [60.0] * 4, ["M"] * 4, n_codes=[500] * 4,
                                    edit_table=_edit_table(index, tokenizer))
    out = _decode_with_random_scores(tokenizer, index, procs, 4, 2 * len(tokenizer.code_ids) + 3,
                                     torch.Generator().manual_seed(0))
    ungrammatical, duplicate = check_visits(index, out)
    assert not ungrammatical.any() and not duplicate.any()
    # Every code a 60-year-old man may receive, once; never an empty catch-all (P(code | cat) = 0).
    allowed = {tokenizer.convert_ids_to_tokens(i) for i in tokenizer.code_ids
               if tokenizer.code_probs[i] > 0 and icd9.check(tokenizer.convert_ids_to_tokens(i), 60.0, "M") is None}
    assert all(set(tokenizer.decode_visits(row)[0]) == allowed for row in out)


def test_chain_equals_the_processors_one_by_one(tokenizer):
    """VisitLogitsProcessor (one gather/scatter per step) gives the scores of the same processors
    applied one after the other to [B, V] scores, at every kind of step."""
    g = torch.Generator().manual_seed(4)
    index = VocabIndex(tokenizer)
    B = 48
    ages = [float(a) for a in np.resize([0.0, 8.0, 30.0, 60.0, 89.0], B)]
    sexes = ["F", "M"] * (B // 2)
    for mode in ("model", "empirical"):
        (chain,) = visit_logits_processors(index, ages, sexes, n_codes=np.resize([1, 3, 6], B), stage_two=mode,
                                           temperature=0.8, sample=False, edit_table=_edit_table(index, tokenizer))
        ids = torch.full((B, 1), tokenizer.bos_token_id)
        for _ in range(2 * 6 + 3):
            scores = torch.randn(B, index.size, generator=g) * 3
            expected = scores
            for p in chain.processors:
                expected = p(ids, expected)
            got = chain(ids, scores)
            assert torch.equal(torch.isfinite(got), torch.isfinite(expected))
            torch.testing.assert_close(got[torch.isfinite(got)], expected[torch.isfinite(expected)])
            ids = torch.cat([ids, torch.multinomial(torch.softmax(got, -1), 1, generator=g)], 1)
        assert not check_visits(index, ids[:, 1:])[0].any()


def test_block_sampler_draws_categories_from_the_softmax(tokenizer):
    """At a category step the sampler, drawing over the blocks only, follows softmax(scores)."""
    index = VocabIndex(tokenizer)
    reps = 20000
    procs = visit_logits_processors(index, [40.0] * reps, ["F"] * reps, n_codes=[3] * reps, stage_two="model",
                                    cms=False, sample=True)
    ids = torch.tensor([[tokenizer.bos_token_id, tokenizer.visit_start_id]]).expand(reps, -1)
    torch.manual_seed(5)
    scores = torch.randn(1, index.size).expand(reps, -1) * 2
    drawn = procs(ids, scores).argmax(-1)
    p = torch.softmax(scores[0, index.category_ids], -1).numpy()  # only categories after <v>
    counts = np.bincount(index.category_pos[drawn].numpy(), minlength=len(index.category_ids) + 1)
    assert counts[-1] == 0  # every draw is a category
    q = counts[:-1] / reps
    assert _js(p, q) < 0.01


def test_model_length_respects_cap_and_allows_early_end(tokenizer):
    index = VocabIndex(tokenizer)
    procs = visit_logits_processors(index, [50.0] * 64, ["F"] * 64, n_codes=None, max_codes=5, cms=False)
    out = _decode_with_random_scores(tokenizer, index, procs, 64, 2 * 5 + 3, torch.Generator().manual_seed(2))
    assert not check_visits(index, out)[0].any()
    lengths = [len(tokenizer.decode_visits(r)[0]) for r in out]
    assert max(lengths) <= 5 and min(lengths) >= 1 and len(set(lengths)) > 1


def _js(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2
    kl = lambda a, b: float(np.sum(a[a > 0] * np.log2(a[a > 0] / b[a > 0])))  # noqa: E731
    return (kl(p, m) + kl(q, m)) / 2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_stage_two_empirical_reproduces_code_probs(tokenizer, temperature):
    """Stage two 'empirical' samples P(code | category) (JS <= 0.05), whatever the model scores."""
    index = VocabIndex(tokenizer)
    cats = [c for c in tokenizer.category_ids if len(tokenizer.category_children[c]) > 1]
    reps = 400
    B = reps * len(cats)
    last = torch.tensor(cats).repeat_interleave(reps)
    ids = torch.stack([torch.full((B,), tokenizer.bos_token_id), torch.full((B,), tokenizer.visit_start_id), last], 1)
    # The whole chain, as generate runs it: validity processors, temperature warper, sampler.
    procs = visit_logits_processors(index, [40.0] * B, ["F"] * B, n_codes=[3] * B, stage_two="empirical",
                                    temperature=temperature, cms=False, sample=True)
    torch.manual_seed(3)
    scores = procs(ids, torch.randn(B, index.size) * 5)
    assert ((scores == 0).sum(1) == 1).all()  # one drawn token per row, -inf elsewhere
    drawn = scores.argmax(-1)
    for j, c in enumerate(cats):
        kids = tokenizer.category_children[c]
        got = Counter(drawn[j * reps:(j + 1) * reps].tolist())
        assert set(got) <= set(kids)
        p = np.array([tokenizer.code_probs[k] for k in kids])
        q = np.array([got.get(k, 0) for k in kids], dtype=float) / reps
        assert _js(p, q) <= 0.05, (tokenizer.convert_ids_to_tokens(c), p, q)


@pytest.mark.parametrize("mode", ["empirical", "uniform"])
def test_stage_two_weighs_categories_by_their_allowed_mass(tokenizer, mode):
    """Rejection semantics: a man picks C:V84 only with the mass of its codes he may receive."""
    index = VocabIndex(tokenizer)
    table = _edit_table(index, tokenizer)
    procs = visit_logits_processors(index, [40.0, 40.0], ["M", "F"], n_codes=[3, 3], stage_two=mode, edit_table=table)
    stage_two = procs[0].processors[0]
    ids = torch.tensor([[tokenizer.bos_token_id, tokenizer.visit_start_id]] * 2)
    v84 = tokenizer.convert_tokens_to_ids("C:V84")
    kids = tokenizer.category_children[v84]
    q = {k: (tokenizer.code_probs[k] if mode == "empirical" else 1 / sum(tokenizer.code_probs[j] > 0 for j in kids))
         for k in kids if tokenizer.code_probs[k] > 0}
    male_mass = sum(w for k, w in q.items() if icd9.check(tokenizer.convert_ids_to_tokens(k), 40.0, "M") is None)
    out = stage_two(ids, torch.zeros(2, index.size))
    assert 0 < male_mass < 1
    assert out[0, v84].item() == pytest.approx(np.log(male_mass), abs=1e-5)
    assert out[1, v84].item() == pytest.approx(0.0, abs=1e-5)
    # After a V84 code is written, the category keeps only the mass of its unused codes.
    used = max(q, key=q.get)
    ids2 = torch.tensor([[tokenizer.bos_token_id, tokenizer.visit_start_id, v84, used]])
    (chain,) = visit_logits_processors(index, [40.0], ["F"], n_codes=[3], stage_two=mode, edit_table=table)
    out2 = chain.processors[0](ids2, torch.zeros(1, index.size))
    assert out2[0, v84].item() == pytest.approx(np.log(1 - q[used]), abs=1e-5)


def test_inverse_cdf_sampler_draws_from_the_softmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 2
    logits[:, 10:20] = float("-inf")  # zero-probability tokens are never drawn
    sampler = InverseCDFSamplingLogitsProcessor()
    reps = 20000
    drawn = sampler(None, logits.repeat_interleave(reps, 0)).argmax(-1).view(4, reps)
    assert not ((drawn >= 10) & (drawn < 20)).any()
    for r in range(4):
        p = torch.softmax(logits[r], -1).numpy()
        q = np.bincount(drawn[r].numpy(), minlength=50) / reps
        assert _js(p, q) < 0.002


def test_cms_edit_classes_stand_for_their_codes(tokenizer):
    """The design relies on one code standing for its edit class: check every vocab code on a grid."""
    index = VocabIndex(tokenizer)
    table = _edit_table(index, tokenizer)
    assert {("age_newborn",), ("sex_male_only",), ("sex_female_only", "age_maternity")} <= set(table.classes)
    grid = [(a, s) for a in (0.0, 0.9, 1.0, 11.0, 12.0, 14.0, 15.0, 17.9, 18.0, 55.0, 56.0, 90.0) for s in "FM"]
    ages, sexes = zip(*grid)
    forbidden = table.forbidden_codes(list(ages), list(sexes))
    for i in tokenizer.code_ids:
        code = tokenizer.convert_ids_to_tokens(i)
        expected = [icd9.check(code, a, s) is not None for a, s in grid]
        assert forbidden[:, i].tolist() == expected, code


# ---------------------------------------------------------------------------------- prior
def test_growing_cache_matches_the_dynamic_cache():
    """_GrowingLayer (buffers grow by doubling) returns what DynamicLayer's torch.cat returns,
    also after its keys were replaced from outside (as crop or beam reordering do)."""
    from transformers.cache_utils import DynamicLayer

    from promptehr_hf.modeling_promptehr.generation.decoding import _GrowingLayer

    g = torch.Generator().manual_seed(0)
    grow, plain = _GrowingLayer(), DynamicLayer()
    for step, width in enumerate([5, 1, 1, 1, 13, 1, 1, 30, 1]):
        k, v = torch.randn(3, 2, width, 4, generator=g), torch.randn(3, 2, width, 4, generator=g)
        got, want = grow.update(k, v), plain.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        if step == 5:
            grow.crop(-2)
            plain.crop(-2)
    assert grow.get_seq_length() == plain.get_seq_length() == 52


def test_batch_bounds_are_the_cheapest_cuts():
    """_batch_bounds: batches of at most batch_size rows whose summed cost is the minimum over all
    ways to cut the sorted rows (brute force on small cases), never above fixed-size batches."""
    import itertools

    from promptehr_hf.modeling_promptehr.generation.patients import STEP_COST_IN_ROWS, _batch_bounds

    def cost(targets, bounds):
        return sum((2 * targets[hi - 1] + 2) * (STEP_COST_IN_ROWS + hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:]))

    rng = np.random.default_rng(0)
    for n, size in [(1, 3), (7, 3), (9, 4), (10, 10)]:
        targets = np.sort(rng.integers(1, 40, n))
        bounds = _batch_bounds(targets, size)
        assert bounds[0] == 0 and bounds[-1] == n and max(np.diff(bounds)) <= size
        every = [[0, *cuts, n] for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                 if max(np.diff([0, *cuts, n])) <= size]
        assert cost(targets, bounds) == min(cost(targets, b) for b in every)
    targets = np.sort(rng.integers(1, 40, 1000))
    fixed = [*range(0, 1000, 256), 1000]
    assert cost(targets, _batch_bounds(targets, 256)) < cost(targets, fixed)


def test_cohort_prior_round_trip_and_sampling(cohort, prior, tmp_path):
    path = prior.save(tmp_path)
    assert path.endswith(PRIOR_FILE)
    again = CohortPrior.load(tmp_path)
    assert again.table == json.loads(open(path).read()) == prior.table
    rng = np.random.default_rng(0)
    ages, sexes = again.sample_demographics(20000, rng)
    real_ages = {(float(np.floor(p["age"] * 10) / 10), p["sex"]) for p in cohort}
    assert set(zip(ages.tolist(), sexes)) <= real_ages
    n_visits = again.sample_n_visits(ages, rng)
    real_nv = np.mean([len(p["visits"]) for p in cohort])
    assert abs(n_visits.mean() - real_nv) / real_nv < 0.05
    # Conditioning on the age band: newborns draw from newborn visit lengths only.
    newborn_lengths = {len(v) for p in cohort if p["age"] < 1 for v in p["visits"][:1]}
    drawn = again.sample_codes_per_visit(np.zeros(2000), np.zeros(2000, dtype=int), rng)
    assert set(drawn.tolist()) <= newborn_lengths
    with pytest.raises(ValueError, match="cohort prior"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / PRIOR_FILE).write_text("{}")
        CohortPrior.load(tmp_path / "bad")


# ------------------------------------------------------------------------ the outer loop
def _assert_valid(ds, stats):
    assert stats["ungrammatical_visits"] == 0 and stats["visits_with_duplicate_code"] == 0
    assert stats["empty_visits"] == 0
    for p in ds:
        for v in p["visits"]:
            assert v and len(v) == len(set(v))
            assert all(icd9.check(c, p["age"], p["sex"]) is None for c in v), (p["age"], p["sex"], v)


def test_unconditional_generation_is_valid_and_follows_the_prior(model, tokenizer, prior):
    ds, stats = generate_patients(model, tokenizer, 300, prior=prior, batch_size=64, seed=0, progress=False)
    assert len(ds) == 300 and ds.features["visits"].feature.feature.dtype == "string"
    _assert_valid(ds, stats)
    assert stats["visits_short_of_target"] == 0
    s = prior.summary()
    assert abs(stats["mean_visits_per_patient"] - s["mean_visits_per_patient"]) / s["mean_visits_per_patient"] < 0.15
    assert abs(stats["mean_codes_per_visit"] - s["mean_codes_per_visit"]) / s["mean_codes_per_visit"] < 0.15
    # Same seed, same cohort; another seed, another cohort.
    again, _ = generate_patients(model, tokenizer, 300, prior=prior, batch_size=64, seed=0, progress=False)
    other, _ = generate_patients(model, tokenizer, 300, prior=prior, batch_size=64, seed=1, progress=False)
    assert again["visits"] == ds["visits"] and other["visits"] != ds["visits"]


def test_empirical_stage_two_end_to_end(model, tokenizer, prior):
    """Through generate: categories with >= 200 generated codes match P(code | category), JS <= 0.05."""
    ds, stats = generate_patients(model, tokenizer, 1500, prior=prior, stage_two="empirical", batch_size=256,
                                  seed=0, progress=False)
    _assert_valid(ds, stats)
    by_cat: dict[str, Counter] = {}
    for visits in ds["visits"]:
        for v in visits:
            for c in v:
                by_cat.setdefault(icd9.category(c), Counter())[c] += 1
    checked = 0
    for cat, got in by_cat.items():
        if sum(got.values()) < 200:
            continue
        kids = tokenizer.category_children[tokenizer.convert_tokens_to_ids("C:" + cat)]
        p = np.array([tokenizer.code_probs[k] for k in kids])
        q = np.array([got.get(tokenizer.convert_ids_to_tokens(k), 0) for k in kids], dtype=float)
        # Repeats of a category inside one visit draw without replacement, as the data does.
        assert _js(p, q / q.sum()) <= 0.05, cat
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("settings", [
    dict(stage_two="empirical"),
    dict(stage_two="model", visit_length="model", max_codes=7),
    dict(stage_two="uniform", do_sample=False),
    dict(stage_two="empirical", temperature=0.7, top_k=5, top_p=0.9),
])
def test_visit_decoding_gives_what_transformers_loop_gives(model, tokenizer, prior, settings):
    """visit_decoding (the processors and the LM head on the grammar's column blocks) writes the
    very patients that transformers' own loop writes over the whole vocabulary, same seed."""
    kwargs = dict(prior=prior, seed=3, batch_size=16, progress=False, **settings)
    ours, stats = generate_patients(model, tokenizer, 40, **kwargs)
    theirs, _ = generate_patients(model, tokenizer, 40, custom_decoding=False, **kwargs)
    _assert_valid(ours, stats)
    assert ours["visits"] == theirs["visits"]


def test_visit_decoding_asks_only_for_the_columns_it_reads(model, tokenizer, prior):
    """Under empirical stage two the LM head computes the non-code columns only; a model whose
    forward does not take logits_columns (remote code saved before it) computes them all and
    gives the same patients."""
    seen = []

    class Older(PromptEHRForConditionalGeneration):
        def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                    x_num=None, x_cat=None, encoder_outputs=None, past_key_values=None, use_cache=None, **kwargs):
            seen.append(kwargs.get("logits_columns"))
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                   x_num=x_num, x_cat=x_cat, encoder_outputs=encoder_outputs,
                                   past_key_values=past_key_values, use_cache=use_cache, **kwargs)

    widths = []
    hook = model.register_forward_hook(lambda m, a, out: widths.append(out.logits.shape[-1]))
    try:
        new, _ = generate_patients(model, tokenizer, 40, prior=prior, seed=3, progress=False)
    finally:
        hook.remove()
    index = VocabIndex(tokenizer, size=model.config.vocab_size)
    assert set(widths) == {len(index.head_ids)} and len(index.head_ids) < model.config.vocab_size
    older = Older(model.config).eval()
    older.load_state_dict(model.state_dict())
    old, _ = generate_patients(older, tokenizer, 40, prior=prior, seed=3, progress=False)
    assert seen and all(c is None for c in seen)
    assert new["visits"] == old["visits"]


def test_visit_decoding_runs_only_the_visit_chain(model, tokenizer):
    """Any other processor would be skipped silently by a loop that works on the blocks: refused."""
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor

    from promptehr_hf.modeling_promptehr.generation.decoding import visit_decoding

    index = VocabIndex(tokenizer, size=model.config.vocab_size)
    chain = visit_logits_processors(index, [50.0], ["F"], max_codes=3, sample=True,
                                    edit_table=_edit_table(index, tokenizer))
    extra = LogitsProcessorList([*chain, MinLengthLogitsProcessor(2, eos_token_id=tokenizer.visit_end_id)])
    batch = dict(input_ids=torch.tensor([[tokenizer.bos_token_id, tokenizer.eos_token_id]]),
                 x_num=torch.tensor([[50.0]]), x_cat=torch.tensor([[0]]), max_new_tokens=9, do_sample=False)
    out = model.generate(**batch, logits_processor=chain, custom_generate=visit_decoding)
    assert not check_visits(index, out[:, 1:])[0].any()
    with pytest.raises(ValueError, match="one VisitLogitsProcessor"):
        model.generate(**batch, logits_processor=extra, custom_generate=visit_decoding)


def test_encoder_chunks_equal_one_padded_call(model, tokenizer):
    """_encode_histories runs rows of similar length together; each row's encoder states are those
    of one padded call over the whole batch."""
    from promptehr_hf.modeling_promptehr.generation import patients as generation

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 60, (45,), generator=g).tolist()
    histories = [[tokenizer.bos_token_id] + torch.randint(10, 40, (n - 2,), generator=g).tolist()
                 + [tokenizer.eos_token_id] for n in lengths]
    x_num = torch.rand(45, 1, generator=g) * 90
    x_cat = torch.randint(0, 2, (45, 1), generator=g)
    out, mask = generation._encode_histories(model, histories, x_num, x_cat, tokenizer.pad_token_id, "cpu")
    ids, want_mask = generation._pad(histories, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        want = model.get_encoder()(input_ids=ids, attention_mask=want_mask, x_num=x_num, x_cat=x_cat).last_hidden_state
    assert torch.equal(mask, want_mask) and out.last_hidden_state.shape == want.shape
    keep = torch.cat([torch.ones(45, want.shape[1] - ids.shape[1], dtype=torch.long), mask], 1).bool()
    torch.testing.assert_close(out.last_hidden_state[keep], want[keep], atol=1e-5, rtol=1e-5)


def test_conditional_and_model_length(model, tokenizer, prior):
    demo = [{"age": 0.0, "sex": "M", "n_visits": 2}, {"age": 34.0, "sex": "F"},
            {"age": 71.5, "sex": "M", "n_visits": 3}] * 10
    ds, stats = generate_patients(model, tokenizer, mode="conditional", demographics=demo, prior=prior,
                                  visit_length="model", max_codes=6, batch_size=16, progress=False)
    _assert_valid(ds, stats)
    assert [round(a, 3) for a in ds["age"]] == [d["age"] for d in demo] and ds["sex"] == [d["sex"] for d in demo]
    for d, visits in zip(demo, ds["visits"]):
        if "n_visits" in d:
            assert len(visits) == d["n_visits"]
        assert all(1 <= len(v) <= 6 for v in visits)


def test_seeded_generation_keeps_the_seed_and_reports_copies(model, tokenizer, cohort):
    seeds = [p for p in cohort if len(p["visits"]) >= 2][:30] + [cohort[0]]
    ds, stats = generate_patients(model, tokenizer, mode="seeded", seed_patients=seeds, seed_visits=1,
                                  batch_size=32, progress=False)
    _assert_valid(ds, stats)
    for seed, p in zip(seeds, ds):
        assert p["sex"] == seed["sex"] and len(p["visits"]) == len(seed["visits"])
        if len(seed["visits"]) > 1:
            assert p["visits"][0] == seed["visits"][0]
        assert [len(v) for v in p["visits"]] == [len(v) for v in seed["visits"]]  # the seed's lengths
    assert stats["seed_visits_given"] == 30
    assert 0 < stats["seed_given_share"] <= stats["seed_copied_share"] < 1


def test_greedy_is_deterministic_and_copy_filter_drops(model, tokenizer, prior):
    demo = [{"age": a, "sex": s, "n_visits": k} for a, s, k in [(0.0, "F", 1), (45.0, "M", 2), (80.0, "F", 3)] * 8]
    kwargs = dict(mode="conditional", demographics=demo, prior=prior, do_sample=False, visit_length="model",
                  max_codes=8, progress=False)
    a, _ = generate_patients(model, tokenizer, seed=0, batch_size=64, **kwargs)
    b, _ = generate_patients(model, tokenizer, seed=5, batch_size=5, **kwargs)
    assert a["visits"] == b["visits"]  # argmax: no randomness, batching does not matter
    # Greedy gives equal demographics equal records: excluding the first drops its 8 twins.
    c, stats = generate_patients(model, tokenizer, seed=0, exclude_patients=a.to_list()[:1], **kwargs)
    # ... after redrawing them 3 times in vain (greedy redraws are the same records).
    assert stats["copies_dropped"] == 8 and stats["copies_redrawn"] == 0 and len(c) == len(demo) - 8
    assert c["subject_id"] == list(range(1, len(demo) - 7)) and 0.0 not in c["age"]


def _record(visits) -> tuple:
    return tuple(tuple(sorted(v)) for v in visits)


@pytest.mark.parametrize("mode", ["unconditional", "conditional", "seeded"])
def test_copy_filter_redraws_copies_with_the_same_demographics(model, tokenizer, prior, cohort, mode):
    """Excluding a first generation of the same model and seed makes every first-round patient a
    copy: each is redrawn (same age and sex; the given visit count; the same seed) instead of
    dropped, so all n come back, in order, none a copy."""
    seeds = [p for p in cohort if len(p["visits"]) >= 2][:20] + cohort[:20]
    demo = [{"age": p["age"], "sex": p["sex"], **({"n_visits": 2} if j % 2 else {})} for j, p in enumerate(cohort[:40])]
    kwargs = dict(mode=mode, prior=prior, seed=3, batch_size=16, progress=False,
                  **{"unconditional": dict(n=40), "conditional": dict(demographics=demo),
                     "seeded": dict(seed_patients=seeds)}[mode])
    first, stats_first = generate_patients(model, tokenizer, **kwargs)
    assert "copies_redrawn" not in stats_first and "copies_dropped" not in stats_first
    ds, stats = generate_patients(model, tokenizer, exclude_patients=first, **kwargs)
    n = len(first)
    assert len(ds) == n and ds["subject_id"] == list(range(1, n + 1))
    _assert_valid(ds, stats)
    assert stats["copies_redrawn"] == n and stats["copies_dropped"] == 0 and stats["copy_redraws"] == 3
    assert ds["age"] == first["age"] and ds["sex"] == first["sex"]
    excluded = {_record(v) for v in first["visits"]}
    assert not any(_record(v) in excluded for v in ds["visits"])
    assert stats["visits_generated"] > stats_first["visits_generated"]  # the redraws are counted
    if mode == "conditional":
        assert all(len(v) == 2 for v in ds["visits"][1::2])
    if mode == "seeded":
        for seed, p in zip(seeds, ds):
            assert len(p["visits"]) == len(seed["visits"])
            assert [len(v) for v in p["visits"]] == [len(v) for v in seed["visits"]]
            if len(seed["visits"]) > 1:
                assert p["visits"][0] == seed["visits"][0]
    # copy_redraws=0: the copies are dropped at once.
    none, stats_none = generate_patients(model, tokenizer, exclude_patients=first, copy_redraws=0, **kwargs)
    assert len(none) == 0 and stats_none["copies_dropped"] == n and stats_none["copies_redrawn"] == 0


def test_copy_filter_without_copies_changes_nothing(model, tokenizer, prior, cohort):
    """The first round is the plain generation: a filter that finds no copy returns the same
    patients as no filter, and one that finds a few changes those alone."""
    kwargs = dict(prior=prior, seed=0, batch_size=16, progress=False)
    plain, _ = generate_patients(model, tokenizer, 40, **kwargs)
    made = {_record(v) for v in plain["visits"]}
    copied = [p for p in cohort if _record(p["visits"]) in made]
    assert copied  # short real records the tiny model writes too
    other = [p for p in cohort if _record(p["visits"]) not in made]
    same, stats = generate_patients(model, tokenizer, 40, exclude_patients=other, **kwargs)
    assert same.to_list() == plain.to_list()
    assert stats["copies_redrawn"] == stats["copies_dropped"] == 0
    filtered, stats = generate_patients(model, tokenizer, 40, exclude_patients=cohort, **kwargs)
    assert len(filtered) == 40
    changed = [j for j, (a, b) in enumerate(zip(plain["visits"], filtered["visits"])) if a != b]
    assert stats["copies_redrawn"] == len(changed) > 0 and stats["copies_dropped"] == 0
    assert {j for j, v in enumerate(plain["visits"]) if _record(v) in {_record(p["visits"]) for p in copied}} \
        == set(changed)
    assert filtered["age"] == plain["age"] and filtered["sex"] == plain["sex"]
    with pytest.raises(ValueError, match="copy_redraws"):
        generate_patients(model, tokenizer, 4, exclude_patients=cohort, copy_redraws=-1, **kwargs)


def test_bad_arguments(model, tokenizer, prior):
    with pytest.raises(ValueError, match="stage_two"):
        generate_patients(model, tokenizer, 2, prior=prior, stage_two="nope", progress=False)
    with pytest.raises(ValueError, match="CohortPrior"):
        generate_patients(model, tokenizer, 2, progress=False)
    with pytest.raises(ValueError, match="sex"):
        generate_patients(model, tokenizer, mode="conditional", demographics=[{"age": 3, "sex": "X"}], prior=prior,
                          progress=False)


# ------------------------------------------------------------------------------------ CLI
def _checkpoint(model, tokenizer, prior, tmp_path):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    prior.save(ckpt)
    return ckpt


def test_cli_generate_then_prepare_gives_the_same_patients(model, tokenizer, prior, tmp_path, capsys):
    from promptehr_hf.cli import main
    from promptehr_hf.datasets_scripts.prepare import load_prepared

    ckpt = _checkpoint(model, tokenizer, prior, tmp_path)
    out = tmp_path / "synthetic"
    assert main(["generate", "--model", str(ckpt), "--n", "60", "--out", str(out), "--seed", "3",
                 "--stage-two", "uniform", "--batch-size", "16"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"PATIENTS.csv", "ADMISSIONS.csv", "DIAGNOSES_ICD.csv", "synthetic.parquet",
            "generation_stats.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    capsys.readouterr()
    assert main(["generate", "--model", str(ckpt), "--n", "5", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err

    import datasets

    generated = {p["subject_id"]: p for p in datasets.Dataset.from_parquet(str(out / "synthetic.parquet")).to_list()}
    assert main(["prepare", "--mimic-dir", str(out), "--out", str(tmp_path / "prepared")]) == 0
    splits = load_prepared(tmp_path / "prepared")
    read = [p for name in splits for p in splits[name].to_list()]
    assert len(read) == len(generated) == 60
    for p in read:
        g = generated[p["subject_id"]]
        assert p["sex"] == g["sex"] and p["visits"] == g["visits"]
        assert abs(p["age"] - g["age"]) <= 0.011


def test_cli_seeded_generation_leaves_no_copy_of_the_seeds_in_the_hf_cache(model, tokenizer, prior, tmp_path):
    """Seed patients and the copy filter are real rows: reading them must not leave Arrow copies
    under HF_HOME (the datasets cache), where a user would not look for credentialed data."""
    import os
    from pathlib import Path

    from promptehr_hf.cli import main
    from promptehr_hf.datasets_scripts.cohort_io import write_parquet

    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    prior.save(ckpt)
    seeds = tmp_path / "prepared"
    seeds.mkdir()
    write_parquet([{"subject_id": i, "age": 40.0 + i, "sex": "FM"[i % 2], "visits": [["4019", "25000"], ["486"]]}
                   for i in range(8)], seeds / "train.parquet")
    hf_home = Path(os.environ["HF_HOME"])
    before = {p for p in hf_home.rglob("*")}
    assert main(["generate", "--model", str(ckpt), "--mode", "seeded", "--seed-patients", str(seeds),
                 "--exclude-training", str(seeds), "--out", str(tmp_path / "out"), "--batch-size", "8"]) == 0
    assert {p for p in hf_home.rglob("*")} == before


def test_cli_generate_writes_a_meds_dataset(model, tokenizer, prior, tmp_path):
    import meds

    from promptehr_hf.cli import main
    from promptehr_hf.datasets_scripts.meds_io import read_meds

    ckpt = _checkpoint(model, tokenizer, prior, tmp_path)
    out = tmp_path / "synthetic"
    assert main(["generate", "--model", str(ckpt), "--n", "30", "--out", str(out), "--seed", "3",
                 "--stage-two", "uniform", "--batch-size", "16", "--format", "meds"]) == 0
    assert not (out / "DIAGNOSES_ICD.csv").exists()
    assert (out / "meds" / meds.dataset_metadata_filepath).is_file()
    import datasets

    generated = datasets.Dataset.from_parquet(str(out / "synthetic.parquet")).to_list()
    read, summary = read_meds(out / "meds")
    assert summary["code_system"] == "icd9cm"
    assert [(p["subject_id"], p["sex"], p["visits"]) for p in read] == \
        [(p["subject_id"], p["sex"], p["visits"]) for p in generated]
    assert all(abs(p["age"] - g["age"]) <= 0.011 for p, g in zip(read, generated))
