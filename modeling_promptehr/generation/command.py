"""``promptehr generate``: load a checkpoint, generate, write the cohort (MIMIC-III or MIMIC-IV CSVs or
a MEDS dataset, + Parquet)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch

from promptehr_hf.datasets_scripts.cohort_io import write_mimic3_csvs, write_mimic4_csvs, write_parquet
from promptehr_hf.datasets_scripts.meds_io import ICD_VERSIONS, write_meds
from promptehr_hf.file_utils import OutputFolderError, check_output, replace_folder, write_json_atomic
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

from .patients import DEFAULT_COPY_REDRAWS
from .pipeline import MODES, VISIT_LENGTHS, generate_patients
from .prior import PRIOR_FILE
from .processors import STAGE_TWO_MODES
from .times import TIME_MODEL_FILE


def load_model(model_dir: str | os.PathLike, device: str | None = None):
    """(model, tokenizer) from a checkpoint directory, with this package's classes."""
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a saved PromptEHR checkpoint")
    model = PromptEHRForConditionalGeneration.from_pretrained(str(model_dir))
    tokenizer = PromptEHRTokenizer.from_pretrained(str(model_dir))
    if device:
        model.to(device)
    return model.eval(), tokenizer


FORMATS = ("mimic3", "mimic4", "meds")
OUTCOMES = {"died": True, "survived": False}  # --outcome -> generate_patients(hospital_death=)
DEFAULT_FORMATS = {"icd9cm": "mimic3", "icd10cm": "mimic4"}  # code system -> the MIMIC layout that holds it


def write_cohort(patients, out_dir: str | os.PathLike, stats: dict | None = None, seed: int = 0,
                 overwrite: bool = False, fmt: str | None = None, code_system: str = "icd9cm") -> Path:
    """The cohort as MIMIC-III CSVs (``fmt="mimic3"``; new hadm ids, plausible dates; ``cohort_io``),
    as a MIMIC-IV folder (``fmt="mimic4"``: ``hosp/*.csv.gz`` with anchor ages and ``icd_version``;
    same dates) or as a MEDS dataset in ``meds/`` (``fmt="meds"``; ``meds_io.write_meds``, same
    dates); ``fmt=None`` is the MIMIC layout of ``code_system`` (MIMIC-III for ICD-9-CM, MIMIC-IV
    for ICD-10-CM, whose codes MIMIC-III tables cannot hold). Plus
    ``synthetic.parquet`` and ``generation_stats.json`` (the stats and the ``code_system``), into
    out_dir, as a whole
    (``file_utils.replace_folder``: a temporary folder beside it, swapped in at the end; on any error
    or interruption out_dir is as it was).

    Args:
        patients: patient dicts or a datasets.Dataset in the patient schema.
        seed: draws the dates and hadm ids.  overwrite: replace a non-empty out_dir, which must
            hold nothing but an earlier ``promptehr generate`` output (else OutputFolderError).
        code_system: the codes' system (``"icd9cm"`` or ``"icd10cm"``, the tokenizer's), named in the
            MEDS codes and recorded in ``generation_stats.json`` (``promptehr evaluate`` reads it).

    Raises ValueError, before writing anything, when there is no patient to write or ``fmt`` is
    unknown or "mimic3" with ICD-10-CM codes.
    """
    if len(patients) == 0:
        stats = stats or {}
        dropped = ""
        if stats.get("copies_dropped"):
            dropped = f"; {stats['copies_dropped']} dropped as copies of training patients"
            if stats.get("copy_redraws"):
                dropped += f" after {stats['copy_redraws']} redraws each"
        raise ValueError(f"no patient to write ({stats.get('n_generated', 0)} generated{dropped}); nothing written")
    out = Path(out_dir)
    if not overwrite:
        _check_empty(out)
    fmt = fmt or DEFAULT_FORMATS[code_system]
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "mimic3" and code_system != "icd9cm":
        raise ValueError(f"format mimic3 holds ICD-9-CM codes only (MIMIC-III has no icd_version), not {code_system}: "
                         "use mimic4 or meds")
    with replace_folder(out, "generate", {"seed": seed, "format": fmt}) as tmp:
        if fmt == "meds":
            write_meds(patients, tmp / "meds", code_system=code_system, seed=seed, command="generate")
        elif fmt == "mimic4":
            write_mimic4_csvs(patients, tmp, seed=seed, code_system=code_system)
        else:
            write_mimic3_csvs(patients, tmp, seed=seed)
        write_parquet(patients, tmp / "synthetic.parquet")
        if stats is not None:
            write_json_atomic(tmp / "generation_stats.json", {**stats, "code_system": code_system}, indent=1)
    return out


