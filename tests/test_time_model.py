"""The time model: heads fitted on a cohort's stays, gaps and deaths, drawn for generated patients
from their codes (generation/times.py, training/time_model.py, generate_patients(times=, hospital_death=))."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from promptehr_hf import cli
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients, save_custom_generate
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.generation.sampling import stratified_within
from promptehr_hf.modeling_promptehr.generation.times import (
    TIME_MODEL_FILE,
    BinaryRows,
    VisitFeatures,
    VisitTimeModel,
    _cap_ages,
    has_times,
)
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training.time_model import (
    MIN_WITHIN_BIN_VALUES,
    WITHIN_BIN_LEVELS,
    calibrate_time_model,
    class_shares,
    fit_time_model,
    quantile_edges,
    upper_tail,
    within_bin_quantiles,
)
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer, code_category

CODES = ["99591", "4019", "V3000", "25000", "4280", "486", "5849"]


def timed_cohort(n: int, seed: int = 0) -> list[dict]:
    """Sepsis (995) at the last visit dies half the time (others 5%); newborns (V30) stay ~4x
    longer; after a heart-failure visit (428) the next admission comes ~10x sooner."""
    rng = np.random.default_rng(seed)
    patients = []
    for i in range(n):
        visits = [list(rng.choice(CODES, size=2, replace=False)) for _ in range(int(rng.integers(1, 4)))]
        stays = [float(rng.gamma(2.0, 10.0 if any(c.startswith("V30") for c in v) else 2.5)) for v in visits]
        gaps = [0.0] + [float(rng.exponential(30.0 if any(c.startswith("428") for c in visits[k - 1]) else 300.0))
                        for k in range(1, len(visits))]
        died = bool(rng.random() < (0.5 if any(c.startswith("995") for c in visits[-1]) else 0.05))
        after = None if died or rng.random() < 0.7 else float(rng.exponential(400.0))
        patients.append({"subject_id": i + 1, "age": float(rng.uniform(20, 90)), "sex": "FM"[i % 2],
                         "visits": visits, "stay_days": stays, "gap_days": gaps, "hospital_death": died,
                         "death_days": after})
    return patients


def codes_only(patients: list[dict]) -> list[dict]:
    return [{k: p[k] for k in ("subject_id", "age", "sex", "visits")} for p in patients]


@pytest.fixture(scope="module")
def cohort() -> list[dict]:
    return timed_cohort(3000)


@pytest.fixture(scope="module")
def time_model(cohort) -> VisitTimeModel:
    return fit_time_model(cohort, code_category)


def mortality(patients, prefix):
    return np.mean([p["hospital_death"] for p in patients if any(c.startswith(prefix) for c in p["visits"][-1])])


def median_stay(patients, prefix):
    return np.median([s for p in patients for v, s in zip(p["visits"], p["stay_days"])
                      if any(c.startswith(prefix) for c in v)])


def median_gap_after(patients, prefix):
    return np.median([g for p in patients for k, g in enumerate(p["gap_days"])
                      if k and any(c.startswith(prefix) for c in p["visits"][k - 1])])


def test_binary_rows_match_scipy():
    rng = np.random.default_rng(0)
    dense = (rng.random((7, 5)) < 0.4).astype(np.float64)
    dense[3] = 0  # an empty row
    m = sp.csr_matrix(dense)
    rows = BinaryRows(m.indptr.astype(np.int64), m.indices.astype(np.int64), 5)
    w = rng.normal(size=(3, 5))
    np.testing.assert_allclose(rows.dot(w), dense @ w.T)
    picked = np.array([4, 3, 0, 4])
    np.testing.assert_allclose(rows.take(picked).dot(w), dense[picked] @ w.T)
    both = BinaryRows.hstack([rows, BinaryRows.one_hot(np.arange(7) % 2, 2)])
    w2 = rng.normal(size=(3, 7))
    np.testing.assert_allclose(both.dot(w2), np.hstack([dense, np.eye(2)[np.arange(7) % 2]]) @ w2.T)


def test_heads_learn_the_dependence_on_codes(cohort, time_model):
    out, stats = time_model.sample(codes_only(cohort), np.random.default_rng(1), code_category)
    assert [p["visits"] for p in out] == [p["visits"] for p in cohort]  # codes untouched
    assert has_times(out) and stats["hospital_deaths"] == sum(p["hospital_death"] for p in out)
    assert abs(mortality(out, "995") - mortality(cohort, "995")) < 0.06
    assert abs(mortality(out, "401") - mortality(cohort, "401")) < 0.05
    assert mortality(out, "995") > 2 * mortality(out, "401")
    assert median_stay(out, "V30") > 3 * median_stay(out, "401")
    assert median_gap_after(out, "428") < 0.3 * median_gap_after(out, "401")
    assert abs(np.mean([p["death_days"] is not None for p in out])
               - np.mean([p["death_days"] is not None for p in cohort])) < 0.04
    for p in out:  # consistent by construction
        assert len(p["stay_days"]) == len(p["gap_days"]) == len(p["visits"]) and p["gap_days"][0] == 0.0
        assert min(p["stay_days"]) >= 0 and min(p["gap_days"]) >= 0
        assert not (p["hospital_death"] and p["death_days"] is not None)


def test_marginals_without_codes_lose_the_dependence(cohort):
    """The ablation: heads that see no category (every code unknown) fall back to the marginals."""
    blind = fit_time_model(cohort, lambda code: "?")
    out, _ = blind.sample(codes_only(cohort), np.random.default_rng(1), code_category)
    assert abs(mortality(out, "995") - mortality(out, "401")) < 0.06


def test_save_load_and_the_values_stay_inside_the_bins(cohort, time_model, tmp_path):
    time_model.save(tmp_path)
    back = VisitTimeModel.load(tmp_path)
    a, _ = time_model.sample(codes_only(cohort[:200]), np.random.default_rng(5), code_category)
    b, _ = back.sample(codes_only(cohort[:200]), np.random.default_rng(5), code_category)
    assert a == b
    for h, table in time_model.quantiles.items():
        np.testing.assert_array_equal(back.quantiles[h], table)
        edges = time_model.edges[h]
        assert table.shape == (len(edges) - 1, WITHIN_BIN_LEVELS + 1) and np.all(np.diff(table, axis=1) >= 0)
        np.testing.assert_array_equal(table[:, 0], edges[:-1])  # pinned: nothing beyond the outer edges
        np.testing.assert_array_equal(table[:, -1], edges[1:])
    stays = np.array([s for p in a for s in p["stay_days"]])
    edges = time_model.edges["stay"]
    assert stays.min() >= edges[0] and stays.max() <= edges[-1]
    all_stays = np.array([s for p in cohort for s in p["stay_days"]])
    assert edges[0] > all_stays.min() and edges[-1] < all_stays.max()  # no patient's extreme in the file
    with pytest.raises(ValueError, match="cannot read the time model"):
        VisitTimeModel.load(tmp_path / "nope.safetensors")


def drawn(model: VisitTimeModel, patients: list[dict], seed: int) -> dict[str, np.ndarray]:
    out, _ = model.sample(codes_only(patients), np.random.default_rng(seed), code_category)
    return values(out)


def values(patients: list[dict]) -> dict[str, np.ndarray]:
    return {"stay": np.array([s for p in patients for s in p["stay_days"]]),
            "gap": np.array([g for p in patients for g in p["gap_days"][1:]]),
            "after": np.array([p["death_days"] for p in patients if p["death_days"] is not None])}


def old_format(directory) -> VisitTimeModel:
    """The model in ``directory`` as a file written before the within-bin quantiles."""
    path = directory / TIME_MODEL_FILE
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".quantiles")}
    save_file(tensors, str(path), metadata=metadata)
    return VisitTimeModel.load(path)


def test_values_follow_the_training_values_inside_their_bin(cohort, tmp_path):
    """One bin per head: the draw inside it is the whole distribution. The stays (a beta piled up at
    the low edge), gaps (a mixture of exponentials) and days to death are skewed inside it: the
    drawn quantiles and mean match the training ones (outer values clipped to the outer edges),
    which the uniform draw of a file written before the within-bin quantiles misses by far (its
    mean too, for the stays drawn uniformly on the day scale)."""
    rng = np.random.default_rng(0)
    skewed = [{**p, "stay_days": list(1.0 + 9.0 * rng.beta(0.5, 4.0, len(p["visits"])))} for p in cohort]
    model = fit_time_model(skewed, code_category, bins={"stay": 1, "gap": 1, "after": 1})
    model.save(tmp_path)
    uniform = old_format(tmp_path)
    real = values(skewed)
    new, old = drawn(model, skewed * 3, seed=2), drawn(uniform, skewed * 3, seed=2)
    for head, levels, rtol in (("stay", [0.1, 0.25, 0.5, 0.75, 0.9], 0.04),
                               ("gap", [0.25, 0.5, 0.75, 0.9], 0.08), ("after", [0.25, 0.5, 0.75, 0.9], 0.08)):
        edges = model.edges[head]
        assert len(edges) == 2 and new[head].min() >= edges[0] and new[head].max() <= edges[1]
        target = np.clip(real[head], *edges)
        np.testing.assert_allclose(np.quantile(new[head], levels), np.quantile(target, levels), rtol=rtol)
        assert abs(new[head].mean() / target.mean() - 1) < 0.05
        assert np.max(np.abs(np.quantile(old[head], levels) / np.quantile(target, levels) - 1)) > 0.3
    assert old["stay"].mean() / np.clip(real["stay"], *model.edges["stay"]).mean() - 1 > 0.5


def test_a_file_without_within_bin_quantiles_draws_uniformly_inside_the_bins(cohort, time_model, tmp_path):
    """The uniform draw inside the bin: lo + u (hi - lo), and on log1p for gaps, with u the
    uniforms stratified inside each bin."""
    time_model.save(tmp_path)
    old = old_format(tmp_path)
    for h, edges in time_model.edges.items():
        np.testing.assert_array_equal(old.quantiles[h], np.stack([edges[:-1], edges[1:]], axis=1))
    bins = np.random.default_rng(0).integers(0, len(time_model.edges["gap"]) - 1, 500)
    u = stratified_within(bins, np.random.default_rng(7))
    lo, hi = time_model.edges["stay"][bins], time_model.edges["stay"][bins + 1]
    np.testing.assert_array_equal(old._values("stay", bins, np.random.default_rng(7)), lo + u * (hi - lo))
    lo, hi = time_model.edges["gap"][bins], time_model.edges["gap"][bins + 1]
    np.testing.assert_array_equal(old._values("gap", bins, np.random.default_rng(7)),
                                  np.expm1(np.log1p(lo) + u * (np.log1p(hi) - np.log1p(lo))))
    a, b = drawn(old, cohort[:300], seed=4), drawn(old, cohort[:300], seed=4)
    assert all(np.array_equal(a[h], b[h]) for h in a)  # deterministic per seed


def test_within_bin_quantiles_of_a_sparse_bin_are_the_uniform_draw():
    edges = np.array([0.0, 10.0, 100.0])
    rng = np.random.default_rng(0)
    values = np.r_[rng.exponential(1.0, 500), np.linspace(20.0, 30.0, MIN_WITHIN_BIN_VALUES - 2), 1e6]
    table = within_bin_quantiles(values, edges, levels=4)
    assert table[0, 2] < 2.0  # the median of the exponential, not the middle of [0, 10]
    np.testing.assert_allclose(table[1], np.linspace(10.0, 100.0, 5))  # too few values: evenly spaced
    log_table = within_bin_quantiles(values, edges, levels=4, log=True)
    np.testing.assert_allclose(np.log1p(log_table[1]), np.linspace(np.log1p(10.0), np.log1p(100.0), 5))
    assert table.max() == 100.0  # the 1e6 is clipped to the outer edge


def test_the_cohorts_deaths_are_their_expected_count(cohort, time_model):
    """Each patient dies in hospital with the death head's probability for its last visit, and the
    cohort's count of those deaths is within one of the sum of those probabilities."""
    patients = codes_only(cohort)
    n_visits = np.array([len(p["visits"]) for p in patients])
    feats = VisitFeatures(time_model.categories, code_category)
    last = feats.rows([feats.visits([p["visits"][-1] for p in patients])], np.array([p["age"] for p in patients]),
                      [p["sex"] for p in patients], n_visits - 1)
    expected = time_model.probs("death", last)[:, 1].sum()
    for seed in range(5):
        _, stats = time_model.sample(patients, np.random.default_rng(seed), code_category)
        assert abs(stats["hospital_deaths"] - expected) < 1.0


