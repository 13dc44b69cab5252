"""PromptEHRConfig / PromptEHRForConditionalGeneration (issue 5).

Tiny configs only (d_model 32, 2+2 layers): the whole file runs in well under a minute.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.modeling_promptehr import (
    PromptEHREncoder,
    PromptEHRForConditionalGeneration,
    PromptEHRSeq2SeqLMOutput,
)
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

PATIENTS = [
    {"visits": [["4019", "25000", "486"], ["4280", "5849"]]},
    {"visits": [["4019", "4280"], ["V3000", "7742"], ["486", "5849", "25000"]]},
    {"visits": [["25000"], ["4019", "486", "4280", "5849"]]},
]
# The shared tiny model with two layers a side (cross-layer cache paths) and no dropout (exact
# comparisons between forwards).
MODEL_TESTS = dict(encoder_layers=2, decoder_layers=2, max_position_embeddings=64, dropout=0.0)


@pytest.fixture(scope="module")
def tokenizer():
    return PromptEHRTokenizer.from_patients(PATIENTS)


@pytest.fixture(scope="module")
def config(tokenizer, tiny_config):
    return PromptEHRConfig.from_preset("small", tokenizer=tokenizer, **{**tiny_config, **MODEL_TESTS})


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return PromptEHRForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Three encoder histories (right-padded, masked) and demographics (age years, sex)."""
    rows = [tokenizer.encode_history(p["visits"][:-1]) for p in PATIENTS]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "x_num": torch.tensor([[34.0], [71.0], [2.0]]),
        "x_cat": torch.tensor([[0], [1], [1]]),
    }


def _labels(tokenizer, visits, pad=-100):
    rows = [tokenizer.encode_visit(v) for v in visits]
    width = max(map(len, rows))
    labels = torch.full((len(rows), width), pad)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    return labels


