"""Train PromptEHR end to end: cohort -> prepare -> tokenizer -> model -> train -> generate -> evaluate.

    promptehr train                                          # simulated cohort, small preset, ~15 min on 2 cores
    promptehr train --mimic-dir DIR                          # a real MIMIC-III, MIMIC-IV or MEDS folder
    promptehr train --code-system icd10cm                    # the simulated cohort in ICD-10-CM
    promptehr train --modalities diagnoses                   # diagnoses only, whatever the cohort holds
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train.py ...   # 2 CPU processes

With no ``--mimic-dir`` the built-in simulator draws the default cohort and writes it as MIMIC-III
CSVs (ICD-9-CM), or with ``--code-system icd10cm`` its ICD-10-CM version as a MIMIC-IV folder,
which then go through ``prepare`` exactly as a real user's folder does. The model learns every
modality the cohort holds (diagnoses, and procedures and medications when their tables were read;
``--modalities`` chooses), each visit written as its diagnoses, then its procedures, then its
medications. The cohort's code system
(``code_system`` of data/summary.json; ICD-9-CM when absent) is the tokenizer's, and sets the
categories, the CMS edits written into the model and the tables the evaluation scores against.
Everything lands in ``--output-dir`` (default ``promptehr_run/``):

    mimic3/        the simulated MIMIC-III CSVs (simulated ICD-9-CM runs only)
    mimic4/        the simulated MIMIC-IV folder, hosp/*.csv.gz (simulated ICD-10-CM runs only)
    data/          prepared splits: {train,validation,test}.parquet, summary.json
    checkpoints/   Trainer checkpoints (resume with --resume-from-checkpoint last|DIR)
    model/         the final model: config + safetensors + remote code, tokenizer,
                   cooccurrence.safetensors, cohort_prior.json, time_model.safetensors (stays, gaps
                   and deaths from the codes, calibrated on generated patients; when the cohort has
                   times and no --no-time),
                   generation_config.json (the generation settings and CMS edits) and
                   custom_generate/ (the generation code: the folder generates patients without
                   this package), README.md (model card with metrics)
    synthetic/     the generated cohort (MIMIC CSVs + synthetic.parquet)
    evaluation/    metrics.json, metrics.md, PNG plots (synthetic vs the real test split,
                   with the real floor and the independent-marginal baseline)
    run_summary.json   world size, steps, timings, final losses, headline metrics
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from promptehr_hf.datasets_scripts.code_systems import CODE_SYSTEMS, DEFAULT_CODE_SYSTEM
from promptehr_hf.datasets_scripts.cohort_io import write_mimic3_csvs, write_mimic4_csvs
from promptehr_hf.datasets_scripts.mimic3 import find_tables
from promptehr_hf.datasets_scripts.prepare import load_prepared, prepare, stale_reasons
from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.file_utils import check_replaceable, check_separate, write_json_atomic, write_text_atomic
from promptehr_hf.metrics.perplexity import DEFAULT_PATIENTS as PERPLEXITY_PATIENTS
from promptehr_hf.metrics.perplexity import perplexity
from promptehr_hf.metrics.report import evaluate_cohorts
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.command import write_cohort
from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients, save_custom_generate
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.times import TIME_MODEL_FILE, has_times
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.tokenization.tokenization_promptehr import MODALITIES, PromptEHRTokenizer, merge_visits

from .calibration import (
    DEFAULT_CALIBRATION_PATIENTS,
    MULTIMODAL_CALIBRATION_PATIENTS,
    TIME_CALIBRATION_SHARE,
    default_calibration_patients,
    fit_category_calibration,
    fit_time_calibration,
)
from .data import build_examples
from .losses import category_cooccurrence, tokenizer_categories
from .model_card import model_card, push_to_hub
from .time_model import fit_time_model
from .trainer import PromptEHRTrainer
from .training_args import PromptEHRTrainingArguments
from .visit_types import DEFAULT_MIN_VISITS, auto_types, fit_visit_types, type_logit_bias

DEFAULT_PATIENTS = 20_000
DEFAULT_MAX_MINUTES = 9.0  # training budget: leaves room for data, generation and evaluation in 15 min
UNBOUNDED_STEPS = 1_000_000  # without --max-steps the time budget sets the schedule's length
SPLIT_FRACTIONS = (0.1, 0.1)  # validation and test shares of the prepared cohort
DEFAULT_TARGET_LENGTH = 96  # decoder tokens of a diagnosis-only target visit

logger = logging.getLogger("promptehr.train")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``promptehr train`` (and of ``examples/train.py``)."""
    data = p.add_argument_group("data")
    data.add_argument("--mimic-dir", help="real MIMIC-III, MIMIC-IV or MEDS folder, read as `promptehr prepare` reads "
                                          "it (MIMIC-IV ICD-9 rows mapped to ICD-10-CM); default: simulate a cohort")
    data.add_argument("--code-system", choices=tuple(CODE_SYSTEMS), default=None,
                      help=f"code system of the simulated cohort (default {DEFAULT_CODE_SYSTEM}; icd10cm: its codes "
                           "mapped through the CMS GEMs); a --mimic-dir folder's is read from the folder")
    data.add_argument("--no-time", action="store_true",
                      help="diagnoses only: fit no time model, so the generated patients have no stays, gaps or "
                           "deaths (a cohort read without times trains this way anyway)")
    data.add_argument("--modalities", nargs="+", choices=MODALITIES, default=None,
                      help="what the model learns and generates: 'diagnoses' alone, or with 'procedures' and/or "
                           "'medications' (in that order); default: every modality the cohort holds")
    data.add_argument("--patients", type=int, default=DEFAULT_PATIENTS, help="size of the simulated cohort")
    data.add_argument("--seed", type=int, default=0, help="simulation, split, training and generation seed")
    data.add_argument("--min-code-count", type=int, default=1, help="rarer codes fold into their category token")
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", default="promptehr_run")
    out.add_argument("--push-to-hub", metavar="REPO", help="upload the final model folder (with its model card)")
    out.add_argument("--hub-private", action="store_true", help="create the hub repository as private")
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="small", choices=("small", "base"))
    model.add_argument("--visit-types", type=int, default=None,
                       help="visit types the model is conditioned on (a Bernoulli mixture of the training visits; "
                            "0: none; default: about one per 100 training visits, a power of two in [32, 256])")
    model.add_argument("--visit-type-modalities", default="all",
                       help="the modalities whose codes the visit types are fitted on: 'all' (every modality of "
                            "the cohort), or a comma-separated list holding diagnoses (e.g. 'diagnoses')")
    model.add_argument("--visit-type-min-visits", type=int, default=DEFAULT_MIN_VISITS,
                       help="a visit type must hold at least this many training visits")
    model.add_argument("--config-overrides", default=None,
                       help='JSON of PromptEHRConfig fields, e.g. \'{"d_model": 64, "encoder_layers": 1}\'')
    train = p.add_argument_group("training")
    train.add_argument("--max-steps", type=int, default=None,
                       help="optimizer steps, the learning-rate schedule's length (default: as many as fit in "
                            "--max-minutes)")
    train.add_argument("--max-minutes", type=float, default=DEFAULT_MAX_MINUTES,
                       help="training time budget: the schedule is shortened to the steps that fit (measured "
                            "as training goes) and training stops, saving a checkpoint, when it is spent; 0: none")
    train.add_argument("--batch-size", type=int, default=32, help="per process")
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=5e-4)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--code-order", default="shuffle", choices=("seq_num", "shuffle", "hierarchical"))
    train.add_argument("--lm-loss", default="full", choices=("full", "grammar"),
                       help="'full': each position's softmax covers the whole vocabulary; 'grammar': the tokens "
                            "the visit grammar allows there (what generation samples from; faster per step)")
    train.add_argument("--w-age", type=float, default=0.1)
    train.add_argument("--w-sex", type=float, default=0.1)
    train.add_argument("--w-cooc", type=float, default=0.1)
    train.add_argument("--loss-weighting", default="fixed", choices=("fixed", "scheduled", "learned"))
    train.add_argument("--loss-schedule", default=None, help="scheduled weighting, e.g. 'sex:0@500,cooc:0.05@1000'")
    train.add_argument("--cooc-tau", type=float, default=5.0)
    train.add_argument("--no-cross-modality-cooc", action="store_true",
                       help="the co-occurrence loss scores pairs of categories of one modality only (ablation)")
    train.add_argument("--mask-prob", type=float, default=0.15)
    train.add_argument("--delete-prob", type=float, default=0.1)
    train.add_argument("--max-source-length", type=int, default=256)
    train.add_argument("--max-target-length", type=int, default=None,
                       help="decoder tokens of a target visit (default 96 for diagnoses; with other modalities, "
                            "enough for the 99th percentile of the training visits' codes)")
    train.add_argument("--logging-steps", type=int, default=25)
    train.add_argument("--eval-steps", type=int, default=250)
    train.add_argument("--eval-examples", type=int, default=1000, help="validation examples per evaluation")
    train.add_argument("--eval-generate-patients", type=int, default=64,
                       help="patients generated at each evaluation to watch diversity (0: off)")
    train.add_argument("--save-steps", type=int, default=250)
    train.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint folder, or 'last'")
    gen = p.add_argument_group("generation and evaluation")
    gen.add_argument("--generate", type=int, default=None,
                     help="synthetic patients generated at the end (default: the test split's size; 0: skip)")
    gen.add_argument("--generate-batch-size", type=int, default=256)
    gen.add_argument("--calibration-patients", type=int, default=None,
                     help="patients generated after training to calibrate each category's share of visits to "
                          "the training split's (saved in generation_config.json; 0: no calibration; default "
                          f"{DEFAULT_CALIBRATION_PATIENTS:,}, {MULTIMODAL_CALIBRATION_PATIENTS:,} with procedures or "
                          "medications)")
    gen.add_argument("--time-calibration-patients", type=int, default=None,
                     help="patients generated after the category calibration to calibrate the time model's rates "
                          "to the training split's (its heads' shifts, in time_model.safetensors; 0: none; default "
                          f"{TIME_CALIBRATION_SHARE:g} x --calibration-patients)")
    gen.add_argument("--no-evaluate", action="store_true", help="skip the evaluation of the generated cohort")
    gen.add_argument("--perplexity-patients", type=int, default=PERPLEXITY_PATIENTS,
                     help="held-out test patients the evaluation scores the model's lpl / mpl perplexity on "
                          "(0: none)")