def test_calibration_brings_the_rates_of_shifted_codes_back_to_the_training_ones(cohort, time_model, tmp_path):
    """A generator that writes sepsis (the deadly code) at half its real rate: the heads, fitted on
    the real codes, draw too few in-hospital deaths. The calibrated model's expected rates over
    those codes are the training ones (deaths per patient, each stay bin's share), its weights
    are the fitted ones, and ``calibrated=False`` draws as before."""
    rng = np.random.default_rng(5)
    generated = codes_only(cohort)
    for p in generated:
        if any(c.startswith("995") for c in p["visits"][-1]) and rng.random() < 0.5:
            p["visits"] = [*p["visits"][:-1], [c for c in p["visits"][-1] if not c.startswith("995")] or ["4019"]]
    calibrated = calibrate_time_model(time_model, cohort, generated, code_category)
    rows = time_model.head_rows(generated, code_category)
    real_rate = np.mean([p["hospital_death"] for p in cohort])
    raw = time_model.probs("death", rows["death"])[:, 1].mean()
    assert raw < real_rate - 0.02  # the shifted codes lose deaths
    assert abs(calibrated.probs("death", rows["death"])[:, 1].mean() - real_rate) < 1e-4
    target = class_shares(cohort, time_model)
    np.testing.assert_allclose(calibrated.probs("stay", rows["stay"]).mean(axis=0), target["stay"], atol=1e-4)
    alive = calibrated.probs("death", rows["death"])[:, 0]
    np.testing.assert_allclose(np.average(calibrated.probs("after", rows["after"]), axis=0, weights=alive),
                               target["after"], atol=1e-4)
    for h in time_model.weights:
        np.testing.assert_array_equal(calibrated.weights[h], time_model.weights[h])
    np.testing.assert_allclose(calibrated.probs("death", rows["death"], calibrated=False)[:, 1].mean(), raw)
    calibrated.save(tmp_path)
    loaded = VisitTimeModel.load(tmp_path)
    assert all(np.array_equal(loaded.shifts[h], calibrated.shifts[h]) for h in calibrated.shifts)
    deaths = [calibrated.sample(generated, np.random.default_rng(s), code_category)[1]["hospital_deaths"]
              for s in range(3)]
    assert all(abs(d - real_rate * len(generated)) < 2 for d in deaths)