def _first_scores(model, batch, **generate_kwargs):
    kwargs = {**batch, **generate_kwargs}
    out = model.generate(
        **kwargs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    return out.scores[0]


# ------------------------------------------------------------------------------------ config
def test_presets_and_config_validation(tokenizer):
    small = PromptEHRConfig.from_preset("small", tokenizer=tokenizer)
    base = PromptEHRConfig.from_preset("base", vocab_size=5000)
    assert (small.d_model, small.encoder_layers, small.decoder_layers) == (256, 3, 3)
    assert (base.d_model, base.encoder_layers, base.decoder_layers, base.encoder_attention_heads) == (768, 6, 6, 12)
    assert base.vocab_size == 5000 and base.num_hidden_layers == 6  # generate() needs num_hidden_layers
    assert small.vocab_size == len(tokenizer)
    assert small.eos_token_id == tokenizer.visit_end_id  # generate stops a visit at </v>
    assert small.decoder_start_token_id == tokenizer.bos_token_id
    assert small.pad_token_id == tokenizer.pad_token_id
    assert small.model_type == "promptehr" and small.num_prompts == 2
    with pytest.raises(ValueError, match="preset"):
        PromptEHRConfig.from_preset("huge")
    with pytest.raises(ValueError, match="num_feature_scales"):
        PromptEHRConfig(n_num_features=2)
    with pytest.raises(ValueError, match="sex_feature_index"):
        PromptEHRConfig(cat_cardinalities=[], sex_feature_index=0)


def test_preset_parameter_counts():
    """Small trains on 2 CPU cores (~3-8M parameters without token embeddings); base is BART-base."""
    counts = {}
    for name in ("small", "base"):
        with torch.device("meta"):
            m = PromptEHRForConditionalGeneration(PromptEHRConfig.from_preset(name, vocab_size=8000))
        total = sum(p.numel() for p in m.parameters())  # tied embeddings counted once
        counts[name] = total - m.model.shared.weight.numel()
    assert 3e6 < counts["small"] < 8e6, counts
    assert 80e6 < counts["base"] < 120e6, counts


# ----------------------------------------------------------------------------------- forward
def test_forward_outputs_and_losses(model, tokenizer, batch):
    labels = _labels(tokenizer, [p["visits"][-1] for p in PATIENTS])
    out = model(**batch, labels=labels)
    assert isinstance(out, PromptEHRSeq2SeqLMOutput)
    assert out.logits.shape == (3, labels.shape[1], len(tokenizer))  # no prompt positions
    lm = torch.nn.functional.cross_entropy(out.logits.reshape(-1, len(tokenizer)), labels.reshape(-1))
    torch.testing.assert_close(out.lm_loss, lm)
    cfg = model.config
    torch.testing.assert_close(
        out.loss, out.lm_loss + cfg.age_loss_weight * out.age_loss + cfg.sex_loss_weight * out.sex_loss)
    # Aux targets default to the demographics themselves.
    explicit = model(**batch, labels=labels, age_labels=batch["x_num"][:, 0], sex_labels=batch["x_cat"][:, 0])
    torch.testing.assert_close(explicit.age_loss, out.age_loss)
    torch.testing.assert_close(explicit.sex_loss, out.sex_loss)
    assert out.age_pred.shape == (3,) and out.sex_logits.shape == (3, 2)
    # Every component reaches the parameters it should.
    model.zero_grad()
    out.loss.backward()
    for name in ("model.encoder.prompt.num_weight", "model.decoder.prompt.cat_embed.weight", "age_head.weight",
                 "sex_head.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.zero_grad()
    # A plain tuple when asked.
    assert torch.equal(model(**batch, labels=labels, return_dict=False)[0], out.loss)


def test_logits_columns_computes_only_those_columns(model, tokenizer, batch):
    """A decoding loop that reads K known columns gets the LM head on those K only, in order."""
    labels = _labels(tokenizer, [p["visits"][-1] for p in PATIENTS])
    dec = model.prepare_decoder_input_ids_from_labels(labels.clamp(min=0))
    full = model(**batch, decoder_input_ids=dec).logits
    cols = torch.tensor([tokenizer.visit_end_id] + sorted(tokenizer.category_ids, reverse=True))
    part = model(**batch, decoder_input_ids=dec, logits_columns=cols).logits
    assert part.shape == (*full.shape[:-1], len(cols))
    torch.testing.assert_close(part, full[..., cols])
    with pytest.raises(ValueError, match="logits_columns"):
        model(**batch, labels=labels, logits_columns=cols)


def test_padding_is_masked_on_both_sides(model, tokenizer, batch):
    """A row's logits do not depend on the padding of the others (prompt masks aligned)."""
    labels = _labels(tokenizer, [p["visits"][-1] for p in PATIENTS])
    dec_mask = labels.ne(-100).long()
    full = model(**batch, labels=labels, decoder_attention_mask=dec_mask)
    for i in range(3):
        n_enc, n_dec = int(batch["attention_mask"][i].sum()), int(dec_mask[i].sum())
        alone = model(
            input_ids=batch["input_ids"][i : i + 1, :n_enc],
            x_num=batch["x_num"][i : i + 1],
            x_cat=batch["x_cat"][i : i + 1],
            labels=labels[i : i + 1, :n_dec],
        )
        torch.testing.assert_close(full.logits[i, :n_dec], alone.logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(full.age_pred[i], alone.age_pred[0], atol=1e-5, rtol=1e-5)


def test_bad_demographics_are_clear_errors(model, batch):
    with pytest.raises(ValueError, match="x_num"):
        model(**{**batch, "x_num": None}, decoder_input_ids=batch["input_ids"][:, :2])
    with pytest.raises(ValueError, match=r"x_cat\[1, 0\] = 2"):
        model(**{**batch, "x_cat": torch.tensor([[0], [2], [1]])}, decoder_input_ids=batch["input_ids"][:, :2])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.ones(1, 63, dtype=torch.long), x_num=batch["x_num"][:1], x_cat=batch["x_cat"][:1],
              decoder_input_ids=torch.ones(1, 1, dtype=torch.long))


# -------------------------------------------------------------------------------- generation
def test_generate_first_step_depends_on_demographics(model, batch):
    base = _first_scores(model, batch)
    assert torch.equal(base, _first_scores(model, batch))  # deterministic, so any change is real
    older = _first_scores(model, {**batch, "x_num": batch["x_num"] + 40.0})
    flipped = _first_scores(model, {**batch, "x_cat": 1 - batch["x_cat"]})
    for changed in (older, flipped):
        assert (changed - base).abs().amax(dim=-1).min() > 1e-5  # every row moves


def test_generate_uses_encoder_and_decoder_prompts(model, batch):
    """generate() goes through get_encoder() (encoder prompts) and the decoder's own prompts."""
    assert isinstance(model.get_encoder(), PromptEHREncoder)
    enc = model.get_encoder()(**batch)
    assert enc.last_hidden_state.shape[1] == batch["input_ids"].shape[1] + model.config.num_prompts
    base = _first_scores(model, batch)
    for side in ("encoder", "decoder"):
        weight = getattr(model.model, side).prompt.num_bias
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.5)
        try:
            assert (_first_scores(model, batch) - base).abs().max() > 1e-5, side
        finally:
            with torch.no_grad():
                weight.copy_(saved)
    assert torch.equal(_first_scores(model, batch), base)


def test_generate_matches_teacher_forcing_and_no_cache(model, batch):
    """Cached decoding (prompts only in the first step) == no cache == one teacher-forced forward."""
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**batch, **kwargs)
    uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    steps = len(cached.scores)
    assert steps >= 3
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    forced = model(**batch, decoder_input_ids=cached.sequences[:, :steps]).logits
    for t in range(steps):
        live = torch.isfinite(cached.scores[t]).all(-1)  # rows already finished are padded
        torch.testing.assert_close(cached.scores[t][live], forced[live, t], atol=1e-5, rtol=1e-5)
    # Beam search expands x_num/x_cat per beam; the cache must not change the result either.
    beams = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(**batch, **beams), model.generate(**batch, use_cache=False, **beams))


