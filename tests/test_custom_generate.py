"""A checkpoint that generates by itself: its generation config and its ``custom_generate/`` code.

``save_custom_generate`` writes the generation settings (with the vocabulary's CMS edits) into
``generation_config.json`` and copies the generation core into ``custom_generate/``; a process
without ``promptehr_hf`` then loads the folder with ``trust_remote_code=True`` and its
``model.generate(...)`` writes the patients ``generate_patients`` writes. A random-init tiny
model is enough: validity holds by construction whatever the model says.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, GenerationConfig

from promptehr_hf.datasets_scripts import icd9, schema
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation import prior as prior_module
from promptehr_hf.modeling_promptehr.generation.config import PromptEHRGenerationConfig, promptehr_generation_config
from promptehr_hf.modeling_promptehr.generation.pipeline import (
    CUSTOM_GENERATE_DIR,
    SHIPPED_FILES,
    cms_edits,
    generate_patients,
    save_custom_generate,
)
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GENERATION_DIR = Path(__file__).resolve().parents[1] / "modeling_promptehr" / "generation"
# Codes with every kind of CMS edit (newborn, maternity, sex-specific, adult) beside plain ones.
CODES = ["4019", "25000", "25001", "42731", "4280", "5849", "486", "5990", "2724", "41401", "V8409",
         "V3000", "V3001", "7793", "185", "60000", "6202", "650", "64891", "V270", "V8402"]


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    rng = np.random.default_rng(1)
    patients = []
    for sid in range(300):
        sex = "FM"[int(rng.integers(2))]
        age = float(rng.choice([0.0, 8.0, 30.0, 70.0]))
        visits = []
        for _ in range(int(rng.integers(1, 4))):
            visit = [str(c) for c in rng.choice(CODES, size=int(rng.integers(1, 7)), replace=False)]
            visits.append([c for c in visit if icd9.check(c, age, sex) is None] or ["4019"])
        patients.append({"subject_id": sid + 1, "age": age, "sex": sex, "visits": visits})
    return patients


@pytest.fixture(scope="module")
def tokenizer(cohort):
    return PromptEHRTokenizer.from_patients(cohort)


@pytest.fixture(scope="module")
def checkpoint(cohort, tokenizer, tmp_path_factory, tiny_config) -> Path:
    """A saved tiny model with tokenizer, cohort prior, generation config and custom_generate/."""
    torch.manual_seed(0)
    cfg = PromptEHRConfig.from_preset(
        "small", tokenizer=tokenizer, **tiny_config, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("checkpoint") / "model"
    PromptEHRForConditionalGeneration(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CohortPrior.from_patients(cohort).save(path)
    save_custom_generate(path, tokenizer, max_history_length=64)
    return path


def _assert_valid(patients, stats, tokenizer):
    """Grammar (counted on the token ids by the run itself), no code twice in a visit, only code
    tokens of the vocabulary, and the CMS age/sex edits of each patient (checked with icd9)."""
    assert stats["ungrammatical_visits"] == stats["visits_with_duplicate_code"] == stats["empty_visits"] == 0
    codes = set(tokenizer.convert_ids_to_tokens(list(tokenizer.code_ids)))
    n_edit_codes = 0
    for p in patients:
        assert p["visits"]
        for v in p["visits"]:
            assert v and len(v) == len(set(v)) and set(v) <= codes
            assert all(icd9.check(c, p["age"], p["sex"]) is None for c in v), (p["age"], p["sex"], v)
            n_edit_codes += sum(icd9.edit_of(c) is not None for c in v)
    assert n_edit_codes > 0  # the CMS edits were in play


def _same_patients(ours, theirs):
    assert [p["visits"] for p in ours] == [p["visits"] for p in theirs]
    assert [p["sex"] for p in ours] == [p["sex"] for p in theirs]
    assert np.allclose([p["age"] for p in ours], [p["age"] for p in theirs], atol=1e-4)


CLEAN_SCRIPT = """
import json, sys

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

checkpoint, out = sys.argv[1], sys.argv[2]
model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
default, default_stats = model.generate(tokenizer=tokenizer, n=200, seed=11)
by_model, by_model_stats = model.generate(tokenizer=tokenizer, n=40, seed=3, stage_two="model",
                                          visit_length="model", max_codes=6, batch_size=16)
