"""Training examples and their collator: one example per visit, code orders, noise, padding."""

from __future__ import annotations

import os

import datasets
import pytest
import torch

from promptehr_hf.datasets_scripts.schema import NO_TIMES
from promptehr_hf.modeling_promptehr.training.data import PromptEHRDataCollator, build_examples
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

# Full schema dicts (time fields null): build_examples builds its Dataset with PATIENT_FEATURES,
# which now lists the time fields.
PATIENTS = [
    {"subject_id": 1, "age": 67.0, "sex": "M",
     "visits": [["4019", "25000", "41401"], ["4280", "42731", "5849", "4019"]], **NO_TIMES},
    {"subject_id": 2, "age": 0.0, "sex": "F", "visits": [["V3000", "7742"]], **NO_TIMES},
    {"subject_id": 3, "age": 45.5, "sex": "F", "visits": [["486", "51881"], ["0389", "99592", "78552"], ["2724"]],
     **NO_TIMES},
]


@pytest.fixture(scope="module")
def tok():
    return PromptEHRTokenizer.from_patients(PATIENTS)


def test_one_example_per_visit_with_lengths():
    ex = build_examples(PATIENTS, max_source_length=256)
    assert len(ex) == 6
    assert ex["subject_id"] == [1, 1, 2, 3, 3, 3]
    assert ex[1]["visits"] == PATIENTS[0]["visits"]  # history + target last
    assert ex[0]["visits"] == PATIENTS[0]["visits"][:1]
    # first visit of patient 1: <s> </s> + <v> 3 pairs </v>; second: (2 + 8) + (2 + 8)
    assert ex["length"][:2] == [2 + 8, 10 + 10]
    capped = build_examples(PATIENTS, max_source_length=4)
    assert capped["length"][1] == 4 + 10


def test_examples_of_a_dataset_on_disk_write_no_cache_file(tmp_path):
    """Patients memory-mapped from Arrow files: the examples stay in memory, and nothing (no
    cache-*.arrow of the patient rows) is written beside those files or anywhere else."""
    folder = tmp_path / "patients"
    datasets.Dataset.from_list(PATIENTS).save_to_disk(str(folder))
    on_disk = datasets.load_from_disk(str(folder))
    assert on_disk.cache_files  # file-backed: datasets would cache a map next to it
    before = sorted(os.listdir(folder))
    ex = build_examples(on_disk)
    assert len(ex) == 6 and not ex.cache_files
    assert sorted(os.listdir(folder)) == before


def test_collator_shapes_and_demographics(tok):
    ex = build_examples(PATIENTS)
    batch = PromptEHRDataCollator(tok)([ex[i] for i in range(len(ex))])
    B = len(ex)
    assert batch["input_ids"].shape[0] == B and batch["labels"].shape[0] == B
    assert batch["x_num"].tolist()[0] == [67.0] and batch["x_cat"].squeeze(1).tolist() == [1, 1, 0, 0, 0, 0]
    # target visit is the labels, history the encoder
    assert tok.decode_visits(batch["labels"][1]) == [PATIENTS[0]["visits"][1]]
    assert tok.decode_visits(batch["input_ids"][1]) == [PATIENTS[0]["visits"][0]]
    assert batch["input_ids"][0, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]  # empty history
    assert (batch["attention_mask"].sum(1) == (batch["input_ids"] != tok.pad_token_id).sum(1)).all()
    assert (batch["labels"][2] == -100).sum() > 0  # padded


def test_code_orders(tok):
    ex = build_examples(PATIENTS)
    feats = [ex[1]]
    hier = PromptEHRDataCollator(tok, code_order="hierarchical")(feats)
    assert tok.decode_visits(hier["labels"][0])[0] == sorted(PATIENTS[0]["visits"][1])
    shuf = PromptEHRDataCollator(tok, code_order="shuffle")
    orders = {tuple(tok.decode_visits(row)[0]) for row in shuf(feats * 20)["labels"]}
    assert len(orders) > 3  # a fresh permutation for each example
    assert all(sorted(o) == sorted(PATIENTS[0]["visits"][1]) for o in orders)
    # a function of (seed, epoch, examples): reproducible, and new at every epoch
    shuf = PromptEHRDataCollator(tok, code_order="shuffle", seed=3)
    first = shuf(feats * 8)["labels"]
    assert torch.equal(first, PromptEHRDataCollator(tok, code_order="shuffle", seed=3)(feats * 8)["labels"])
    shuf.epoch = 1
    assert not torch.equal(first, shuf(feats * 8)["labels"])
    with pytest.raises(ValueError, match="code_order"):
        PromptEHRDataCollator(tok, code_order="random")


def test_noise_touches_only_codes(tok):
    ex = build_examples(PATIENTS)
    feats = [ex[5]] * 50
    structure = {tok.bos_token_id, tok.eos_token_id, tok.visit_start_id, tok.visit_end_id}
    clean = PromptEHRDataCollator(tok)(feats[:1])["input_ids"][0]
    masked = PromptEHRDataCollator(tok, mask_prob=0.5)(feats)["input_ids"]
    assert (masked == tok.mask_token_id).any()
    for row in masked:
        assert [t for t in row.tolist() if t in structure] == [t for t in clean.tolist() if t in structure]
    deleted = PromptEHRDataCollator(tok, delete_prob=0.5)(feats)
    lengths = deleted["attention_mask"].sum(1)
    assert lengths.min() < len(clean) and (lengths >= 6).all()  # <s> <v> </v> <v> </v> </s> survive
    off = PromptEHRDataCollator(tok, mask_prob=0.5, delete_prob=0.5, noise=False)(feats[:1])["input_ids"][0]
    assert torch.equal(off, clean)


def test_keep_part_of_target(tok):
    ex = build_examples(PATIENTS)
    batch = PromptEHRDataCollator(tok, keep_target_prob=1.0, keep_target_frac=1.0)([ex[1]] * 20)
    target = PATIENTS[0]["visits"][1]
    for row, lab in zip(batch["input_ids"], batch["labels"]):
        visits = tok.decode_visits(row)
        assert len(visits) == 2 and 1 <= len(visits[1]) < len(target) and set(visits[1]) <= set(target)
        assert tok.decode_visits(lab) == [target]
