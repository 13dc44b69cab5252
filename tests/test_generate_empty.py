"""`promptehr generate` with nothing to generate or nothing left to write: a refusal naming the
reason (exit code 2), never a traceback, and no output folder."""

from __future__ import annotations

import pytest
import torch

from promptehr_hf.cli import main
from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.command import write_cohort
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config):
    patients = simulate(200, seed=3)
    tokenizer = PromptEHRTokenizer.from_patients(patients)
    torch.manual_seed(0)
    cfg = PromptEHRConfig.from_preset(
        "small", tokenizer=tokenizer, **tiny_config, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("ckpt")
    PromptEHRForConditionalGeneration(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CohortPrior.from_patients(patients).save(path)
    return path


def test_generate_n_zero_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["generate", "--model", str(checkpoint), "--n", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--n must be >= 1, got 0" in err and "Traceback" not in err
    assert not out.exists()


def test_write_cohort_refuses_no_patient(tmp_path):
    out = tmp_path / "synthetic"
    with pytest.raises(ValueError, match=r"no patient to write \(12 generated; 12 dropped as copies"):
        write_cohort([], out, {"n_generated": 12, "copies_dropped": 12})
    with pytest.raises(ValueError, match=r"12 dropped as copies of training patients after 3 redraws each\)"):
        write_cohort([], out, {"n_generated": 12, "copies_dropped": 12, "copy_redraws": 3})
    assert not out.exists() and not list(tmp_path.iterdir())
