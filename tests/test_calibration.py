"""Category calibration: measured on the model's own draw, saved in the generation config, applied
to every visit's category scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.config import PromptEHRGenerationConfig
from promptehr_hf.modeling_promptehr.generation.patients import category_calibration_row
from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.processors import VocabIndex
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.calibration import (
    MAX_LOG_RATIO,
    category_visit_counts,
    fit_category_calibration,
)
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Six categories; hypertension (401) in 85% of visits, the others in a few.
HYPERTENSION = "4019"
OTHERS = ["25000", "42731", "5849", "486", "2724"]


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    rng = np.random.default_rng(0)
    patients = []
    for sid in range(300):
        visit = [str(rng.choice(OTHERS))]
        if rng.random() < 0.85:
            visit.append(HYPERTENSION)
        patients.append({"subject_id": sid + 1, "age": 60.0, "sex": "FM"[sid % 2], "visits": [visit]})
    return patients


def _share(visits, category_of, category) -> float:
    return category_visit_counts(visits, category_of)[category] / len(visits)


def test_calibration_moves_each_category_toward_its_training_share(cohort, tiny_config):
    tok = PromptEHRTokenizer.from_patients(cohort)
    prior = CohortPrior.from_patients(cohort)
    torch.manual_seed(0)
    cfg = PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny_config, max_position_embeddings=128)
    model = PromptEHRForConditionalGeneration(cfg).eval()  # untrained: about 2 of 6 categories per visit
    calibration = fit_category_calibration(model, tok, cohort, 400, prior=prior, seed=1, progress=False)
    cat = tok.category_of(HYPERTENSION)
    assert set(calibration) == {tok.category_of(c) for c in [HYPERTENSION, *OTHERS]}
    # 401: 85% of training visits, about 1 in 3 generated; each other category: 20% of training visits
    assert 0.5 < calibration[cat] <= MAX_LOG_RATIO
    assert all(-MAX_LOG_RATIO <= v < 0 for k, v in calibration.items() if k != cat)

    def draw(**kw):
        ds, stats = generate_patients(model, tok, 400, prior=prior, seed=0, progress=False, times=False, **kw)
        return [v for visits in ds["visits"] for v in visits], stats

    plain, stats_plain = draw()
    calibrated, stats = draw(category_calibration=calibration)
    off, _ = draw(category_calibration=calibration, calibration=False)
    assert stats["calibration"] and not stats_plain["calibration"]
    assert off == plain  # calibration=False ignores the table, and the draw is the same
    before, after = _share(plain, tok.category_of, cat), _share(calibrated, tok.category_of, cat)
    assert before < 0.5 and after > before + 0.15, (before, after)


def test_calibration_row_sits_at_each_category_and_survives_the_config_file(cohort, tmp_path):
    tok = PromptEHRTokenizer.from_patients(cohort)
    index = VocabIndex(tok)
    cat = tok.category_of(HYPERTENSION)
    row = category_calibration_row({cat: 0.5, "not-a-category": 3.0}, tok, index)
    assert row.shape == (1, len(index.category_ids))
    pos = int(index.category_pos[tok.convert_tokens_to_ids(f"C:{cat}")])
    assert float(row[0, pos]) == pytest.approx(0.5) and float(row.abs().sum()) == pytest.approx(0.5)
    PromptEHRGenerationConfig(category_calibration={cat: 0.5}).save_pretrained(tmp_path)
    again = PromptEHRGenerationConfig.from_pretrained(tmp_path)
    assert again.category_calibration == {cat: 0.5} and again.calibration is True


def test_calibration_covers_procedure_and_medication_categories(cohort, tiny_config):
    # A procedure in 85% of visits (as hypertension above), the drugs each in a few.
    rng = np.random.default_rng(1)
    multimodal = [{**p, "procedures": [["3893"] if rng.random() < 0.85 else ["9904"]],
                   "medications": [[str(rng.choice(["ASPIRIN//ASA81", "HEPARIN//HEP5", "FUROSEMIDE//FURO40I"]))]]}
                  for p in cohort]
    modalities = ("diagnoses", "procedures", "medications")
    tok = PromptEHRTokenizer.from_patients(multimodal, modalities=modalities)
    prior = CohortPrior.from_patients(multimodal, modalities=modalities)
    torch.manual_seed(0)
    cfg = PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny_config, max_position_embeddings=128)
    model = PromptEHRForConditionalGeneration(cfg).eval()
    calibration = fit_category_calibration(model, tok, multimodal, 300, prior=prior, seed=1, progress=False)
    assert {"PX:38", "PX:99", "RX:ASPIRIN", "RX:HEPARIN", "RX:FUROSEMIDE"} <= set(calibration)
    # PX:38 is in 85% of training visits; an untrained model writes it in about half
    assert calibration["PX:38"] > 0 > calibration["PX:99"]
