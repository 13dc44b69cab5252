"""examples/train.py end to end on a tiny model: simulate -> prepare -> train -> save -> generate ->
evaluate -> model card -> push_to_hub (up to the network: HfApi.create_commit is captured), and
resume from the last checkpoint; nothing lands in the Hugging Face caches; the prepared cohort is
reused only while its input files and options are unchanged."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from accelerate import PartialState

from promptehr_hf.datasets_scripts.cohort_io import dataset_to_patients, write_mimic3_csvs
from promptehr_hf.datasets_scripts.prepare import load_prepared
from promptehr_hf.modeling_promptehr.generation.times import VisitTimeModel
from promptehr_hf.modeling_promptehr.training import pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def cache_entries() -> set[str]:
    """Every file and folder under HF_HOME and the datasets cache, and datasets' temporary cache folders."""
    roots = {Path(os.environ["HF_HOME"]), Path(datasets.config.HF_DATASETS_CACHE)}
    found = set()
    for root in roots:
        for folder, dirs, files in os.walk(root):
            found |= {os.path.join(folder, name) for name in dirs + files}
    prefix = datasets.config.TEMP_CACHE_DIR_PREFIX
    return found | {str(p) for p in Path(tempfile.gettempdir()).glob(f"{prefix}*")}


@pytest.fixture(scope="module")
def train_script(repo_root):
    spec = importlib.util.spec_from_file_location("promptehr_train_example", repo_root / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_generate_evaluate_push_and_resume(train_script, tmp_path, monkeypatch, tiny_config_json):
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
    common = ["--output-dir", str(out), "--patients", "300", "--config-overrides", tiny_config_json,
              "--batch-size", "16",
              "--logging-steps", "2", "--eval-steps", "4", "--save-steps", "4", "--eval-examples", "32",
              "--eval-generate-patients", "8", "--max-source-length", "64", "--warmup-steps", "0",
              "--calibration-patients", "30"]
    before = cache_entries()
    run = train_script.main(common + ["--max-steps", "4", "--generate", "40",
                                      "--push-to-hub", "someone/promptehr-tiny"])
    # Nothing derived from the cohort (Arrow copies of the splits, map/shuffle cache files) is
    # left in the Hugging Face caches: every copy of the rows stays in --output-dir.
    assert not cache_entries() - before, sorted(cache_entries() - before)

    assert run["world_size"] == 1 and run["global_step"] == 4
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "configuration_promptehr.py", "modeling_promptehr.py",
                 "tokenization_promptehr.py", "tokenizer_config.json", "vocab.json", "hierarchy.json",
                 "cooccurrence.safetensors", "cohort_prior.json", "README.md"):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pkl"))
    # visit types by default: the model is conditioned on them, the prior draws them, and the
    # code inside a category comes from the model
    type_tables = json.loads((model_dir / "cohort_prior.json").read_text())["visit_types"]
    n_types = type_tables["n_types"]
    assert type_tables["recurrence"]["categories"]  # counted with the tokenizer's categories
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["visit_type_feature_index"] == 1 and saved["cat_cardinalities"] == [2, n_types]
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    assert generation_config["stage_two"] == "type"
    # the category calibration measured on 30 generated patients, one log-ratio per category seen
    assert generation_config["category_calibration"] and "calibration_minutes" in run
    assert (out / "synthetic" / "synthetic.parquet").is_file()
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["rows"]["synthetic"]["n_synthetic_patients"] > 0 and metrics["rows"]["floor"] is not None
    # the model's perplexity on the held-out test patients, in the report and the model card
    assert metrics["perplexity"]["lpl"] > 1 and metrics["perplexity"]["n_patients"] == len(
        pq.read_table(out / "data" / "test.parquet"))
    assert "longitudinal perplexity (lpl)" in (model_dir / "README.md").read_text()
    # the simulated cohort has times: a time model is fitted, shipped and used by generation
    assert run["times"] and (model_dir / "time_model.safetensors").is_file()
    # calibrated on half the category calibration's patients: a shift on the death head at least
    assert run["time_calibration_patients"] == 15 and VisitTimeModel.load(model_dir).shifts["death"].any()
    assert (model_dir / "custom_generate" / "times.py").is_file()
    synthetic = pq.read_table(out / "synthetic" / "synthetic.parquet").to_pylist()
    assert all(p["stay_days"] is not None and len(p["stay_days"]) == len(p["visits"]) for p in synthetic)
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
    assert "`time_model.safetensors` (stays, gaps and deaths" in card
    assert f"{metrics['rows']['synthetic']['code_js']:.4g}" in card

    # resume: continues at step 4 with the saved state, on to step 6
    resumed = train_script.main(common + ["--max-steps", "6", "--generate", "0",
                                          "--resume-from-checkpoint", "last", "--no-time"])
    assert resumed["global_step"] == 6
    assert not resumed["times"] and not (model_dir / "time_model.safetensors").exists()  # no stale time model
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss_cooc" in h]
    assert steps == [2, 4, 6]