assert not [m for m in sys.modules if m.split(".")[0] == "promptehr_hf"]
with open(out, "w") as f:
    json.dump({"default": [default, default_stats], "by_model": [by_model, by_model_stats]}, f)
"""


def test_clean_process_generates_what_generate_patients_generates(checkpoint, tokenizer, run_clean_python, tmp_path):
    """Without promptehr_hf, AutoModelForSeq2SeqLM(trust_remote_code=True) + model.generate(...)
    write 200 valid patients, the very ones generate_patients writes with the same seed; and
    keyword arguments override the saved settings there too."""
    out = tmp_path / "clean.json"
    proc = run_clean_python(CLEAN_SCRIPT, str(checkpoint), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean = json.loads(out.read_text())
    patients, stats = clean["default"]
    assert len(patients) == 200 and stats["stage_two"] == "empirical" and stats["max_history_length"] == 64
    _assert_valid(patients, stats, tokenizer)

    # The package, on the same folder loaded the same way (the model's generate is now the
    # checkpoint's custom generate; generate_patients still decodes visit by visit).
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint, trust_remote_code=True)
    ours, our_stats = generate_patients(model, tokenizer, 200, seed=11, progress=False)
    _same_patients(ours.to_list(), patients)
    assert our_stats["generate_calls"] == stats["generate_calls"]

    by_model, by_model_stats = clean["by_model"]
    assert by_model_stats["stage_two"] == "model" and by_model_stats["visit_length"] == "model"
    _assert_valid(by_model, by_model_stats, tokenizer)
    ours, _ = generate_patients(model, tokenizer, 40, seed=3, stage_two="model", visit_length="model", max_codes=6,
                                batch_size=16, progress=False)
    _same_patients(ours.to_list(), by_model)


def test_custom_generate_by_name(checkpoint, tokenizer):
    """A model loaded without trust_remote_code reaches the same code through
    generate(custom_generate=<folder>, trust_remote_code=True)."""
    model = PromptEHRForConditionalGeneration.from_pretrained(checkpoint)
    patients, stats = model.generate(custom_generate=str(checkpoint), trust_remote_code=True, tokenizer=tokenizer,
                                     n=30, seed=2)
    ours, _ = generate_patients(model, tokenizer, 30, seed=2, progress=False)
    _same_patients(ours.to_list(), patients)
    with pytest.raises(ValueError, match="takes no `logits_processor`"):
        model.generate(custom_generate=str(checkpoint), trust_remote_code=True, tokenizer=tokenizer, n=2,
                       logits_processor=[])


def test_generation_config_round_trips_and_arguments_override_it(checkpoint, cohort, tokenizer, tmp_path, capsys):
    from promptehr_hf.cli import main

    path = tmp_path / "model"
    model = PromptEHRForConditionalGeneration.from_pretrained(checkpoint)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CohortPrior.from_patients(cohort).save(path)
    (path / "training_args.json").write_text(json.dumps({"max_source_length": 48}))
    saved = save_custom_generate(path, tokenizer, stage_two="uniform", batch_size=32, temperature=0.8, top_k=7)
    assert saved.max_history_length == 48  # from training_args.json when not given
    assert saved.cms_edits == cms_edits(tokenizer) and saved.do_sample is True
    assert sorted(p.name for p in (path / CUSTOM_GENERATE_DIR).iterdir()) == sorted(SHIPPED_FILES)

    # Round trip: as this class, and as transformers loads it (a plain GenerationConfig).
    assert PromptEHRGenerationConfig.from_pretrained(path).to_dict() == saved.to_dict()
    loaded = PromptEHRForConditionalGeneration.from_pretrained(path)
    assert type(loaded.generation_config) is GenerationConfig
    assert promptehr_generation_config(loaded.generation_config).to_dict() == saved.to_dict()

    # Arguments override the saved settings; None keeps them.
    config = promptehr_generation_config(loaded.generation_config, stage_two="model", top_k=None, batch_size=8)
    assert (config.stage_two, config.top_k, config.batch_size, config.temperature) == ("model", 7, 8, 0.8)
    with pytest.raises(TypeError, match="greedy"):
        promptehr_generation_config(loaded.generation_config, greedy=True)
    with pytest.raises(ValueError, match="visit_length"):
        promptehr_generation_config(loaded.generation_config, visit_length="long")
    # A model whose generation config holds no PromptEHR field gets the defaults.
    plain = promptehr_generation_config(GenerationConfig(pad_token_id=0))
    assert (plain.stage_two, plain.visit_length, plain.cms, plain.do_sample, plain.batch_size, plain.cms_edits) == (
        "empirical", "data", True, True, 256, None)

    _, stats = generate_patients(loaded, tokenizer, 20, seed=0, progress=False)
    assert (stats["stage_two"], stats["batch_size"], stats["top_k"], stats["max_history_length"]) == (
        "uniform", 32, 7, 48)
    _, stats = generate_patients(loaded, tokenizer, 20, seed=0, stage_two="empirical", progress=False)
    assert stats["stage_two"] == "empirical" and stats["batch_size"] == 32

    # The command line: the saved settings, and the flags given over them.
    for flags, stage_two in (([], "uniform"), (["--stage-two", "model", "--batch-size", "4"], "model")):
        out = tmp_path / f"synthetic-{stage_two}"
        assert main(["generate", "--model", str(path), "--n", "10", "--out", str(out), *flags]) == 0
        stats = json.loads((out / "generation_stats.json").read_text())
        assert stats["stage_two"] == stage_two and stats["batch_size"] == (4 if flags else 32)
    capsys.readouterr()


def test_shipped_code_imports_only_what_transformers_brings_and_itself():
    """The files copied into custom_generate/ import the standard library, torch, transformers,
    numpy, safetensors (which transformers itself requires) and one another (relatively), nothing
    else; generate.py imports every other one itself; their copy of the schema's constants holds."""
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "numpy", "safetensors"}
    shipped = {Path(name).stem for name in SHIPPED_FILES}
    for name in SHIPPED_FILES:
        tree = ast.parse((GENERATION_DIR / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = {alias.name.split(".")[0] for alias in node.names}
                assert tops <= allowed, (name, tops)
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in shipped, (name, node.module)
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in allowed, (name, node.module)
    # transformers 5.4 copies into its module cache only the files generate.py imports itself
    entry = ast.parse((GENERATION_DIR / "generate.py").read_text(encoding="utf-8"))
    direct = {node.module for node in ast.walk(entry) if isinstance(node, ast.ImportFrom) and node.level}
    assert direct == shipped - {"generate"}
    assert (prior_module.SEXES, prior_module.AGE_CAP) == (schema.SEXES, schema.AGE_CAP)


def test_clean_process_generates_with_visit_types(cohort, tokenizer, tiny_config, run_clean_python, tmp_path):
    """A checkpoint conditioned on visit types (per-type logit bias, type chain and recurrence
    counts in the prior, stage two given the type, a category calibration) generates alone too,
    the same patients as generate_patients."""
    from promptehr_hf.modeling_promptehr.training.visit_types import fit_visit_types, type_logit_bias
    from promptehr_hf.tokenization.tokenization_promptehr import code_category

    mixture = fit_visit_types([v for p in cohort for v in p["visits"]], n_types=8, min_visits=20, progress=False)
    types = mixture.assign_patients([p["visits"] for p in cohort])
    cfg = PromptEHRConfig.from_preset("small", tokenizer=tokenizer, **tiny_config, max_position_embeddings=128,
                                      cat_cardinalities=[2, mixture.n_types], visit_type_feature_index=1)
    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(cfg)
    with torch.no_grad():
        model.visit_type_bias.weight.copy_(torch.from_numpy(type_logit_bias(mixture, tokenizer, cfg.vocab_size)))
    path = tmp_path / "typed"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CohortPrior.from_patients(cohort, visit_types=types, n_types=mixture.n_types, category=code_category).save(path)
    # a category calibration as training writes it: the shipped code applies it as the package does
    calibration = {code_category(c): 0.5 for c in cohort[0]["visits"][0]}
    save_custom_generate(path, tokenizer, max_history_length=64, stage_two="type", category_calibration=calibration)

    out = tmp_path / "clean.json"
    proc = run_clean_python(CLEAN_SCRIPT, str(path), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    patients, stats = json.loads(out.read_text())["default"]
    assert len(patients) == 200 and stats["stage_two"] == "type" and stats["recurrence"] and stats["calibration"]
    _assert_valid(patients, stats, tokenizer)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)
    torch.testing.assert_close(loaded.visit_type_bias.weight, model.visit_type_bias.weight)
    ours, _ = generate_patients(loaded, tokenizer, 200, seed=11, progress=False)
    _same_patients(ours.to_list(), patients)