# --------------------------------------------------------------------------- saving, remote code
_FRESH = textwrap.dedent(
    """
    import os, sys

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

    folder = sys.argv[1]
    inputs = load_file(os.path.join(folder, "..", "inputs.safetensors"))
    gen_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    out = {}
    assert AutoConfig.from_pretrained(folder, trust_remote_code=True).model_type == "promptehr"
    for name, auto in (("auto_model", AutoModel), ("auto_seq2seq", AutoModelForSeq2SeqLM)):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            out[name] = model(**inputs).logits
        out[name + "_generated"] = model.generate(**gen_inputs, max_new_tokens=4, do_sample=False)
    assert not any(m.split(".")[0] == "promptehr_hf" for m in sys.modules)
    save_file(out, os.path.join(folder, "..", "outputs.safetensors"))
    print(type(model).__module__, type(model).__name__)
    """
)


def test_saved_model_loads_as_remote_code_in_fresh_process(model, batch, tmp_path, run_clean_python):
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    files = sorted(os.listdir(folder))
    assert "model.safetensors" in files and "modeling_promptehr.py" in files and "configuration_promptehr.py" in files
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_promptehr.PromptEHRConfig",
        "AutoModel": "modeling_promptehr.PromptEHRForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_promptehr.PromptEHRForConditionalGeneration",
    }
    inputs = {**batch, "decoder_input_ids": batch["input_ids"][:, :5].contiguous()}
    save_file(inputs, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        expected = model(**inputs).logits
    expected_generated = model.generate(**batch, max_new_tokens=4, do_sample=False)

    proc = run_clean_python(_FRESH, folder, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "PromptEHRForConditionalGeneration"
    assert proc.stdout.split()[-2].startswith("transformers_modules.")  # the copied remote code ran
    got = load_file(tmp_path / "outputs.safetensors")
    for name in ("auto_model", "auto_seq2seq"):
        assert torch.equal(got[name], expected), name
        assert torch.equal(got[name + "_generated"], expected_generated), name


def test_saved_folder_has_no_pickle(model, tmp_path):
    model.save_pretrained(tmp_path)
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert names and all(n.endswith((".json", ".py", ".safetensors")) for n in names), names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")) for n in names)
    reloaded = PromptEHRForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.shared.weight.data_ptr()  # still tied


# ------------------------------------------------------------------------------------ Trainer
class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train(config, rows, batch_size, accumulation, out_dir):
    from transformers import Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(config)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(rows), data_collator=default_data_collator)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_trainer_gradient_accumulation_matches_bigger_batch(config, tmp_path):
    """accumulation 2 x batch 2 == accumulation 1 x batch 4 (accepts_loss_kwargs=False)."""
    g = torch.Generator().manual_seed(1)
    vocab = config.vocab_size
    rows = [
        {
            "input_ids": torch.randint(7, vocab, (9,), generator=g),
            "attention_mask": torch.ones(9, dtype=torch.long),
            "labels": torch.randint(7, vocab, (5,), generator=g),  # equal lengths: equal token counts
            "x_num": torch.rand(1, generator=g) * 90,
            "x_cat": torch.randint(0, 2, (1,), generator=g),
        }
        for _ in range(12)
    ]
    big_losses, big_params = _train(config, rows, 4, 1, tmp_path / "big")
    acc_losses, acc_params = _train(config, rows, 2, 2, tmp_path / "acc")
    assert len(big_losses) == len(acc_losses) == 3
    for a, b in zip(big_losses, acc_losses):
        assert abs(a - b) < 1e-4, (big_losses, acc_losses)
    torch.testing.assert_close(acc_params, big_params, atol=1e-5, rtol=1e-4)


def test_trainer_evaluate_reports_loss_without_aux_labels(config, tmp_path):
    """Batches carry labels, x_num, x_cat only: Trainer must still see a loss to report."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    rows = [
        {"input_ids": torch.tensor([1, 5, 8, 17, 6, 2]), "labels": torch.tensor([5, 7, 15, 6]),
         "x_num": torch.tensor([50.0]), "x_cat": torch.tensor([1])}
    ] * 2
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=PromptEHRForConditionalGeneration(config), args=args, eval_dataset=_ListDataset(rows),
                      data_collator=default_data_collator)
    assert trainer.label_names == ["labels"]
    assert "eval_loss" in trainer.evaluate()