def _check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputFolderError(f"{out}: exists and is not empty (pass --overwrite, or overwrite=True in Python)")


# Both readers load the whole file into memory with pyarrow: no Arrow copy of real rows is
# left in a datasets cache.
def _read_patients(path: str) -> list[dict]:
    """Patients from a Parquet file, or from a prepared folder (its train.parquet)."""
    p = Path(path)
    if p.is_dir():
        p = p / "train.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: expected a Parquet file of patients or a prepared folder with train.parquet")
    return pq.read_table(p).to_pylist()


def _read_demographics(path: str) -> list[dict]:
    """Rows with age, sex[, n_visits] from a CSV or Parquet file."""
    rows = (pa_csv.read_csv(path) if path.lower().endswith((".csv", ".csv.gz")) else pq.read_table(path)).to_pylist()
    for j, r in enumerate(rows):
        if "age" not in r or "sex" not in r:
            raise ValueError(f"{path}: row {j + 1} lacks an 'age' or 'sex' column")
        if r.get("n_visits") is not None and r["n_visits"] != r["n_visits"]:  # NaN from CSV
            r["n_visits"] = None
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (model, tokenizer, cohort_prior.json)")
    parser.add_argument("--out", required=True,
                        help="output folder: MIMIC CSVs (or meds/), synthetic.parquet, generation_stats.json")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="mimic3: PATIENTS/ADMISSIONS/DIAGNOSES_ICD.csv (ICD-9-CM only); mimic4: hosp/patients, "
                             "admissions, diagnoses_icd .csv.gz; meds: a MEDS dataset in --out/meds (data/, "
                             "metadata/), codes named as the MIMIC-IV MEDS extraction names them (default: mimic3 "
                             "for an ICD-9-CM checkpoint, mimic4 for ICD-10-CM)")
    parser.add_argument("--code-system", choices=tuple(ICD_VERSIONS), default=None,
                        help="the checkpoint's code system, for the MEDS code names (default: its tokenizer's; "
                             "another one is refused)")
    parser.add_argument("--n", type=int, default=None, help="number of patients (unconditional; seeded: draw n seeds)")
    parser.add_argument("--mode", choices=MODES, default="unconditional")
    # The generation settings default to the checkpoint's generation_config.json; a flag given overrides it.
    parser.add_argument("--stage-two", choices=STAGE_TWO_MODES, default=None,
                        help="code sampling after a category (default: the checkpoint's, else empirical: the "
                             "training P(code | category))")
    parser.add_argument("--pair-weight", type=float, default=None,
                        help="weight of the within-visit pair scores in stage two (the codes already in the visit; "
                             "0: off; default: the checkpoint's, else 0.7)")
    parser.add_argument("--visit-length", choices=VISIT_LENGTHS, default=None,
                        help="data: codes per visit from the training distribution; model: the model ends visits "
                             "(default: the checkpoint's, else data)")
    parser.add_argument("--max-codes", type=int, default=None, help="cap on codes per visit with --visit-length model")
    parser.add_argument("--batch-size", type=int, default=None, help="patients per decoder call (default: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=None, help="(default: 1)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ablation)")
    parser.add_argument("--no-cms", action="store_true", help="do not apply the CMS age/sex edits")
    parser.add_argument("--prior", default=None, help="cohort_prior.json (default: the one in --model)")
    parser.add_argument("--demographics", default=None, help="conditional: CSV/Parquet with age, sex[, n_visits]")
    parser.add_argument("--seed-patients", default=None,
                        help="seeded and given_diagnoses (their visits' diagnoses kept, procedures and medications "
                             "generated): Parquet of real patients or a prepared folder")
    parser.add_argument("--seed-visits", type=int, default=None,
                        help="seeded: leading visits kept from each seed (default: 1)")
    parser.add_argument("--exclude-training", default=None,
                        help="redraw (same age and sex; same seed in seeded mode) synthetic patients identical to "
                             "one in this Parquet / prepared folder, and drop those still identical after "
                             "--copy-redraws rounds")
    parser.add_argument("--copy-redraws", type=int, default=None,
                        help=f"with --exclude-training: rounds of redraws before a copy is dropped (default: "
                             f"{DEFAULT_COPY_REDRAWS}; 0: drop copies at once)")
    parser.add_argument("--no-time", action="store_true",
                        help="no stays, gaps or deaths, even when the checkpoint has a time model")
    parser.add_argument("--outcome", choices=tuple(OUTCOMES), default=None,
                        help="unconditional: only patients who die in hospital (died) or who do not (survived), "
                             "drawn by rejection under the checkpoint's time model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; on a machine shared with other jobs, 1 can be much "
                             "faster)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out that holds an earlier `promptehr generate` output")


