"""Cost of the full PromptEHR loss vs plain LM loss per training step, on the same batches.

Plain: the small preset without auxiliary heads, loss = LM cross-entropy. Full: the small preset
with the age and sex heads, loss recombined by PromptEHRTrainer.compute_loss = LM + age + sex +
co-occurrence (the category co-occurrence loss over all K categories of a 20,000-patient
simulated cohort's vocabulary). Both run forward + backward + AdamW step on the same collated
batches, alternating plain/full rounds so that load from other processes hits both alike.
Each step is timed in CPU seconds of this process (``time.process_time``, all threads: robust to
other jobs on a shared machine, which make wall times swing 10x) and in wall seconds; the goal,
full <= 1.3 x plain, is judged on the median CPU time (the minimum wall time is given beside it).

    python benchmarks/train_step_cost.py [--patients 20000] [--batch-size 32] [--batches 8] [--rounds 3]

Writes benchmarks/results/train_step_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.data import PromptEHRDataCollator, build_examples
from promptehr_hf.modeling_promptehr.training.losses import category_cooccurrence, tokenizer_categories
from promptehr_hf.modeling_promptehr.training.trainer import PromptEHRTrainer, PromptEHRTrainingArguments
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

OUT = Path(__file__).resolve().parent / "results" / "train_step_cost.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="batches per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating plain/full rounds")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: CPU seconds are not inflated by threads spinning on a busy machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    patients = simulate(args.patients, seed=0)
    tok = PromptEHRTokenizer.from_patients(patients)
    counts = category_cooccurrence(patients, tokenizer_categories(tok)[0])
    examples = build_examples(patients, max_source_length=256).shuffle(seed=0)
    collate = PromptEHRDataCollator(tok, code_order="shuffle", mask_prob=0.15, delete_prob=0.1)
    batches = [collate([examples[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
               for b in range(args.batches)]
    tokens = sum(int(b["attention_mask"].sum() + (b["labels"] != -100).sum()) for b in batches)

    torch.manual_seed(0)
    plain = PromptEHRForConditionalGeneration(
        PromptEHRConfig.from_preset("small", tokenizer=tok, age_feature_index=None, sex_feature_index=None))
    torch.manual_seed(0)
    full = PromptEHRForConditionalGeneration(PromptEHRConfig.from_preset("small", tokenizer=tok))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = PromptEHRTrainer(
            model=full, processing_class=tok, cooccurrence_counts=counts,
            args=PromptEHRTrainingArguments(output_dir=tmp, report_to=[], w_cooc=0.1, use_cpu=True),
        )

    def plain_loss(batch):
        return plain(**batch).loss

    def full_loss(batch):
        return trainer.compute_loss(full, batch)

    runs = {"plain_lm": (plain, plain_loss), "full": (full, full_loss)}
    optim = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in runs.items()}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}

    def step(name, batch):
        model, loss_fn = runs[name]
        c0, t0 = time.process_time(), time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        optim[name].step()
        optim[name].zero_grad(set_to_none=True)
        cpu[name].append(time.process_time() - c0)
        wall[name].append(time.perf_counter() - t0)

    for name in runs:  # warm-up
        runs[name][0].train()
        for batch in batches[:2]:
            step(name, batch)
        cpu[name].clear()
        wall[name].clear()
    for _ in range(args.rounds):
        for name in runs:
            for batch in batches:
                step(name, batch)

    # The co-occurrence loss alone (forward + backward on the logits), for the record.
    with torch.no_grad():
        logits = full(**batches[0]).logits
    cooc_cpu = []
    for _ in range(10):
        x = logits.detach().requires_grad_(True)
        c0 = time.process_time()
        trainer.cooc_loss(x, batches[0]["labels"]).backward()
        cooc_cpu.append(time.process_time() - c0)

    med = {name: statistics.median(t) for name, t in cpu.items()}
    fastest = {name: min(t) for name, t in wall.items()}
    result = {
        "patients": args.patients,
        "vocab_size": len(tok),
        "categories": len(tok.category_ids),
        "batch_size": args.batch_size,
        "steps_timed_per_mode": len(cpu["full"]),
        "torch_threads": args.threads,
        "tokens_per_batch_mean": tokens / len(batches),
        "plain_lm_step_cpu_seconds_median": med["plain_lm"],
        "full_step_cpu_seconds_median": med["full"],
        "full_over_plain": med["full"] / med["plain_lm"],
        "extra_cost_share": med["full"] / med["plain_lm"] - 1.0,
        "goal_extra_cost_share_max": 0.30,
        "meets_goal": med["full"] / med["plain_lm"] - 1.0 <= 0.30,
        "plain_lm_step_wall_seconds_min": fastest["plain_lm"],
        "full_step_wall_seconds_min": fastest["full"],
        "full_over_plain_wall_min": fastest["full"] / fastest["plain_lm"],
        "cooc_loss_forward_backward_cpu_seconds_median": statistics.median(cooc_cpu),
        "plain_lm_tokens_per_wall_second_best": tokens / len(batches) / fastest["plain_lm"],
        "step_cpu_seconds": cpu,
        "step_wall_seconds": wall,
        "note": "forward + backward + AdamW step, same batches, alternating rounds; CPU seconds of this process "
                "(all threads); the machine was shared with other jobs",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("step_")}, indent=1))


if __name__ == "__main__":
    main()
