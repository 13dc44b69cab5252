"""Generate synthetic patients from a trained PromptEHR checkpoint with the Python API.

    python examples/generate.py --model promptehr_run/model --out synthetic_demo/

The checkpoint folder is what ``examples/train.py`` writes (``promptehr_run/model``): config,
weights and remote code, tokenizer files, ``cohort_prior.json`` (the training cohort's age, sex,
visit-count and visit-length distributions), ``generation_config.json`` (the generation settings,
which keyword arguments override) and ``custom_generate/`` (the generation code, so that the
folder generates patients without this package). The same thing from the shell:

    promptehr generate --model promptehr_run/model --n 1000 --out synthetic/ [--stage-two empirical]

This script shows the three modes, the stage-two options and the copy filter, writes the
unconditional cohort as MIMIC-III CSVs + Parquet (readable again by ``promptehr prepare``), and
generates through the checkpoint's own code, as a process without this package would.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="promptehr_run/model", help="checkpoint folder (examples/train.py output)")
    p.add_argument("--data", default=None,
                   help="prepared data folder (default: <model>/../data), for seeds and the copy filter")
    p.add_argument("--out", default="synthetic_demo", help="where to write the unconditional cohort")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a machine shared with other jobs, 1 can be much faster)")
    args = p.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from promptehr_hf.datasets_scripts.prepare import load_prepared
    from promptehr_hf.modeling_promptehr.generation.command import load_model, write_cohort
    from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients
    from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior

    # 1. The checkpoint: model + tokenizer (this package's classes; AutoModelForSeq2SeqLM /
    #    AutoTokenizer with trust_remote_code=True load the same folder without the package).
    model, tokenizer = load_model(args.model)
    prior = CohortPrior.load(args.model)
    print("training cohort:", prior.summary())
    data_dir = Path(args.data) if args.data else Path(args.model).parent / "data"
    train = load_prepared(data_dir)["train"] if (data_dir / "train.parquet").exists() else None

    # 2. Unconditional: age, sex and visit counts from the prior; with the default settings of
    #    model.generation_config, codes per visit from the training distribution
    #    (visit_length="data") and codes inside a category by the training P(code | category)
    #    (stage_two="empirical").
    #    exclude_patients redraws (same age and sex) any synthetic patient identical to a training
    #    one, and drops one still identical after copy_redraws (default 3) rounds.
    cohort, stats = generate_patients(model, tokenizer, args.n, prior=prior, seed=args.seed, exclude_patients=train)
    print(f"unconditional: {len(cohort)} patients, {stats['mean_visits_per_patient']:.2f} visits/patient, "
          f"{stats['mean_codes_per_visit']:.2f} codes/visit, {stats.get('copies_redrawn', 0)} copies redrawn, "
          f"{stats.get('copies_dropped', 0)} dropped, "
          f"{stats['patients_per_second']:.1f} patients/s")
    print("first patient:", cohort[0])

    # 3. Stage two by the model's scores instead of the training frequencies P(code | category).
    by_model, _ = generate_patients(model, tokenizer, 50, prior=prior, stage_two="model", seed=args.seed,
                                    progress=False)
    print("stage two by the model:", by_model[0]["visits"])

    # 4. Conditional: given demographics (n_visits optional: drawn from the prior when absent).
    demographics = [{"age": 0.0, "sex": "F", "n_visits": 1}, {"age": 67.0, "sex": "M", "n_visits": 3},
                    {"age": 29.0, "sex": "F"}]
    conditional, _ = generate_patients(model, tokenizer, mode="conditional", demographics=demographics, prior=prior,
                                       seed=args.seed, progress=False)
    for d, patient in zip(demographics, conditional):
        print(f"conditional {d}: {patient['visits']}")

    # 5. Seeded: keep each real patient's first visit, generate the rest (as long as the seed's).
    if train is not None:
        seeds = train.filter(lambda p: len(p["visits"]) > 1).select(range(20))
        seeded, seeded_stats = generate_patients(model, tokenizer, mode="seeded", seed_patients=seeds, seed_visits=1,
                                                 seed=args.seed, progress=False)
        print(f"seeded: {len(seeded)} patients; share of output codes copied from the seeds "
              f"{seeded_stats['seed_copied_share']:.2f} (kept visits {seeded_stats['seed_given_share']:.2f})")

    # 6. Files: MIMIC-III CSVs (new ids, plausible dates), synthetic.parquet, generation_stats.json.
    out = write_cohort(cohort, args.out, stats=stats, seed=args.seed, overwrite=True, code_system=tokenizer.code_system)
    print(f"wrote {out}: {sorted(f.name for f in out.iterdir())}")
    print(json.dumps({k: stats[k] for k in ("ungrammatical_visits", "visits_with_duplicate_code", "seconds")}))

    # 7. The checkpoint's own code (custom_generate/), as in a process without promptehr_hf:
    #    from_pretrained(..., trust_remote_code=True) makes it the model's generate, which returns
    #    patient dicts (not a Dataset) and the same stats.
    if (Path(args.model) / "custom_generate" / "generate.py").is_file():
        hub_model = AutoModelForSeq2SeqLM.from_pretrained(args.model, trust_remote_code=True)
        hub_tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
        patients, _ = hub_model.generate(tokenizer=hub_tokenizer, n=5, seed=args.seed)
        print("from the checkpoint's custom_generate:", patients[0])


if __name__ == "__main__":
    main()