def _inputs(args) -> dict[str, str | None]:
    return {"--model": args.model, "--prior": args.prior, "--demographics": args.demographics,
            "--seed-patients": args.seed_patients, "--exclude-training": args.exclude_training}


def validate(args) -> None:
    """The checks ``promptehr generate`` runs before loading the model: every input exists, the
    numbers are in range, and --out is no input, lies in none, contains none, and is empty (or,
    with --overwrite, an earlier ``promptehr generate`` output).

    Raises FileNotFoundError, ValueError or OutputFolderError (one-line messages).
    """
    for flag, path in _inputs(args).items():
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if not Path(args.model, "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: no config.json; expected a saved PromptEHR checkpoint")
    needs = {"unconditional": ("--n", args.n), "conditional": ("--demographics", args.demographics),
             "seeded": ("--seed-patients", args.seed_patients),
             "given_diagnoses": ("--seed-patients", args.seed_patients)}
    flag, given = needs[args.mode]
    if given is None:
        raise ValueError(f"{flag} is required in {args.mode} mode")
    if args.outcome is not None and (args.mode != "unconditional" or args.no_time):
        raise ValueError("--outcome fixes the outcome of unconditional generation, with times (no --no-time)")
    if args.outcome is not None and not Path(args.model, TIME_MODEL_FILE).is_file():
        raise FileNotFoundError(f"--model {args.model}: no {TIME_MODEL_FILE} (--outcome draws deaths from it; the "
                                "model was trained on a cohort without times, or with --no-time)")
    if args.mode == "unconditional" and not args.prior and not Path(args.model, PRIOR_FILE).is_file():
        raise FileNotFoundError(f"--model {args.model}: no {PRIOR_FILE} (unconditional mode samples from it); "
                                "pass --prior")
    for flag, value, low in (("--n", args.n, 1), ("--batch-size", args.batch_size, 1),
                             ("--seed-visits", args.seed_visits, 0), ("--max-codes", args.max_codes, 1),
                             ("--top-k", args.top_k, 1), ("--threads", args.threads, 1),
                             ("--copy-redraws", args.copy_redraws, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    check_output(args.out, "generate", _inputs(args), replace=args.overwrite)
    if not args.overwrite:
        _check_empty(Path(args.out))


def run(args) -> int:
    """``promptehr generate`` (the CLI runs ``validate(args)`` first)."""
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.device)
    if args.code_system not in (None, tokenizer.code_system):
        raise ValueError(f"--code-system {args.code_system}: the checkpoint's tokenizer is {tokenizer.code_system}")
    dataset, stats = generate_patients(
        model, tokenizer, args.n, mode=args.mode, prior=args.prior or args.model,
        demographics=_read_demographics(args.demographics) if args.demographics else None,
        seed_patients=_read_patients(args.seed_patients) if args.seed_patients else None,
        seed_visits=args.seed_visits, stage_two=args.stage_two, pair_weight=args.pair_weight,
        visit_length=args.visit_length,
        max_codes=args.max_codes, batch_size=args.batch_size, seed=args.seed, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, do_sample=False if args.greedy else None,
        cms=False if args.no_cms else None,
        exclude_patients=_read_patients(args.exclude_training) if args.exclude_training else None,
        copy_redraws=args.copy_redraws, times=False if args.no_time else None,
        hospital_death=None if args.outcome is None else OUTCOMES[args.outcome],
    )
    write_cohort(dataset, out, stats, seed=args.seed, overwrite=args.overwrite, fmt=args.format,
                 code_system=tokenizer.code_system)
    print(json.dumps({k: stats[k] for k in ("n_patients", "n_visits", "mean_visits_per_patient",
                                             "mean_codes_per_visit", "copies_redrawn", "copies_dropped",
                                             "seconds") if k in stats}))
    print(f"wrote {out}")
    return 0


__all__ = ["add_arguments", "load_model", "run", "validate", "write_cohort"]
