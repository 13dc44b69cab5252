"""PromptEHRTrainer on a tiny model: every loss component logged by name, the co-occurrence loss
moves, scheduled/learned weights, exact resume from a checkpoint."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from promptehr_hf.datasets_scripts.schema import NO_TIMES
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.data import build_examples
from promptehr_hf.modeling_promptehr.training.losses import (
    category_cooccurrence,
    load_cooccurrence,
    tokenizer_categories,
)
from promptehr_hf.modeling_promptehr.training.trainer import (
    PromptEHRTrainer,
    checkpoint_problems,
    last_complete_checkpoint,
)
from promptehr_hf.modeling_promptehr.training.training_args import COMPONENTS, PromptEHRTrainingArguments
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CODES = ["4019", "25000", "41401", "4280", "42731", "5849", "2724", "51881", "0389", "99592", "486", "2859",
         "5990", "53081", "2449", "496"]


@pytest.fixture(scope="module")
def cohort(tiny_config):
    rng = random.Random(0)
    # Two clusters of codes that co-occur, so that some category pairs are frequent, others rare.
    groups = [CODES[:8], CODES[8:]]
    patients = []
    for i in range(160):
        g = groups[i % 2]
        visits = [rng.sample(g, rng.randint(2, 5)) + ([rng.choice(groups[1 - i % 2])] if rng.random() < 0.1 else [])
                  for _ in range(rng.randint(1, 3))]
        # Full schema dicts (time fields null): build_examples builds its Dataset with PATIENT_FEATURES.
        patients.append({"subject_id": i, "age": float(rng.randint(20, 90)), "sex": rng.choice("FM"),
                         "visits": visits, **NO_TIMES})
    tok = PromptEHRTokenizer.from_patients(patients)
    counts = category_cooccurrence(patients, tokenizer_categories(tok)[0])
    return patients, tok, counts, build_examples(patients, max_source_length=64), tiny_config


def make_trainer(cohort, out, trainer_kwargs=None, **overrides):
    patients, tok, counts, examples, tiny = cohort
    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(
        PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny, max_position_embeddings=128))
    kwargs = dict(output_dir=str(out), max_steps=8, per_device_train_batch_size=16, per_device_eval_batch_size=32,
                  logging_steps=1, learning_rate=3e-3, report_to=[], save_strategy="no", disable_tqdm=True,
                  max_source_length=64, max_target_length=32, dataloader_num_workers=0, seed=0,
                  eval_generate_patients=0)
    kwargs.update(overrides)
    args = PromptEHRTrainingArguments(**kwargs)
    return PromptEHRTrainer(model=model, args=args, processing_class=tok, cooccurrence_counts=counts,
                            train_dataset=examples, eval_dataset=examples.select(range(48)), **(trainer_kwargs or {}))


def test_trainer_state_holds_every_component_and_cooc_moves(cohort, tmp_path):
    # The co-occurrence loss alone (besides LM) with a tau large enough to grade every pair:
    # its value on a fixed evaluation set must fall, i.e. its gradient reaches the model.
    trainer = make_trainer(cohort, tmp_path, w_cooc=1.0, cooc_tau=1000.0, max_steps=10, eval_strategy="steps",
                           eval_steps=10, eval_on_start=True, save_strategy="steps", save_steps=10)
    trainer.train()
    state = json.loads((tmp_path / "checkpoint-10" / "trainer_state.json").read_text())
    train_logs = [h for h in state["log_history"] if "loss" in h]
    assert len(train_logs) == 10
    for h in train_logs:
        for c in COMPONENTS:
            for key in (f"loss_{c}", f"loss_{c}_weighted", f"loss_{c}_share", f"weight_{c}"):
                assert key in h, (key, h)
        # the weighted components add up to the logged total; shares to 1
        assert sum(h[f"loss_{c}_weighted"] for c in COMPONENTS) == pytest.approx(h["loss"], rel=1e-4)
        assert sum(h[f"loss_{c}_share"] for c in COMPONENTS) == pytest.approx(1.0)
    cooc = [h["loss_cooc"] for h in train_logs]
    assert len(set(cooc)) == len(cooc)  # changes at every step
    evals = [h for h in state["log_history"] if "eval_loss_cooc" in h]
    assert len(evals) == 2 and evals[1]["step"] == 10
    assert evals[1]["eval_loss_cooc"] < 0.9 * evals[0]["eval_loss_cooc"], evals
    # saved beside the weights, loadable
    counts, cats, ids = load_cooccurrence(str(tmp_path / "checkpoint-10"))
    assert counts.shape == (len(cats), len(cats)) and ids.tolist() == cohort[1].category_ids
    assert not (tmp_path / "checkpoint-10" / "training_args.bin").exists()  # JSON, not pickle
    assert (tmp_path / "checkpoint-10" / "training_args.json").exists()
    # Trainer's align_special_tokens must not turn the visit-level eos (</v>) into </s>
    config = json.loads((tmp_path / "checkpoint-10" / "config.json").read_text())
    assert config["eos_token_id"] == cohort[1].visit_end_id


def test_schedule_switches_a_component_off(cohort, tmp_path):
    trainer = make_trainer(cohort, tmp_path, loss_weighting="scheduled", loss_schedule="sex:0@3,age:0.5@5",
                           max_steps=6)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # the weight applied during step s (1-based) is the schedule's at global_step s - 1
    assert [h["weight_sex"] for h in logs] == pytest.approx([0.1, 0.1, 0.1, 0, 0, 0])
    assert [h["weight_age"] for h in logs] == pytest.approx([0.1] * 5 + [0.5])
    assert all(h["loss_sex_weighted"] == 0 and h["loss_sex"] > 0 for h in logs[3:])  # raw still logged
    assert logs[0]["loss_lm_vs_start"] == 1.0 and logs[-1]["loss_lm_vs_start"] < 1.0


def test_dead_component_warning(cohort, tmp_path, caplog):
    # with dead_loss_ratio=0.9 a component that lost 10% of its start counts as dead: some will
    trainer = make_trainer(cohort, tmp_path, max_steps=8, dead_loss_ratio=0.9, w_age=1.0, learning_rate=1e-2)
    with caplog.at_level("WARNING"):
        trainer.train()
    dead = [line for line in caplog.text.splitlines() if "no longer trains anything" in line]
    assert dead and len(dead) == len(set(dead))  # warned, once per component
    with pytest.raises(ValueError, match="loss_schedule"):
        PromptEHRTrainingArguments(output_dir=str(tmp_path), loss_weighting="scheduled", loss_schedule="nope:1@2")


def test_resume_continues_at_saved_step_with_same_state(cohort, tmp_path):
    # Learned (uncertainty) weighting: the log-variances are trained and must survive a resume.
    common = dict(loss_weighting="learned", max_steps=6, save_strategy="steps", save_steps=3,
                  code_order="shuffle", mask_prob=0.2, delete_prob=0.1)
    full = make_trainer(cohort, tmp_path / "full", **common)
    full.train()
    log_vars_full = full.loss_log_vars.detach().clone()
    assert not torch.allclose(log_vars_full, torch.tensor([0.0, 2.3026, 2.3026, 2.3026]), atol=1e-3)

    resumed = make_trainer(cohort, tmp_path / "resumed", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    new_steps = [h["step"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3]
    assert new_steps == [4, 5, 6]
    # Same data order, RNG, optimizer and scheduler state, loss weights: the same model at step 6.
    a = load_file(str(tmp_path / "full" / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoint-6" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    opt_a = torch.load(tmp_path / "full" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(tmp_path / "resumed" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for k in opt_a["state"]:
        assert opt_a["state"][k]["step"] == opt_b["state"][k]["step"] == 6
        torch.testing.assert_close(opt_a["state"][k]["exp_avg_sq"], opt_b["state"][k]["exp_avg_sq"], rtol=1e-4,
                                   atol=1e-9)
    torch.testing.assert_close(resumed.loss_log_vars.detach(), log_vars_full, rtol=0, atol=1e-6)


def _resume_last(cohort, out, caplog, *, interrupt=False, damage=None):
    """Train 6 steps saving at 3 and 6 (the save at 6 cut short by a SIGTERM with ``interrupt``,
    then ``damage`` done to checkpoint-6); resume with ``True`` ('last'): from checkpoint-3, with a
    warning naming checkpoint-6, on to step 6."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=3)
    first = make_trainer(cohort, out, **common)
    if interrupt:  # killed after the weights and optimizer, before the RNG and trainer state
        save_rng_state = first._save_rng_state

        def killed_at_6(output_dir):
            if first.state.global_step == 6:
                raise KeyboardInterrupt("SIGTERM")
            save_rng_state(output_dir)

        first._save_rng_state = killed_at_6
        with pytest.raises(KeyboardInterrupt):
            first.train()
        assert (out / "checkpoint-6" / "model.safetensors").exists()
    else:
        first.train()
    assert checkpoint_problems(str(out / "checkpoint-3")) == []
    if damage is not None:
        assert checkpoint_problems(str(out / "checkpoint-6")) == []
        damage(out / "checkpoint-6")
    assert checkpoint_problems(str(out / "checkpoint-6"))
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-3")

    resumed = make_trainer(cohort, out, **common)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert [h["step"] for h in resumed.state.log_history if "loss" in h and h["step"] > 3] == [4, 5, 6]
    assert resumed.state.global_step == 6
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "incomplete" in r.getMessage()]
    assert any(str(out / "checkpoint-6") in line for line in warned), caplog.text
    assert checkpoint_problems(str(out / "checkpoint-6")) == []  # saved again, complete