def test_the_tail_beyond_the_outer_edge_is_drawn_from_its_share_and_mean(cohort, tmp_path):
    """Stays with 2% of long stays (mean 200 days): the model keeps their share beyond the 99.5%
    edge and mean excess, and the drawn stays' mean is the real one within 5%, which clipping at
    the edge lowers by 8% or more. A tail of fewer than MIN_WITHIN_BIN_VALUES values is not kept."""
    rng = np.random.default_rng(3)
    long_stays = [{**p, "stay_days": [float(rng.exponential(200.0) if rng.random() < 0.02 else rng.gamma(2.0, 2.5))
                                      for _ in p["visits"]]} for p in cohort * 3]
    model = fit_time_model(long_stays, code_category, bins={"stay": 4})
    stays = values(long_stays)["stay"]
    edge = model.edges["stay"][-1]
    share, mean = model.tails["stay"]
    assert share > 0 and abs(mean / (stays[stays > edge] - edge).mean() - 1) < 1e-6
    drawn_stays = drawn(model, long_stays, seed=1)["stay"]
    assert drawn_stays.max() > edge and abs(drawn_stays.mean() / stays.mean() - 1) < 0.05
    assert stays.mean() - np.clip(stays, None, edge).mean() > 0.08 * stays.mean()  # what clipping loses
    model.save(tmp_path)
    np.testing.assert_array_equal(VisitTimeModel.load(tmp_path).tails["stay"], model.tails["stay"])
    few = np.r_[np.linspace(1.0, 10.0, 1000), np.full(MIN_WITHIN_BIN_VALUES - 1, 500.0)]
    assert not upper_tail(few, quantile_edges(few, 4)).any()


