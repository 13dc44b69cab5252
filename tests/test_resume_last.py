"""``promptehr train --resume-from-checkpoint last`` after the newest checkpoint was left
incomplete: it resumes from the newest complete one, with a warning naming the other."""

from __future__ import annotations

import json
import logging

import pytest

from promptehr_hf.modeling_promptehr.training import pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_last_passes_over_an_incomplete_checkpoint(tmp_path, caplog, tiny_config_json):
    out = tmp_path / "run"
    common = ["--output-dir", str(out), "--patients", "120", "--config-overrides", tiny_config_json,
              "--batch-size", "16",
              "--logging-steps", "1", "--eval-steps", "0", "--save-steps", "2", "--eval-generate-patients", "0",
              "--max-source-length", "64", "--warmup-steps", "0", "--generate", "0", "--max-steps", "4",
              "--calibration-patients", "0"]
    assert pipeline.main(common)["global_step"] == 4
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    (checkpoints / "checkpoint-4" / "trainer_state.json").unlink()  # a save cut short (SIGTERM)

    with caplog.at_level(logging.WARNING):
        resumed = pipeline.main(common + ["--resume-from-checkpoint", "last"])
    assert resumed["global_step"] == 4
    assert any("incomplete" in r.getMessage() and str(checkpoints / "checkpoint-4") in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING), caplog.text
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss_lm" in h] == [1, 2, 3, 4]  # 3 and 4 trained again
