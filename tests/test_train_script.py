"""examples/train.py end to end on a tiny model: simulate -> prepare -> train -> save -> generate ->
evaluate -> model card -> push_to_hub (up to the network: HfApi.create_commit is captured), and
resume from the last checkpoint."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ('{"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, '
        '"decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "prompt_hidden_size": 16}')


@pytest.fixture(scope="module")
def train_script(repo_root):
    spec = importlib.util.spec_from_file_location("promptehr_train_example", repo_root / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_generate_evaluate_push_and_resume(train_script, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def fake_create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def fake_create_commit(self, repo_id, operations, **kwargs):
        # the network boundary: record what would be sent, with each file's content
        calls["commit"] = (repo_id, {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations},
                           kwargs)
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--patients", "300", "--config-overrides", TINY, "--batch-size", "16",
              "--logging-steps", "2", "--eval-steps", "4", "--save-steps", "4", "--eval-examples", "32",
              "--eval-generate-patients", "8", "--max-source-length", "64", "--warmup-steps", "0"]
    run = train_script.main(common + ["--max-steps", "4", "--generate", "40",
                                      "--push-to-hub", "someone/promptehr-tiny"])

    assert run["world_size"] == 1 and run["global_step"] == 4
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "configuration_promptehr.py", "modeling_promptehr.py",
                 "tokenization_promptehr.py", "tokenizer_config.json", "vocab.json", "hierarchy.json",
                 "cooccurrence.safetensors", "cohort_prior.json", "README.md"):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pkl"))
    assert (out / "synthetic" / "synthetic.parquet").is_file()
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["rows"]["synthetic"]["n_synthetic_patients"] > 0 and metrics["rows"]["floor"] is not None
    # the generation monitor ran at the evaluation
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert any("gen_distinct_codes" in h for h in state["log_history"])

    # push_to_hub: one commit with config (auto_map), weights, remote code, tokenizer, card with metrics
    assert calls["repo"][0] == "someone/promptehr-tiny"
    repo_id, files, _ = calls["commit"]
    assert repo_id == "someone/promptehr-tiny"
    config = json.loads(files["config.json"])
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM"}
    assert {"model.safetensors", "configuration_promptehr.py", "modeling_promptehr.py", "tokenization_promptehr.py",
            "tokenizer_config.json", "vocab.json", "hierarchy.json", "cooccurrence.safetensors",
            "cohort_prior.json", "README.md"} <= set(files)
    assert json.loads(files["tokenizer_config.json"])["auto_map"]["AutoTokenizer"][0].startswith("tokenization_")
    card = files["README.md"].decode()
    assert "code JS divergence" in card and "| synthetic | floor | baseline |" in card
    assert f"{metrics['rows']['synthetic']['code_js']:.4g}" in card

    # resume: continues at step 4 with the saved state, on to step 6
    resumed = train_script.main(common + ["--max-steps", "6", "--generate", "0",
                                          "--resume-from-checkpoint", "last"])
    assert resumed["global_step"] == 6
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss_cooc" in h]
    assert steps == [2, 4, 6]