def test_a_cohort_without_deaths_gets_none(cohort):
    """No death in the training cohort (in hospital or later): none is drawn."""
    alive = [{**p, "hospital_death": False, "death_days": None} for p in cohort[:500]]
    out, stats = fit_time_model(alive, code_category).sample(codes_only(alive), np.random.default_rng(0),
                                                             code_category)
    assert stats["hospital_deaths"] == 0 and all(p["death_days"] is None for p in out)


def test_fit_refuses_a_cohort_without_times(cohort):
    with pytest.raises(ValueError, match="needs patients with stay_days"):
        fit_time_model(codes_only(cohort), code_category)
    assert len(quantile_edges(np.zeros(10), 4)) == 2  # a constant value still makes one bin


def test_cms_age_caps_move_admissions_earlier():
    # age 0.5, a newborn-capped (age 0) code at the third visit, far in time: it and the visits
    # before it are pulled back inside the first year, in order, without overlap.
    stays, gaps = np.array([10.0, 5.0, 3.0, 2.0]), np.array([0.0, 400.0, 300.0, 50.0])
    caps = np.array([np.inf, np.inf, 0.0, np.inf])
    s, g, moved = _cap_ages(np.array([0.5]), np.array([4]), stays, gaps, caps)
    admit = np.cumsum(g) + np.r_[0, np.cumsum(s)[:-1]]
    assert moved == 2 and np.all(g >= 0) and np.all(s >= 0)
    assert 0.5 + admit[2] / 365.25 < 1.0  # whole-year age 0 at the capped visit
    assert np.all(np.diff(admit) >= s[:-1] - 1e-9)  # no overlapping stays
    s2, g2, moved2 = _cap_ages(np.array([30.0]), np.array([4]), stays, gaps, np.full(4, np.inf))
    assert moved2 == 0 and np.array_equal(s2, stays) and np.array_equal(g2, gaps)


