"""The grammar-restricted LM loss (``lm_grammar=`` / ``PromptEHRTrainingArguments(lm_loss="grammar")``):
each decoder position's softmax covers the tokens the visit grammar allows there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.processors import VocabIndex
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration, VisitGrammar
from promptehr_hf.modeling_promptehr.training.data import PromptEHRDataCollator, build_examples
from promptehr_hf.modeling_promptehr.training.losses import (
    CooccurrenceLoss,
    category_cooccurrence,
    tokenizer_categories,
)
from promptehr_hf.modeling_promptehr.training.trainer import PromptEHRTrainer, PromptEHRTrainingArguments
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer, merge_visits

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("diagnoses", "procedures", "medications")
N_TYPES = 4
TINY = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
            prompt_hidden_size=8, dropout=0.0)


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    return simulate(60, seed=5)


@pytest.fixture(scope="module")
def tokenizer(cohort) -> PromptEHRTokenizer:
    return PromptEHRTokenizer.from_patients(cohort, modalities=ALL)


@pytest.fixture(scope="module")
def model(tokenizer) -> PromptEHRForConditionalGeneration:
    """Conditioned on visit types, with a random (non-zero) visit-type bias."""
    torch.manual_seed(0)
    config = PromptEHRConfig.from_preset("small", tokenizer=tokenizer, cat_cardinalities=[2, N_TYPES],
                                         visit_type_feature_index=1, **TINY)
    model = PromptEHRForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.visit_type_bias.weight.normal_()
    return model


@pytest.fixture(scope="module")
def grammar(tokenizer, model) -> VisitGrammar:
    index = VocabIndex(tokenizer, model.config.vocab_size)
    return VisitGrammar(index.head_ids, index.category_pos, index.kids, index.kid_ok)


@pytest.fixture(scope="module")
def examples(cohort, tokenizer):
    merged = [{**p, "visits": merge_visits(p, ALL)} for p in cohort]
    types = [[(i + t) % N_TYPES for t in range(len(p["visits"]))] for i, p in enumerate(merged)]
    return build_examples(merged, max_source_length=128, max_target_length=200, visit_types=types)


@pytest.fixture(scope="module")
def batch(tokenizer, examples):
    collator = PromptEHRDataCollator(tokenizer, code_order="shuffle", max_target_length=200, noise=False,
                                     visit_types=True)
    return collator([examples[i] for i in range(12)])


def _allowed(grammar: VisitGrammar, decoder_input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, T, V] bool, written out token by token: a category's codes after the category, else the head tokens."""
    n_cat = grammar.kids.shape[0] - 1
    out = torch.zeros(*decoder_input_ids.shape, vocab_size, dtype=torch.bool)
    for b, row in enumerate(decoder_input_ids.tolist()):
        for t, token in enumerate(row):
            k = int(grammar.category_pos[token])
            if k < n_cat:
                out[b, t, grammar.kids[k][grammar.kid_ok[k]]] = True
            else:
                out[b, t, grammar.head_ids] = True
    return out


def test_grammar_loss_is_the_full_softmax_restricted_to_the_grammar(model, grammar, batch):
    labels = batch["labels"]
    dec = model.prepare_decoder_input_ids_from_labels(labels)
    full = model(**batch)
    out = model(**batch, lm_grammar=grammar)
    allowed = _allowed(grammar, dec, model.config.vocab_size)
    ref = torch.nn.functional.cross_entropy(full.logits.masked_fill(~allowed, float("-inf")).flatten(0, 1),
                                            labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ref)
    assert out.lm_loss < full.lm_loss  # the same targets, normalised over fewer tokens
    # The logits are the head block: column h scores head_ids[h], visit-type bias included.
    torch.testing.assert_close(out.logits, full.logits[..., grammar.head_ids])
    torch.testing.assert_close(out.age_loss, full.age_loss)
    torch.testing.assert_close(out.loss - out.lm_loss, full.loss - full.lm_loss)
    # The gradient reaches the LM head (tied embeddings) and the visit-type bias.
    model.zero_grad()
    out.loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0 and model.visit_type_bias.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_grammar_loss_leaves_out_a_label_the_grammar_cannot_produce(model, grammar, batch, tokenizer):
    """<unk> (a code of a category the tokenizer never saw, in an evaluation split) and a code
    right after <v> are left out of the loss, as if they were -100."""
    labels = batch["labels"].clone()
    dec = model.prepare_decoder_input_ids_from_labels(labels)  # the inputs stay those of the real visit
    labels[0, 3] = tokenizer.unk_token_id
    labels[1, 0] = next(iter(tokenizer.code_category))  # the grammar wants a category here
    labels[2, 2] = tokenizer.visit_start_id  # after a category, only its codes
    ignored = labels.clone()
    ignored[0, 3] = ignored[1, 0] = ignored[2, 2] = -100
    got = model(**{**batch, "labels": labels}, decoder_input_ids=dec, lm_grammar=grammar).lm_loss
    torch.testing.assert_close(got, model(**{**batch, "labels": ignored}, decoder_input_ids=dec,
                                          lm_grammar=grammar).lm_loss)
    with pytest.raises(ValueError, match="needs labels"):
        model(**{k: v for k, v in batch.items() if k != "labels"}, lm_grammar=grammar)


def test_cooccurrence_loss_reads_the_categories_from_head_block_columns(model, grammar, batch, cohort, tokenizer):
    cats, ids = tokenizer_categories(tokenizer)
    counts = category_cooccurrence([{"visits": merge_visits(p, ALL)} for p in cohort], cats,
                                   category=tokenizer.category_of)
    loss = CooccurrenceLoss(counts, ids, visit_start_id=tokenizer.visit_start_id)
    logits = model(**batch).logits
    on_full = loss(logits, batch["labels"])
    assert on_full > 0
    columns = loss.category_columns(grammar.head_ids)
    torch.testing.assert_close(loss(logits[..., grammar.head_ids], batch["labels"], category_columns=columns), on_full)
    with pytest.raises(ValueError, match="every category"):
        loss.category_columns(grammar.head_ids[:-1])


@pytest.mark.parametrize("lm_loss", ["grammar", "full"])
def test_trainer_computes_the_chosen_lm_loss(model, grammar, batch, cohort, tokenizer, tmp_path, lm_loss):
    cats, _ = tokenizer_categories(tokenizer)
    counts = category_cooccurrence([{"visits": merge_visits(p, ALL)} for p in cohort], cats,
                                   category=tokenizer.category_of)
    args = PromptEHRTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, lm_loss=lm_loss)
    trainer = PromptEHRTrainer(model=model, args=args, processing_class=tokenizer, cooccurrence_counts=counts)
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    expected = model(**batch, lm_grammar=grammar) if lm_loss == "grammar" else model(**batch)
    torch.testing.assert_close(outputs.lm_loss, expected.lm_loss)
    assert outputs.logits.shape[-1] == (len(grammar.head_ids) if lm_loss == "grammar" else model.config.vocab_size)
    assert np.isfinite(float(loss.detach())) and float(loss.detach()) > float(outputs.lm_loss.detach())  # + cooc
    with pytest.raises(ValueError, match="lm_loss"):
        PromptEHRTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, lm_loss="sampled")