def test_resume_last_skips_an_interrupted_save(cohort, tmp_path, caplog):
    _resume_last(cohort, tmp_path, caplog, interrupt=True)


def test_resume_last_skips_a_checkpoint_with_lost_files(cohort, tmp_path, caplog):
    _resume_last(cohort, tmp_path, caplog, damage=lambda ckpt: (ckpt / "model.safetensors").unlink())


def test_checkpoint_marker_written_last_and_checked(cohort, tmp_path):
    trainer = make_trainer(cohort, tmp_path, max_steps=2, save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # rotation still works
    ckpt = tmp_path / "checkpoint-2"
    manifest = json.loads((ckpt / "checkpoint_complete.json").read_text())
    assert manifest["global_step"] == 2
    assert {"model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} \
        <= manifest["files"].keys()
    with open(ckpt / "optimizer.pt", "ab") as f:  # a file changed since the save
        f.write(b"x")
    assert checkpoint_problems(str(ckpt)) == [f"optimizer.pt has {manifest['files']['optimizer.pt'] + 1} bytes, "
                                              f"{manifest['files']['optimizer.pt']} when saved"]
    with pytest.raises(ValueError, match="No complete checkpoint"):
        make_trainer(cohort, tmp_path, max_steps=2).train(resume_from_checkpoint=True)


def test_length_grouped_batches_and_collapse_warning(cohort, tmp_path, caplog):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    patients = cohort[0]

    def collapsed(model, tokenizer, n, **kwargs):  # a collapsed generator: one code for everybody
        return [{"subject_id": i, "age": 60.0, "sex": "F", "visits": [["4019"]]} for i in range(n)]

    trainer = make_trainer(cohort, tmp_path, dict(eval_patients=patients[:50], generate_fn=collapsed), max_steps=2,
                           eval_strategy="steps", eval_steps=2, eval_generate_patients=16,
                           collapse_min_distinct_codes=5)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    with caplog.at_level("WARNING"):
        trainer.train()
    gen = [h for h in trainer.state.log_history if "gen_distinct_codes" in h]
    assert len(gen) == 1 and gen[0]["gen_distinct_codes"] == 1 and gen[0]["gen_collapse"] == 1
    assert gen[0]["gen_top_code_share"] == 1.0 and gen[0]["gen_distinct_codes_real"] > 5
    assert "MODE COLLAPSE" in caplog.text


def _fake_clock(monkeypatch, monotonic):
    import types

    from promptehr_hf.modeling_promptehr.training import callbacks as trainer_module

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(monotonic=monotonic, perf_counter=lambda: 0.0))


def test_time_budget_shortens_the_schedule(cohort, tmp_path, monkeypatch):
    clock = iter(range(10**6))  # a fake clock: every reading is one second after the previous one
    _fake_clock(monkeypatch, lambda: float(next(clock)))
    # 100 s of budget at 1 s per step: after 5 warm-up steps and 20 more, 25 + 0.95 * 75 = 96 steps fit, not
    # 1000; later plans (every 5 s) keep 5% of the remaining time in hand: 90 + 0.95 * 10 = 99 at step 90
    trainer = make_trainer(cohort, tmp_path, max_steps=1000, max_minutes=100 / 60, logging_steps=1,
                           warmup_steps=10)
    trainer.train()
    assert trainer.state.global_step == trainer.state.max_steps == 99
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[-1] < 0.1 * max(lrs)  # the schedule decayed inside the budget


def test_time_budget_replans_as_the_pace_changes(cohort, tmp_path, monkeypatch):
    # reading k (train begin, then one per step): 2 s per step for 50 steps, then 0.5 s per step
    readings = iter([2.0 * k if k <= 50 else 100 + 0.5 * (k - 50) for k in range(10**4)])
    _fake_clock(monkeypatch, lambda: next(readings))
    trainer = make_trainer(cohort, tmp_path, max_steps=1000, max_minutes=150 / 60, logging_steps=10,
                           eval_strategy="steps", eval_steps=60, per_device_eval_batch_size=48)
    trainer.train()
    # first plan at step 25 (2 s/step): 25 + 0.95 * 100 / 2 = 72 steps; once the steps take 0.5 s the plans
    # grow, to 145 steps in 147.5 s
    assert trainer.state.global_step == trainer.state.max_steps == 145
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[-1] < 0.1 * max(lrs)


@pytest.mark.parametrize("pace", ["slow_first_step", "costlier_later"])
def test_time_budget_is_used_and_the_schedule_decays(cohort, tmp_path, monkeypatch, pace):
    # Step costs in seconds of a fake clock read at the current step. slow_first_step: a GPU whose first step
    # starts CUDA (a third of the budget), the rest fast. costlier_later: length-grouped batches on a CPU, cheap
    # ones first, then groups of 25 batches from long (slow) to short.
    rng = random.Random(0)
    if pace == "slow_first_step":
        costs = [20.0] + [0.2 * rng.uniform(0.7, 1.3) for _ in range(10**4)]
    else:
        costs = [5.0] + [0.1] * 49 + [(1.2 - 0.8 * (i % 25) / 24) * rng.uniform(0.8, 1.2) for i in range(10**4)]
    clock = list(itertools.accumulate(costs, initial=0.0))  # clock[k]: the time at the end of step k
    _fake_clock(monkeypatch, lambda: clock[trainer.state.global_step])
    budget = 60.0
    trainer = make_trainer(cohort, tmp_path, max_steps=10**4, max_minutes=budget / 60, logging_steps=1,
                           warmup_steps=5)
    trainer.train()
    used = clock[trainer.state.global_step] / budget
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    print(f"{pace}: {trainer.state.global_step} steps of {trainer.state.max_steps} planned, {used:.1%} of the "
          f"budget, last learning rate {lrs[-1] / max(lrs):.2%} of the peak")
    assert 0.9 <= used <= 1.0 + costs[trainer.state.global_step] / budget
    assert lrs[-1] < 0.1 * max(lrs)