@pytest.fixture(scope="module")
def checkpoint(cohort, time_model, tiny_config, tmp_path_factory):
    """A tiny untrained model saved with its prior and time model."""
    directory = tmp_path_factory.mktemp("timed")
    tok = PromptEHRTokenizer.from_patients(cohort)
    torch.manual_seed(0)
    model = PromptEHRForConditionalGeneration(
        PromptEHRConfig.from_preset("small", tokenizer=tok, **tiny_config, max_position_embeddings=128))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    CohortPrior.from_patients(cohort).save(directory)
    time_model.save(directory)
    save_custom_generate(directory, tok)
    return PromptEHRForConditionalGeneration.from_pretrained(directory).eval(), tok, directory


def test_generated_patients_get_times_and_the_same_codes_without(checkpoint):
    model, tok, _ = checkpoint
    timed, stats = generate_patients(model, tok, 40, seed=3, batch_size=40, progress=False)
    plain, plain_stats = generate_patients(model, tok, 40, seed=3, batch_size=40, progress=False, times=False)
    assert stats["times"] and not plain_stats["times"]
    assert timed["visits"] == plain["visits"] and timed["age"] == plain["age"]
    assert all(s is not None for s in timed["stay_days"]) and all(s is None for s in plain["stay_days"])


def test_outcome_conditioned_generation(checkpoint):
    model, tok, _ = checkpoint
    died, stats = generate_patients(model, tok, 12, seed=0, batch_size=64, progress=False, hospital_death=True)
    assert len(died) == 12 and all(died["hospital_death"]) and stats["outcome_generated"] >= 12
    assert died["subject_id"] == list(range(1, 13))
    with pytest.raises(ValueError, match="needs the times"):
        generate_patients(model, tok, 5, progress=False, hospital_death=True, times=False)


def test_generate_cli_writes_the_outcome_into_the_mimic_tables(checkpoint, tmp_path, capsys):
    _, _, directory = checkpoint
    out = tmp_path / "died"
    assert cli.main(["generate", "--model", str(directory), "--n", "6", "--out", str(out), "--outcome", "died",
                     "--batch-size", "64"]) == 0
    patients = pq.read_table(out / "synthetic.parquet").to_pylist()
    assert len(patients) == 6 and all(p["hospital_death"] and p["death_days"] is None for p in patients)
    admissions = pd.read_csv(out / "ADMISSIONS.csv")
    last = admissions.sort_values("ADMITTIME").groupby("SUBJECT_ID").tail(1)
    assert (last["HOSPITAL_EXPIRE_FLAG"] == 1).all() and admissions["HOSPITAL_EXPIRE_FLAG"].sum() == 6
    assert (pd.read_csv(out / "PATIENTS.csv")["EXPIRE_FLAG"] == 1).all()
    assert cli.main(["generate", "--model", str(directory), "--n", "3", "--out", str(tmp_path / "x"),
                     "--outcome", "died", "--no-time"]) == 2
    assert "--outcome fixes the outcome" in capsys.readouterr().err
