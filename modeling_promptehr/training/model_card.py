"""The model folder's README.md (model card with the evaluation table) and its upload to the Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from promptehr_hf.metrics.report import markdown_table

SYSTEM_NAMES = {"icd9cm": ("ICD-9-CM", "icd-9"), "icd10cm": ("ICD-10-CM", "icd-10")}  # (prose, hub tag)


def model_card(args, run: dict, evaluation: dict | None, location: str) -> str:
    """README.md of the model folder: what it is, how it was trained, the evaluation table."""
    name, tag = SYSTEM_NAMES[run.get("code_system", "icd9cm")]
    modalities = run.get("modalities", ["diagnoses"])
    written = (f"hierarchical {name} codes (category, then code)" if len(modalities) == 1 else
               f"hierarchical codes (category, then code): {name} diagnoses, then "
               + " and ".join(m for m in modalities[1:]) + ", each a code type of its own")
    source = f"the MIMIC folder `{args.mimic_dir}`" if args.mimic_dir else (
        f"the built-in simulated MIMIC-III-like cohort in {name} ({args.patients:,} patients, seed {args.seed})")
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [promptehr, ehr, synthetic-data, {tag}, mimic-iii, remote-code]",
        "---",
        "",
        "# PromptEHR (promptehr-hf)",
        "",
        "A BART encoder-decoder with demographic prompts (PromptEHR, Wang & Sun 2022) that writes "
        f"synthetic patients visit by visit as {written}.",
        "",
        f"Trained on {source}: {run['train_patients']:,} training patients, "
        f"{run['train_examples']:,} (patient, visit) examples, preset `{args.preset}`, "
        f"{run['global_step']:,} optimizer steps in {run['train_minutes']:.1f} min on {run['world_size']} "
        f"process(es); loss = LM ({args.lm_loss} softmax) + {args.w_age} age + {args.w_sex} sex + {args.w_cooc} "
        "co-occurrence "
        f"({args.loss_weighting} weighting), code order `{args.code_order}`.",
        "",
        "```python",
        "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
        f"model = AutoModelForSeq2SeqLM.from_pretrained({location!r}, trust_remote_code=True)",
        f"tokenizer = AutoTokenizer.from_pretrained({location!r}, trust_remote_code=True)",
        "# with the promptehr-hf package: promptehr generate --model DIR --n 1000 --out synthetic/",
        "```",
        "",
        "Files: `cooccurrence.safetensors` (category co-occurrence counts of the training split), "
        "`cohort_prior.json` (age, sex, visit-count and visit-length distributions for unconditional "
        "generation)" + (", `time_model.safetensors` (stays, gaps and deaths drawn from each patient's codes: "
                         "four logistic heads fitted on the training split; `--outcome died` generates "
                         "in-hospital deaths only)." if run.get("times") else
                         "; no time model (the cohort had no times, or --no-time): the patients generated "
                         "carry no stays, gaps or deaths."),
        "",
    ]
    if evaluation is not None:  # the report's table, headings one level down
        lines += ["#" + line if line.startswith("#") else line for line in markdown_table(evaluation).splitlines()]
    else:
        lines += ["No evaluation was run for this model.", ""]
    return "\n".join(lines)


def push_to_hub(folder: Path, repo: str, private: bool) -> str:
    """One commit of the whole model folder (config, weights, remote code, tokenizer, card),
    through ``HfApi.create_repo`` and ``HfApi.create_commit`` (which uploads LFS/Xet content)."""
    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
                  for path in sorted(folder.rglob("*")) if path.is_file()]
    info = api.create_commit(repo_id=repo, repo_type="model", operations=operations,
                             commit_message="Upload PromptEHR model, tokenizer and model card")
    return str(getattr(info, "commit_url", info))
