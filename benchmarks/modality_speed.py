"""Cost per token with one modality vs three: does a patient cost more only because it has more tokens?

The same simulated patients, once as diagnoses alone and once with their procedures and
medications (tokenizer, co-occurrence counts, training examples, cohort prior and model each built
for that setting, as ``promptehr train`` builds them; the small preset, random initial weights).

- Training: forward + backward + AdamW step with the full loss (``PromptEHRTrainer.compute_loss``:
  LM + age + sex + co-occurrence) on the same (patient, visit) examples, collated for each setting;
  tokens = encoder tokens + target tokens.
- Generation: ``generate_patients`` (unconditional, visit lengths and, with three modalities, the
  procedure and medication counts from the prior; CMS edits on); tokens = the decoder tokens of
  every generated visit (``<v>``, two per code, ``</v>``).

A third setting, ``three_modalities_grammar_lm``, trains the three-modality model with the
grammar-restricted LM loss (``lm_loss="grammar"``: each position's softmax over the tokens the grammar
allows there) on the same batches; ``grammar_lm_train_speedup`` is its training tokens per CPU second
over the default's (the whole-vocabulary softmax).

Both are timed in CPU seconds of this process (``time.process_time``, robust to other jobs on a
shared machine), the two settings alternating round by round; the figure is each setting's tokens
per CPU second (median over rounds) and their ratio, three modalities over one. The goal: within 20%
(ratio >= 0.8).

    python benchmarks/modality_speed.py [--patients 4000] [--batches 6] [--generate 200] [--rounds 3]

Writes benchmarks/results/modality_speed.json.
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
from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients, save_custom_generate
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.data import PromptEHRDataCollator, build_examples
from promptehr_hf.modeling_promptehr.training.losses import category_cooccurrence, tokenizer_categories
from promptehr_hf.modeling_promptehr.training.pipeline import target_length
from promptehr_hf.modeling_promptehr.training.trainer import PromptEHRTrainer, PromptEHRTrainingArguments
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

OUT = Path(__file__).resolve().parent / "results" / "modality_speed.json"
THREE = ("diagnoses", "procedures", "medications")
SETTINGS = {"one_modality": ("diagnoses",), "three_modalities": THREE}
GOAL_RATIO = 0.8


def build(patients: list[dict], modalities: tuple[str, ...], n_batches: int, batch_size: int, tmp: str,
          lm_loss: str = "full") -> dict:
    """Tokenizer, model, trainer (for its loss), collated batches and prior of one setting."""
    tok = PromptEHRTokenizer.from_patients(patients, modalities=modalities)
    merged = [{**p, "visits": tok.merge_visits(p)} for p in patients]
    multimodal = len(modalities) > 1
    counts = category_cooccurrence(merged, tokenizer_categories(tok)[0],
                                   category=tok.category_of if multimodal else None)
    max_target = target_length({"visits": [p["visits"] for p in merged]}, multimodal)
    examples = build_examples(merged, max_source_length=256, max_target_length=max_target).shuffle(seed=0)
    collate = PromptEHRDataCollator(tok, code_order="shuffle", mask_prob=0.15, delete_prob=0.1,
                                    max_target_length=max_target)
    batches = [collate([examples[i] for i in range(b * batch_size, (b + 1) * batch_size)]) for b in range(n_batches)]
    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(PromptEHRConfig.from_preset("small", tokenizer=tok))
    trainer = PromptEHRTrainer(model=model, processing_class=tok, cooccurrence_counts=counts,
                               args=PromptEHRTrainingArguments(output_dir=tmp, report_to=[], w_cooc=0.1, use_cpu=True,
                                                               max_target_length=max_target, lm_loss=lm_loss))
    model.generation_config = save_custom_generate(tmp, tok)  # the CMS edits of this vocabulary
    return {"tokenizer": tok, "model": model, "trainer": trainer, "batches": batches,
            "optim": torch.optim.AdamW(model.parameters(), lr=1e-4),
            "prior": CohortPrior.from_patients(patients, modalities=modalities),
            "tokens_per_batch": [int(b["attention_mask"].sum() + (b["labels"] != -100).sum()) for b in batches],
            "max_target_length": max_target}


def train_round(s: dict) -> float:
    """CPU seconds of one pass over the setting's batches."""
    s["model"].train()
    c0 = time.process_time()
    for batch in s["batches"]:
        s["trainer"].compute_loss(s["model"], batch).backward()
        s["optim"].step()
        s["optim"].zero_grad(set_to_none=True)
    return time.process_time() - c0