def cohort_modalities(split, asked: list[str] | None) -> tuple[str, ...]:
    """The modalities to learn: ``asked`` (diagnoses first, then procedures, then medications; each
    must be in the cohort), or every one the cohort holds (a table read by ``prepare``: a
    non-null column)."""
    held = ["diagnoses", *(m for m in MODALITIES[1:]
                           if m in split.column_names and any(x is not None for x in split[m]))]
    if asked is None:
        return tuple(held)
    missing = sorted(set(asked) - set(held))
    if missing:
        raise SystemExit(f"promptehr train: --modalities {' '.join(asked)}: the cohort has no {', '.join(missing)} "
                         f"(it holds {', '.join(held)})")
    ordered = tuple(m for m in MODALITIES if m in asked)
    if ordered[:1] != ("diagnoses",):
        raise SystemExit("promptehr train: --modalities must include diagnoses")
    return ordered


def merged_visits(split, tokenizer):
    """The split with each visit's codes of every modality of the tokenizer in ``visits``
    (``tokenizer.merge_visits``); the split itself for a diagnosis-only tokenizer."""
    if len(tokenizer.modalities) == 1:
        return split
    return split.map(lambda p: {"visits": tokenizer.merge_visits(p)}, keep_in_memory=True,
                     desc="merging modalities")


