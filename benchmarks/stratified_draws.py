"""Stratified against independent draws: how far a generated cohort's plan and outcomes wander
from their expectation, draw after draw.

    python benchmarks/stratified_draws.py --model-dir benchmarks/work/fidelity_simulated_icd10/default/model

For a trained model (its ``cohort_prior.json``, ``time_model.safetensors`` and the prepared
training split beside it), ``--plans`` plans of as many patients as the test split are drawn from
the cohort prior (age and sex, visit count, visit types, codes per visit), once with the package's
stratified draws and once with independent uniforms in their place (``sampling.stratified_uniform``
swapped for ``rng.random``: the same inverse-CDF draw, one independent uniform per patient). Per
draw: the mean codes per visit and the codes-per-visit Wasserstein to the training visits, beside
the held-out split's. Then the time model draws the times of the test split's own codes
``--plans`` times each way: the in-hospital deaths' distance from the sum of the patients' death
probabilities. Last, ``--plans`` random draws of as many real training patients: how far their
in-hospital deaths per admission and later deaths per patient fall from the training split's
(the noise of one real cohort of that size). Writes ``benchmarks/results/stratified_draws.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import wasserstein_distance

from promptehr_hf.datasets_scripts.prepare import load_prepared
from promptehr_hf.metrics.time_outcome import Times
from promptehr_hf.modeling_promptehr.generation import sampling
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.times import VisitTimeModel
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

HERE = Path(__file__).resolve().parent


def plan_lengths(prior: CohortPrior, n: int, seed: int) -> np.ndarray:
    """Codes per visit of one unconditional plan of ``n`` patients (as generation draws it)."""
    rng = np.random.default_rng(seed)
    ages, _ = prior.sample_demographics(n, rng)
    n_visits = prior.sample_n_visits(ages, rng)
    index = np.concatenate([np.arange(k) for k in n_visits])
    if prior.n_types:
        types = np.concatenate(prior.sample_visit_types(ages, n_visits, rng))
        return prior.sample_codes_per_visit_by_type(types, index, rng)
    return prior.sample_codes_per_visit(np.repeat(ages, n_visits), index, rng)


def summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "median": float(np.median(values)),
            "max": float(np.max(values))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--plans", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results" / "stratified_draws.json"))
    args = p.parse_args()
    model_dir = Path(args.model_dir)
    prior = CohortPrior.load(model_dir)
    splits = load_prepared(model_dir.parent / "data")
    train_lengths = np.array([len(v) for p in splits["train"] for v in p["visits"]])
    test = splits["test"].to_list()
    test_lengths = np.array([len(v) for p in test for v in p["visits"]])
    floor_w = wasserstein_distance(train_lengths, test_lengths)
    tokenizer = PromptEHRTokenizer.from_pretrained(model_dir)
    time_model = VisitTimeModel.load(model_dir)
    codes = [{k: p[k] for k in ("subject_id", "age", "sex", "visits")} for p in test]
    rows = time_model.head_rows(codes, tokenizer.category_of)
    expected_deaths = float(time_model.probs("death", rows["death"])[:, 1].sum())

    stratified = sampling.stratified_uniform
    result = {"model_dir": str(model_dir), "plans": args.plans, "patients": len(test),
              "train_codes_per_visit": float(train_lengths.mean()), "floor_codes_per_visit_wasserstein": floor_w,
              "expected_hospital_deaths": expected_deaths, "draws": {}}
    for name, uniform in (("stratified", stratified), ("independent", lambda rng, n: rng.random(n))):
        sampling.stratified_uniform = uniform
        try:
            lengths = [plan_lengths(prior, len(test), seed) for seed in range(args.plans)]
            deaths = []
            for seed in range(args.plans):
                died = time_model.probs("death", rows["death"])
                deaths.append(float((independent_or_systematic(name, died, seed) == 1).sum()))
        finally:
            sampling.stratified_uniform = stratified
        ws = [wasserstein_distance(train_lengths, x) for x in lengths]
        result["draws"][name] = {
            "codes_per_visit_mean": summary([float(x.mean()) for x in lengths]),
            "codes_per_visit_wasserstein": summary(ws),
            "share_within_1.5x_floor": float(np.mean(np.array(ws) <= 1.5 * floor_w)),
            "hospital_deaths_minus_expected": summary([abs(d - expected_deaths) for d in deaths]),
        }
    result["real_subsample_outcomes"] = real_subsample_noise(splits["train"].to_list(), len(test), args.plans)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def outcome_rates(patients: list[dict]) -> tuple[float, float]:
    """In-hospital deaths per admission and later deaths per patient, as the fidelity table reads them."""
    times = Times(patients)
    return times.mortality()[1], times.out_of_hospital_death_rate()


def real_subsample_noise(train: list[dict], n: int, draws: int) -> dict:
    """How far the two outcome rates of ``n`` real training patients drawn at random (without
    replacement) fall from the whole training split's: the noise of one cohort of that size."""
    mortality, later = outcome_rates(train)
    gaps = {"hospital_deaths_per_admission": [], "later_deaths_per_patient": []}
    for seed in range(draws):
        pick = np.random.default_rng(seed).choice(len(train), size=n, replace=False)
        m, d = outcome_rates([train[i] for i in pick])
        gaps["hospital_deaths_per_admission"].append(abs(m - mortality))
        gaps["later_deaths_per_patient"].append(abs(d - later))
    return {"train_hospital_deaths_per_admission": mortality, "train_later_deaths_per_patient": later,
            "patients": n, **{f"{k}_minus_train": summary(v) for k, v in gaps.items()}}


def independent_or_systematic(name: str, probs: np.ndarray, seed: int) -> np.ndarray:
    """One class per row: the package's systematic draw, or an independent inverse-CDF draw."""
    rng = np.random.default_rng(seed)
    if name == "stratified":
        return sampling.systematic_classes(probs, rng)
    cum = np.cumsum(probs, axis=1)
    return np.minimum((cum < rng.random(len(probs))[:, None]).sum(axis=1), probs.shape[1] - 1)


if __name__ == "__main__":
    main()