def generate_round(s: dict, n: int, seed: int) -> tuple[float, int, float]:
    """(CPU seconds, decoder tokens written, codes per visit) of one generation of ``n`` patients."""
    c0 = time.process_time()
    patients, _ = generate_patients(s["model"], s["tokenizer"], n, prior=s["prior"], seed=seed, progress=False,
                                    times=False)
    seconds = time.process_time() - c0
    fields = [f for f in ("visits", "procedures", "medications") if patients[0].get(f) is not None]
    codes = [sum(len(p[f][k]) for f in fields) for p in patients for k in range(len(p["visits"]))]
    return seconds, sum(2 * c + 2 for c in codes), sum(codes) / len(codes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patients", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=6, help="training batches per round")
    p.add_argument("--generate", type=int, default=200, help="patients generated per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per setting")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    patients = simulate(args.patients, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: build(patients, modalities, args.batches, args.batch_size, str(Path(tmp, name)))
                for name, modalities in SETTINGS.items()}
        grammar_lm = build(patients, THREE, args.batches, args.batch_size, str(Path(tmp, "grammar_lm")),
                           lm_loss="grammar")
        for s in [*runs.values(), grammar_lm]:  # warm-up
            train_round(s)
        for s in runs.values():
            generate_round(s, 20, seed=99)
        train_cpu = {name: [] for name in runs}
        grammar_cpu = []
        gen = {name: [] for name in runs}
        for r in range(args.rounds):
            for name, s in runs.items():
                train_cpu[name].append(train_round(s))
                gen[name].append(generate_round(s, args.generate, seed=r))
            grammar_cpu.append(train_round(grammar_lm))

    out = {"patients": args.patients, "batch_size": args.batch_size, "batches_per_round": args.batches,
           "generated_patients_per_round": args.generate, "rounds": args.rounds, "torch_threads": args.threads,
           "goal": f"three-modality tokens per CPU second >= {GOAL_RATIO} x one-modality's (training and generation)"}
    for name, s in runs.items():
        tokens = sum(s["tokens_per_batch"])
        out[name] = {
            "modalities": list(SETTINGS[name]),
            "vocab_size": len(s["tokenizer"]),
            "categories": len(s["tokenizer"].category_ids),
            "max_target_length": s["max_target_length"],
            "train_tokens_per_batch": tokens / len(s["batches"]),
            "train_cpu_seconds_per_round": train_cpu[name],
            "train_tokens_per_cpu_second": statistics.median(tokens / c for c in train_cpu[name]),
            "generate_cpu_seconds_per_round": [g[0] for g in gen[name]],
            "generate_tokens_per_round": [g[1] for g in gen[name]],
            "generated_codes_per_visit": statistics.mean(g[2] for g in gen[name]),
            "generate_tokens_per_cpu_second": statistics.median(g[1] / g[0] for g in gen[name]),
        }
    one, three = out["one_modality"], out["three_modalities"]
    for kind in ("train", "generate"):
        ratio = three[f"{kind}_tokens_per_cpu_second"] / one[f"{kind}_tokens_per_cpu_second"]
        out[f"{kind}_ratio"] = ratio
        out[f"{kind}_meets_goal"] = ratio >= GOAL_RATIO
    out["train_tokens_per_patient_ratio"] = three["train_tokens_per_batch"] / one["train_tokens_per_batch"]
    out["three_modalities_grammar_lm"] = {
        "lm_loss": "grammar",
        "train_cpu_seconds_per_round": grammar_cpu,
        "train_tokens_per_cpu_second": statistics.median(sum(grammar_lm["tokens_per_batch"]) / c
                                                         for c in grammar_cpu),
    }
    out["grammar_lm_train_speedup"] = (out["three_modalities_grammar_lm"]["train_tokens_per_cpu_second"]
                                       / three["train_tokens_per_cpu_second"])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
