"""Parameter counts of the PromptEHR presets, and CPU training/generation speed of "small".

For each preset: parameters without the token embeddings (the size that does not depend on the
vocabulary; positional embeddings, prompts and aux heads included), the token-embedding cost per
vocabulary entry (d_model; the LM head is tied to it) and totals at two vocabulary sizes: a
demo-scale one and full MIMIC-III scale (7 specials + 943 categories + 6,985 codes + 943 category
catch-alls, figures from ../shared/mimic3_reference.md). Counted on the meta device: nothing is
allocated. Then a few timed training steps and a timed generate() of the small preset on the CPU
threads available. Prints a table and writes benchmarks/results/model_size.json.

    python benchmarks/model_size.py [--steps 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from promptehr_hf.modeling_promptehr.configuration_promptehr import PRESETS, PromptEHRConfig
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "model_size.json"
VOCAB_SIZES = {"demo_scale": 1500, "mimic3_scale": 7 + 943 + 6985 + 943}


def parameter_counts(name: str) -> dict:
    with torch.device("meta"):
        model = PromptEHRForConditionalGeneration(PromptEHRConfig.from_preset(name, vocab_size=1000))
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    embeddings = model.model.shared.weight.numel()
    modules = {
        "encoder_prompt": model.model.encoder.prompt,
        "decoder_prompt": model.model.decoder.prompt,
        "encoder_layers": model.model.encoder.layers,
        "decoder_layers": model.model.decoder.layers,
    }
    d_model = model.config.d_model
    without = total - embeddings
    return {
        "hyperparameters": PRESETS[name],
        "params_without_token_embeddings": without,
        "token_embedding_params_per_vocab_entry": d_model,
        "params_by_part": {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()},
        "total_params": {k: without + v * d_model for k, v in VOCAB_SIZES.items()},
    }


def small_speed(steps: int, batch: int, enc_len: int = 128, dec_len: int = 24) -> dict:
    """Training tokens/s (encoder + decoder tokens) and generation time of the small preset."""
    torch.manual_seed(0)
    vocab = VOCAB_SIZES["mimic3_scale"]
    model = PromptEHRForConditionalGeneration(PromptEHRConfig.from_preset("small", vocab_size=vocab))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = {
        "input_ids": torch.randint(7, vocab, (batch, enc_len)),
        "attention_mask": torch.ones(batch, enc_len, dtype=torch.long),
        "labels": torch.randint(7, vocab, (batch, dec_len)),
        "x_num": torch.rand(batch, 1) * 90,
        "x_cat": torch.randint(0, 2, (batch, 1)),
    }
    model.train()
    model(**inputs).loss.backward()  # warm-up
    optim.zero_grad()
    t0 = time.perf_counter()
    for _ in range(steps):
        model(**inputs).loss.backward()
        optim.step()
        optim.zero_grad()
    train_s = time.perf_counter() - t0
    model.eval()
    gen_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(**gen_inputs, max_new_tokens=dec_len, min_new_tokens=dec_len, do_sample=True)
    gen_s = time.perf_counter() - t0
    return {
        "batch": batch,
        "encoder_tokens": enc_len,
        "decoder_tokens": dec_len,
        "vocab_size": vocab,
        "train_steps": steps,
        "train_seconds_per_step": train_s / steps,
        "train_tokens_per_second": steps * batch * (enc_len + dec_len) / train_s,
        "generate_seconds": gen_s,
        "generated_tokens_per_second": batch * dec_len / gen_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    result = {
        "vocab_sizes": VOCAB_SIZES,
        "presets": {name: parameter_counts(name) for name in PRESETS},
        "small_cpu_speed": small_speed(args.steps, args.batch),
        "machine": {
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            # Speed figures are only comparable at a similar load (the machine is shared).
            "load_average_1min_after": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    for name, r in result["presets"].items():
        totals = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in r["total_params"].items())
        print(f"{name:6s} {r['params_without_token_embeddings'] / 1e6:6.2f}M without token embeddings; total {totals}")
    speed = result["small_cpu_speed"]
    print(
        f"small on {torch.get_num_threads()} threads: {speed['train_tokens_per_second']:.0f} train tokens/s "
        f"({speed['train_seconds_per_step']:.2f} s/step, batch {speed['batch']}), "
        f"generate {speed['generated_tokens_per_second']:.0f} tokens/s"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