def _prepare_args(output_dir: Path, *extra: str) -> argparse.Namespace:
    return pipeline.parse_args(["--output-dir", str(output_dir), *extra])


def test_prepared_cohort_follows_its_input_files(tmp_path, caplog):
    """A row edited in place (same size, same modification time) prepares the cohort again."""
    patients = [{"subject_id": i, "age": 40.0 + i, "sex": "FM"[i % 2], "visits": [["4019", "25000"], ["486"]]}
                for i in range(1, 21)]
    mimic = tmp_path / "mimic"
    write_mimic3_csvs(patients, mimic, seed=0)
    args = _prepare_args(tmp_path / "run", "--mimic-dir", str(mimic))
    state = PartialState(cpu=True)
    caplog.set_level(logging.INFO, logger="promptehr.train")

    data_dir, summary = pipeline.prepare_data(args, state)
    assert summary["patients"] == 20
    caplog.clear()
    pipeline.prepare_data(args, state)
    assert "reusing the prepared cohort" in caplog.text

    path = mimic / "DIAGNOSES_ICD.csv"
    st = path.stat()
    text = path.read_text()
    path.write_text(text.replace('"4019"', '"4011"', 1))  # one row, same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    caplog.clear()
    pipeline.prepare_data(args, state)
    splits = load_prepared(data_dir)
    codes = [c for name in splits for p in dataset_to_patients(splits[name]) for v in p["visits"] for c in v]
    assert codes.count("4011") == 1 and codes.count("4019") == 19  # the edited row, not the stale one
    assert "reusing" not in caplog.text
    assert "DIAGNOSES_ICD.csv changed (content)" in caplog.text

    # A prepare option (the seed) changes the split: prepared again, and the log says why.
    caplog.clear()
    pipeline.prepare_data(_prepare_args(tmp_path / "run", "--mimic-dir", str(mimic), "--seed", "1"), state)
    assert "seed was 0, now 1" in caplog.text


def test_simulated_cohort_is_drawn_again_only_when_its_settings_change(tmp_path, caplog):
    state = PartialState(cpu=True)
    caplog.set_level(logging.INFO, logger="promptehr.train")
    _, first = pipeline.prepare_data(_prepare_args(tmp_path, "--patients", "60"), state)
    assert "simulated 60 patients" in caplog.text
    caplog.clear()
    _, again = pipeline.prepare_data(_prepare_args(tmp_path, "--patients", "60"), state)
    assert " patients into " not in caplog.text and "reusing the prepared cohort" in caplog.text
    assert again == first
    caplog.clear()
    _, other = pipeline.prepare_data(_prepare_args(tmp_path, "--patients", "80"), state)
    assert "simulated 80 patients" in caplog.text and "preparing the cohort" in caplog.text
    assert sum(other["splits"].values()) == other["patients"] != first["patients"]