def type_visit_modalities(asked: str, modalities: tuple[str, ...]) -> tuple[str, ...]:
    """The modalities the visit types are fitted on: ``asked`` (comma-separated, or "all") among
    the tokenizer's ``modalities``, in their order; ValueError on one the cohort lacks."""
    names = modalities if asked == "all" else tuple(m.strip() for m in asked.split(",") if m.strip())
    missing = [m for m in names if m not in modalities]
    if missing or "diagnoses" not in names:
        raise ValueError(f"--visit-type-modalities {asked!r}: expected 'all' or diagnoses plus any of "
                         f"{list(modalities[1:])} (the cohort's)")
    return tuple(m for m in modalities if m in names)


def target_length(train_tok, multimodal: bool) -> int:
    """Decoder tokens of a target visit: 96 for diagnoses alone; with other modalities, room for
    the 99th percentile of the training visits' codes (2 tokens per code, plus ``<v>`` ``</v>``)."""
    if not multimodal:
        return DEFAULT_TARGET_LENGTH
    lengths = [len(v) for visits in train_tok["visits"] for v in visits]
    return max(DEFAULT_TARGET_LENGTH, 2 + 2 * int(np.percentile(lengths, 99)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="promptehr train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def prepare_data(args, state) -> tuple[Path, dict]:
    """Simulate (unless --mimic-dir), write MIMIC-III CSVs (MIMIC-IV for ``--code-system icd10cm``)
    and prepare them into ``data/``; main process only.

    ``data/`` is reused (e.g. on resume) only while it matches its input: data/summary.json records
    each table's size, modification time and SHA-256 and the split options, and any difference
    from the tables as they are now (``prepare.stale_reasons``) prepares the cohort again, logging
    why. The simulated cohort in ``mimic3/`` is drawn again only when --patients or --seed changed
    or --code-system changed (recorded in ``data_source.json``). Returns (data folder, its summary).
    """
    root = Path(args.output_dir)
    data_dir = root / "data"
    options = {"seed": args.seed, "val_frac": SPLIT_FRACTIONS[0], "test_frac": SPLIT_FRACTIONS[1]}
    if state.is_main_process:
        t0 = time.perf_counter()
        if args.mimic_dir:
            mimic_dir = Path(args.mimic_dir)
        else:
            system = args.code_system or DEFAULT_CODE_SYSTEM
            mimic_dir = root / ("mimic3" if system == "icd9cm" else "mimic4")
            source = {"simulated_patients": args.patients, "seed": args.seed}
            if system != DEFAULT_CODE_SYSTEM:  # the markers of ICD-9-CM runs stay as they were
                source["code_system"] = system
            marker = root / "data_source.json"
            try:
                simulated = json.loads(marker.read_text()) == source
                find_tables(mimic_dir)
            except (OSError, ValueError):  # no marker, a torn one, or missing tables (Mimic3Error)
                simulated = False
            if not simulated:
                marker.unlink(missing_ok=True)  # the CSVs are about to change
                patients = simulate(args.patients, seed=args.seed, progress=True, code_system=system)
                if system == "icd9cm":
                    write_mimic3_csvs(patients, mimic_dir, seed=args.seed)
                else:
                    write_mimic4_csvs(patients, mimic_dir, seed=args.seed, code_system=system)
                write_json_atomic(marker, source)
                logger.info("simulated %d patients into %s", len(patients), mimic_dir)
        reasons = stale_reasons(data_dir, mimic_dir, **options)
        if reasons:
            logger.info("preparing the cohort in %s: %s", data_dir, "; ".join(reasons))
            prepare(mimic_dir, data_dir, **options)
            logger.info("prepared %s in %.1f s", data_dir, time.perf_counter() - t0)
        else:
            logger.info("reusing the prepared cohort in %s (its input files and options are unchanged)", data_dir)
    state.wait_for_everyone()
    return data_dir, json.loads((data_dir / "summary.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run; returns the run summary."""
    return train(parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``promptehr train``."""
    train(args)
    return 0


def train(args: argparse.Namespace) -> dict:
    """Cohort -> prepare -> tokenizer -> model -> train -> generate -> evaluate; returns the run summary."""
    if not args.max_steps and not (args.max_minutes and args.max_minutes > 0):
        raise SystemExit("promptehr train: give --max-steps or a positive --max-minutes")
    # The output-dir guard, before anything loads: never write inside, over or around the input,
    # and never replace a sub-folder that the run did not write (checked again when written).
    if args.mimic_dir and not Path(args.mimic_dir).is_dir():
        raise FileNotFoundError(f"--mimic-dir {args.mimic_dir}: not a folder")
    if args.mimic_dir and args.code_system:
        raise SystemExit("promptehr train: --code-system applies to the simulated cohort; a --mimic-dir folder's code "
                         "system is read from the folder")
    check_separate(args.output_dir, {"--mimic-dir": args.mimic_dir}, out_flag="--output-dir")
    if args.generate != 0:
        check_replaceable(Path(args.output_dir, "synthetic").resolve(), "generate")
        if not args.no_evaluate:
            check_replaceable(Path(args.output_dir, "evaluation").resolve(), "evaluate")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_start = time.perf_counter()

    # cpu=True is what makes accelerate start a gloo process group on a machine without GPUs
    # (`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...`); otherwise every process
    # would believe it is alone (and all of them would prepare the data).
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=use_cpu)
    # 2 cores shared by the processes: one thread per process when launched on 2 processes.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // state.num_processes))
    logger.info("process %d of %d (world size %d), %d torch threads", state.process_index, state.num_processes,
                state.num_processes, torch.get_num_threads())

    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    data_dir, summary = prepare_data(args, state)
    splits = load_prepared(data_dir)
    train_split, val_split, test_split = splits["train"], splits["validation"], splits["test"]
    t_data = time.perf_counter()

    # A summary written before prepare recorded the code system is a MIMIC-III (ICD-9-CM) cohort.
    code_system = summary.get("code_system", DEFAULT_CODE_SYSTEM)
    modalities = cohort_modalities(train_split, args.modalities)
    tokenizer = PromptEHRTokenizer.from_patients(train_split, min_code_count=args.min_code_count,
                                                 code_system=code_system, modalities=modalities)
    multimodal = len(modalities) > 1
    # What the tokenizer reads: each visit's codes of every modality, diagnoses first.
    train_tok, val_tok, test_tok = (merged_visits(split, tokenizer) for split in (train_split, val_split, test_split))
    counts = category_cooccurrence(train_tok, tokenizer_categories(tokenizer)[0], code_system=code_system,
                                   category=tokenizer.category_of if multimodal else None)
    types = {}
    type_modalities = type_visit_modalities(args.visit_type_modalities, modalities)
    n_types = auto_types(sum(map(len, train_split["visits"]))) if args.visit_types is None else args.visit_types
    if n_types > 0:
        type_visits = {name: [merge_visits(p, type_modalities) for p in split]
                       for name, split in (("train", train_split), ("validation", val_split))}
        mixture = fit_visit_types([v for visits in type_visits["train"] for v in visits], n_types,
                                  min_visits=args.visit_type_min_visits, seed=args.seed)
        types = {name: mixture.assign_patients(visits) for name, visits in type_visits.items()}
        logger.info("%d visit types (of %d asked; at least %d training visits each)", mixture.n_types,
                    n_types, args.visit_type_min_visits)
        prior = CohortPrior.from_patients(train_split, visit_types=types["train"], n_types=mixture.n_types,
                                          category=tokenizer.category_of, modalities=modalities)
        type_config = {"cat_cardinalities": [2, mixture.n_types], "visit_type_feature_index": 1}
    else:
        prior = CohortPrior.from_patients(train_split, modalities=modalities)
        type_config = {}
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    config = PromptEHRConfig.from_preset(args.preset, tokenizer=tokenizer, **{**type_config, **overrides})
    max_source = min(args.max_source_length, config.max_position_embeddings - config.num_prompts)
    max_target = min(args.max_target_length or target_length(train_tok, multimodal),
                     config.max_position_embeddings - config.num_prompts)
    torch.manual_seed(args.seed)
    model = PromptEHRForConditionalGeneration(config)
    if types:
        with torch.no_grad():
            model.visit_type_bias.weight.copy_(torch.from_numpy(type_logit_bias(mixture, tokenizer, config.vocab_size)))
    train_examples = build_examples(train_tok, max_source_length=max_source, max_target_length=max_target,
                                    visit_types=types.get("train"))
    val_examples = build_examples(val_tok, max_source_length=max_source, max_target_length=max_target,
                                  visit_types=types.get("validation"))
    if len(val_examples) > args.eval_examples:
        # in memory: no indices cache file (in the datasets cache or elsewhere) for patient rows
        val_examples = val_examples.shuffle(seed=args.seed, keep_in_memory=True).select(range(args.eval_examples))
    logger.info("vocabulary %d tokens (%d categories, %d codes); %d training examples; model %.2fM parameters",
                len(tokenizer), len(tokenizer.category_ids), len(tokenizer.code_ids), len(train_examples),
                model.num_parameters() / 1e6)

    training_args = PromptEHRTrainingArguments(
        output_dir=str(root / "checkpoints"),
        use_cpu=use_cpu,
        max_steps=args.max_steps or UNBOUNDED_STEPS,
        max_minutes=args.max_minutes if args.max_minutes and args.max_minutes > 0 else None,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else None,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        lm_loss=args.lm_loss, w_age=args.w_age, w_sex=args.w_sex, w_cooc=args.w_cooc,
        loss_weighting=args.loss_weighting, loss_schedule=args.loss_schedule, cooc_tau=args.cooc_tau,
        cooc_cross_modality=not args.no_cross_modality_cooc, max_target_length=max_target,
        code_order=args.code_order, mask_prob=args.mask_prob, delete_prob=args.delete_prob,
        max_source_length=max_source,
        eval_generate_patients=args.eval_generate_patients,
    )
    trainer = PromptEHRTrainer(
        model=model, args=training_args, processing_class=tokenizer, cooccurrence_counts=counts,
        train_dataset=train_examples, eval_dataset=val_examples if args.eval_steps > 0 else None,
        eval_patients=val_split, prior=prior,
    )
    resume = args.resume_from_checkpoint
    if resume == "last":
        resume = True
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_minutes = (time.perf_counter() - t_train) / 60

    model_dir = root / "model"
    trainer.save_model(str(model_dir))
    run = {
        "code_system": code_system,
        "modalities": list(modalities),
        "world_size": trainer.args.world_size,
        "num_processes": state.num_processes,
        "torch_threads": torch.get_num_threads(),
        "global_step": trainer.state.global_step,
        "train_patients": len(train_split),
        "train_examples": len(train_examples),
        "visit_types": {"asked": n_types, "fitted": type_config.get("cat_cardinalities", [0, 0])[1]},
        "parameters": model.num_parameters(),
        "train_minutes": train_minutes,
        "train_loss": result.training_loss,
        "last_log": next((h for h in reversed(trainer.state.log_history) if "loss_lm" in h), None),
        "data_minutes": (t_data - t_start) / 60,
        "cohort": summary,
    }
    if not state.is_main_process:
        return run
    prior.save(model_dir)
    time_model = None
    if not args.no_time and has_times(train_patients := train_split.to_list()):
        t0 = time.perf_counter()
        time_model = fit_time_model(train_patients, tokenizer.category_of, seed=args.seed)
        time_model.save(model_dir)
        run["time_model_minutes"] = (time.perf_counter() - t0) / 60
    else:  # no stale time model of an earlier run in this folder
        (model_dir / TIME_MODEL_FILE).unlink(missing_ok=True)
    run["times"] = time_model is not None
    # Under visit types the code inside a category comes from the training P(code | category,
    # visit type), not from the type-blind P(code | category).
    trainer.model.generation_config = save_custom_generate(
        model_dir, tokenizer, max_history_length=max_source, **({"stage_two": "type"} if types else {}))
    n_calibration = args.calibration_patients
    if n_calibration is None:
        n_calibration = default_calibration_patients(multimodal)[0]
    n_time_calibration = args.time_calibration_patients
    if n_time_calibration is None:
        n_time_calibration = int(n_calibration * TIME_CALIBRATION_SHARE)
    if n_calibration > 0:
        t0 = time.perf_counter()
        # A seed of its own: the end-of-run generation below does not replay the calibration's draw.
        calibration = fit_category_calibration(trainer.model, tokenizer, train_split, n_calibration,
                                               prior=prior, seed=args.seed + 1, batch_size=args.generate_batch_size,
                                               max_history_length=max_source)
        trainer.model.generation_config = save_custom_generate(model_dir, tokenizer, category_calibration=calibration)
        run["calibration_minutes"] = (time.perf_counter() - t0) / 60
        run["calibration_patients"] = n_calibration
    if time_model is not None and n_time_calibration > 0:
        t0 = time.perf_counter()
        time_model = fit_time_calibration(trainer.model, tokenizer, train_patients, time_model, n_time_calibration,
                                          prior=prior, seed=args.seed + 2, batch_size=args.generate_batch_size,
                                          max_history_length=max_source)
        time_model.save(model_dir)
        run["time_calibration_minutes"] = (time.perf_counter() - t0) / 60
        run["time_calibration_patients"] = n_time_calibration

    evaluation = None
    n_generate = len(test_split) if args.generate is None else args.generate
    if n_generate > 0:
        t0 = time.perf_counter()
        synthetic, stats = generate_patients(trainer.model, tokenizer, n_generate, mode="unconditional", prior=prior,
                                             batch_size=args.generate_batch_size, seed=args.seed,
                                             max_history_length=max_source, exclude_patients=train_split,
                                             time_model=time_model, times=time_model is not None)
        write_cohort(synthetic, root / "synthetic", stats=stats, seed=args.seed, overwrite=True,
                     code_system=code_system)
        run["generate_minutes"] = (time.perf_counter() - t0) / 60
        run["generated_patients"] = len(synthetic)
        if not args.no_evaluate:
            t0 = time.perf_counter()
            scores = None
            if args.perplexity_patients > 0:
                scores = perplexity(trainer.model, tokenizer, test_tok, prior if types else None,
                                    max_patients=args.perplexity_patients, max_history_length=max_source,
                                    code_order="hierarchical" if args.code_order == "hierarchical" else "seq_num",
                                    seed=args.seed)
            evaluation = evaluate_cohorts(synthetic, test_split, train_split, out_dir=root / "evaluation",
                                          seed=args.seed, code_system=code_system, perplexity=scores)
            run["evaluate_minutes"] = (time.perf_counter() - t0) / 60
            rows = evaluation["rows"]
            run["metrics"] = {row: {k: rows[row][k] for k in ("code_js", "r2_pair_prevalence", "distinct_codes",
                                                                "top_code_share", "codes_per_visit_mean")
                                    if rows[row] is not None and k in rows[row]}
                              for row in ("synthetic", "floor", "baseline")}
    write_text_atomic(model_dir / "README.md", model_card(args, run, evaluation, args.push_to_hub or str(model_dir)))
    if args.push_to_hub:
        run["hub_commit"] = push_to_hub(model_dir, args.push_to_hub, args.hub_private)
    run["total_minutes"] = (time.perf_counter() - t_start) / 60
    write_json_atomic(root / "run_summary.json", run, default=float)
    print(json.dumps({k: v for k, v in run.items() if k != "last_log"}, indent=1, default=float))
    return run

