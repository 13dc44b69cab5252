"""The package end to end on an ICD-10-CM cohort: the code-system registry, the tokenizer's
categories, the simulator's ICD-10-CM cohort, the co-occurrence counts, the CMS edits written
into a checkpoint, the metrics, and `promptehr train` on a simulated ICD-10-CM cohort; ICD-9-CM
stays the default everywhere."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from promptehr_hf.cli import main as cli_main
from promptehr_hf.datasets_scripts import code_systems, icd9, icd10, simulator
from promptehr_hf.datasets_scripts.mimic4 import read_mimic4
from promptehr_hf.metrics.coherence import coherence
from promptehr_hf.metrics.report import _code_system, evaluate_cohorts, recorded_code_system
from promptehr_hf.modeling_promptehr.generation.command import write_cohort
from promptehr_hf.modeling_promptehr.generation.pipeline import cms_edits
from promptehr_hf.modeling_promptehr.generation.processors import CMSEditTable, VocabIndex
from promptehr_hf.modeling_promptehr.training import pipeline
from promptehr_hf.modeling_promptehr.training.losses import category_cooccurrence, tokenizer_categories
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer, code_category

pytestmark = pytest.mark.usefixtures("one_thread")

# Type 2 diabetes (E11: ICD-10 E codes are endocrine), hypertension, a hip fracture, a
# female-only maternity code (ages 9-64 in ICD-10-CM) and a male-only adult code (N400).
ICD10_PATIENTS = [
    {"subject_id": 1, "age": 61.0, "sex": "M", "visits": [["E119", "E1165", "I10"], ["N400", "I10"]]},
    {"subject_id": 2, "age": 30.0, "sex": "F", "visits": [["O0900", "E119"], ["S72001A"]]},
    {"subject_id": 3, "age": 75.0, "sex": "F", "visits": [["I10", "E1165"]]},
]


@pytest.fixture(scope="module")
def simulated10():
    return simulator.simulate(1500, seed=0, code_system="icd10cm")


def test_code_system_registry():
    assert code_systems.code_system("icd9cm") is icd9 and code_systems.code_system("icd10cm") is icd10
    assert (icd9.SYSTEM, icd10.SYSTEM, code_systems.DEFAULT_CODE_SYSTEM) == ("icd9cm", "icd10cm", "icd9cm")
    with pytest.raises(ValueError, match=r"^unknown code system 'icd11'; expected one of 'icd9cm', 'icd10cm'$"):
        code_systems.code_system("icd11")


def test_tokenizer_icd10_categories_normalisation_and_round_trip(tmp_path):
    tok = PromptEHRTokenizer.from_patients(ICD10_PATIENTS, code_system="icd10cm")
    assert tok.code_system == "icd10cm"
    cats = tokenizer_categories(tok)[0]
    assert cats == ["E11", "I10", "N40", "O09", "S72"]  # 3 characters, E11 included
    assert tok.category_of("E119") == "E11" and tok.normalize_code("e11.9") == "E119"
    # a dotted code is its dotless one; an unseen code of a known category falls back to it
    assert tok.encode_visit(["E11.9"]) == tok.encode_visit(["E119"])
    assert tok.decode_visits(tok.encode_visit(["E11.22"])) == [["E11"]] and tok.fallback_counts["category"] == 1
    # the ICD-9-CM rules read the same string differently: E codes are 4-character categories there
    assert code_category("E119") == "E119" and code_category("E119", "icd10cm") == "E11"
    assert code_category("E8800", "icd9cm") == "E880"

    tok.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["code_system"] == "icd10cm"
    back = PromptEHRTokenizer.from_pretrained(tmp_path / "tok")
    assert back.code_system == "icd10cm" and back.get_vocab() == tok.get_vocab()
    # a checkpoint saved before the tokenizer recorded its code system is ICD-9-CM
    del config["code_system"]
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    assert PromptEHRTokenizer.from_pretrained(tmp_path / "tok").code_system == "icd9cm"
    with pytest.raises(ValueError, match="unknown code system 'icd10'"):
        PromptEHRTokenizer.from_patients(ICD10_PATIENTS, code_system="icd10")


def test_cooccurrence_counts_use_the_code_system():
    tok = PromptEHRTokenizer.from_patients(ICD10_PATIENTS, code_system="icd10cm")
    cats = tokenizer_categories(tok)[0]
    C = category_cooccurrence(ICD10_PATIENTS, cats, code_system="icd10cm")
    e11, i10 = cats.index("E11"), cats.index("I10")
    assert C[e11, e11] == 1  # E119 and E1165 in one visit: two distinct codes of E11
    assert C[e11, i10] == 2  # visits holding E11 and I10
    # read as ICD-9-CM, E119 and E1165 would be codes of the categories E119 and E116
    assert category_cooccurrence(ICD10_PATIENTS, cats)[e11, e11] == 0


def test_cms_edits_come_from_the_tokenizers_code_system():
    tok10 = PromptEHRTokenizer.from_patients(ICD10_PATIENTS, code_system="icd10cm")
    edits = cms_edits(tok10)
    assert edits["age_ranges"]["age_maternity"] == [9, 64]  # ICD-10-CM's, not ICD-9-CM's 12-55
    classes = {c: tuple(e["edits"]) for e in edits["classes"] for c in e["codes"]}
    assert classes["O0900"] == ("sex_female_only", "age_maternity") and classes["N400"] == icd10.edits_of("N400")
    table = CMSEditTable(VocabIndex(tok10), edits)
    forbidden = table.forbidden_codes([70.0, 30.0, 30.0], ["F", "F", "M"])
    o09, n40 = tok10.convert_tokens_to_ids(["O0900", "N400"])
    assert forbidden[:, o09].tolist() == [True, False, True] and forbidden[:, n40].tolist() == [True, True, False]
    # an ICD-9-CM tokenizer still takes ICD-9-CM's edits
    tok9 = PromptEHRTokenizer.from_patients([{"visits": [["650", "4019"]]}])
    assert cms_edits(tok9)["age_ranges"]["age_maternity"] == [12, 55]


def test_metrics_score_icd10_codes_with_icd10_tables():
    # a man with a maternity code: an ICD-10-CM conflict; dotted codes are their dotless ones
    synthetic = [{"age": 40.0, "sex": "M", "visits": [["O09.00", "E11.9"]]},
                 {"age": 50.0, "sex": "F", "visits": [["I10"]]}]
    scores = coherence(synthetic, ICD10_PATIENTS, code_system="icd10cm")
    assert scores["unknown_code_rate"] == 0.0
    assert scores["cms_invalid_code_rate"] == pytest.approx(1 / 3) and scores["cms_invalid_patient_rate"] == 0.5
    assert scores["cms_invalid_patient_rate_real"] == 0.0 and scores["top_code_share"] == 0.5
    # the default reads them as ICD-9-CM: unknown codes, no edits
    as_icd9 = coherence(synthetic, ICD10_PATIENTS)
    assert as_icd9["unknown_code_rate"] > 0.5 and as_icd9["cms_invalid_code_rate"] == 0.0
    with pytest.raises(ValueError, match="unknown code system"):
        coherence(synthetic, ICD10_PATIENTS, code_system="ICD10")


def test_simulated_icd10_cohort_is_billable_and_cms_clean(simulated10):
    codes = [c for p in simulated10 for v in p["visits"] for c in v]
    assert codes and all(icd10.is_billable(c) for c in set(codes))
    ages = [p["age"] for p in simulated10 for v in p["visits"] for _ in v]
    sexes = [p["sex"] for p in simulated10 for v in p["visits"] for _ in v]
    assert (icd10.violations(codes, ages, sexes) == "").all()
    assert all(v and len(set(v)) == len(v) for p in simulated10 for v in p["visits"])
    assert any(icd10.edits_of(c) for c in set(codes))  # edited codes are drawn, where allowed
    # the same patients as the ICD-9-CM cohort: demographics and admissions
    icd9_cohort = simulator.simulate(1500, seed=0)
    assert [(p["subject_id"], p["age"], p["sex"], len(p["visits"])) for p in simulated10] == \
        [(p["subject_id"], p["age"], p["sex"], len(p["visits"])) for p in icd9_cohort]
    summary = simulator.vocabulary_summary("icd10cm")
    assert summary["codes"] + summary["dropped_icd9_codes"] <= summary["icd9_codes"]
    assert 0 < summary["dropped_icd9_codes"] == len(summary["dropped"])
    # 2724's only GEM target, E784, is a header since FY2019: written as its unspecified form.
    assert icd10.from_icd9("2724") == ("E784",) and "2724" not in summary["dropped"]
    assert simulator._billable_targets(["2724", "4019", "E9300"], "icd10cm") == ["E7849", "I10", ""]
    assert "E9300" in summary["dropped"]  # ICD-10-CM has no external-cause code for it
    assert simulator.vocabulary_summary("icd9cm")["dropped_icd9_codes"] == 0


def test_icd9_simulation_is_unchanged():
    default = simulator.simulate(300, seed=3)
    assert simulator.simulate(300, seed=3, code_system="icd9cm") == default
    assert all(icd9.is_billable(c) for p in default for v in p["visits"] for c in v)
    with pytest.raises(ValueError, match="unknown code system"):
        simulator.simulate(5, code_system="icd10")


def test_simulate_cli_writes_an_icd10_mimic4_folder(tmp_path, capsys):
    out = tmp_path / "sim"
    assert cli_main(["simulate", "--patients", "40", "--code-system", "icd10cm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "without a billable icd10cm target dropped" in printed
    assert {p.name for p in (out / "hosp").iterdir()} == {"patients.csv.gz", "admissions.csv.gz",
                                                           "diagnoses_icd.csv.gz", "procedures_icd.csv.gz",
                                                           "prescriptions.csv.gz"}


def test_train_on_a_simulated_icd10_cohort(tmp_path, tiny_config_json):
    """`promptehr train --code-system icd10cm`: the tokenizer, the checkpoint's CMS edits, the
    generated cohort and its evaluation are all ICD-10-CM."""
    out = tmp_path / "run"
    run = pipeline.main(["--output-dir", str(out), "--patients", "300", "--code-system", "icd10cm",
                         "--config-overrides", tiny_config_json, "--batch-size", "16", "--max-steps", "3",
                         "--warmup-steps", "0", "--eval-steps", "0", "--save-steps", "3",
                         "--eval-generate-patients", "0", "--visit-types", "0", "--max-source-length", "64",
                         "--generate", "60", "--generate-batch-size", "32", "--calibration-patients", "30"])
    assert run["code_system"] == "icd10cm" and run["cohort"]["code_system"] == "icd10cm"
    assert (out / "mimic4" / "hosp" / "diagnoses_icd.csv.gz").is_file() and not (out / "mimic3").exists()
    model = out / "model"
    tok = PromptEHRTokenizer.from_pretrained(model)
    assert tok.code_system == "icd10cm"
    cats = tokenizer_categories(tok)[0]
    dx = [c for c in cats if tok.modality_rank(c) == 0]
    assert dx and all(len(c) == 3 and icd10.is_valid(c) for c in dx)
    # the simulated cohort's procedures are ICD-10-PCS: their categories are 3 characters too
    assert tok.modalities == ("diagnoses", "procedures", "medications")
    assert all(len(c) == len("PX:") + 3 for c in cats if c.startswith("PX:"))
    edits = json.loads((model / "generation_config.json").read_text())["cms_edits"]
    assert edits["age_ranges"]["age_maternity"] == [9, 64]

    synthetic = json.loads((out / "synthetic" / "generation_stats.json").read_text())
    assert synthetic["code_system"] == "icd10cm"
    generated = datasets.Dataset.from_parquet(str(out / "synthetic" / "synthetic.parquet")).to_list()
    codes = [c for p in generated for v in p["visits"] for c in v]
    assert codes and all(icd10.is_valid(c) for c in codes)
    ages = [p["age"] for p in generated for v in p["visits"] for _ in v]
    sexes = [p["sex"] for p in generated for v in p["visits"] for _ in v]
    assert (icd10.violations(codes, ages, sexes) == "").all()
    # written in the MIMIC-IV layout (MIMIC-III tables cannot hold ICD-10-CM) and read back as such
    assert not (out / "synthetic" / "DIAGNOSES_ICD.csv").exists()
    back, summary = read_mimic4(out / "synthetic")
    assert summary["code_system"] == "icd10cm"
    assert [v for p in back for v in p["visits"]] == [v for p in generated for v in p["visits"]]
    with pytest.raises(ValueError, match="format mimic3 holds ICD-9-CM codes only"):
        write_cohort(generated, tmp_path / "as_mimic3", fmt="mimic3", code_system="icd10cm")

    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["meta"]["code_system"] == "icd10cm"
    row = metrics["rows"]["synthetic"]
    assert row["unknown_code_rate"] == 0.0 and row["cms_invalid_code_rate"] == 0.0
    assert "codes outside ICD-10-CM FY2021" in (out / "evaluation" / "metrics.md").read_text()

    # `promptehr evaluate` takes the code system its inputs record: a prepared folder's summary, a
    # generated folder's stats, a MIMIC-IV folder (read as prepare reads it)
    report = tmp_path / "report"
    assert cli_main(["evaluate", "--real", str(out / "mimic4"), "--train", str(out / "data"), "--synthetic",
                     str(out / "synthetic"), "--out", str(report), "--no-plots", "--n-attack", "50"]) == 0
    result = json.loads((report / "metrics.json").read_text())
    assert result["meta"]["code_system"] == "icd10cm" and result["meta"]["n_real"] == 300
    assert result["rows"]["floor"]["unknown_code_rate"] == 0.0

    with pytest.raises(SystemExit, match="--code-system applies to the simulated cohort"):
        pipeline.main(["--output-dir", str(tmp_path / "other"), "--mimic-dir", str(out / "mimic4"),
                       "--code-system", "icd10cm"])


def test_report_refuses_inputs_of_two_code_systems(tmp_path):
    real, synthetic = tmp_path / "real", tmp_path / "synthetic"
    for folder, name, system in ((real, "summary.json", "icd9cm"), (synthetic, "generation_stats.json", "icd10cm")):
        folder.mkdir()
        (folder / name).write_text(json.dumps({"code_system": system}))
    args = type("Args", (), {"code_system": None, "real": str(real), "synthetic": str(synthetic), "train": None})
    assert recorded_code_system(synthetic) == "icd10cm" and recorded_code_system(tmp_path) is None
    with pytest.raises(ValueError, match="record different code systems"):
        _code_system(args)
    args.code_system = "icd10cm"
    assert _code_system(args) == "icd10cm"


def test_evaluate_cohorts_defaults_to_icd9():
    rng = np.random.default_rng(0)
    cohort = [{"age": 50.0, "sex": "FM"[i % 2], "visits": [list(rng.choice(["4019", "25000", "486"], 2,
                                                                          replace=False))]} for i in range(20)]
    result = evaluate_cohorts(cohort, cohort, baseline=False, plots=False)
    assert result["meta"]["code_system"] == "icd9cm" and result["rows"]["synthetic"]["unknown_code_rate"] == 0.0


def test_evaluate_modules_take_the_code_system(repo_root):
    import evaluate

    cols = {k: [p[k] for p in ICD10_PATIENTS] for k in ("visits", "age", "sex")}
    coh = evaluate.load(str(repo_root / "metrics" / "ehr_coherence"))
    assert coh.compute(**cols, real=ICD10_PATIENTS, code_system="icd10cm")["unknown_code_rate"] == 0.0
    assert coh.compute(**cols, real=ICD10_PATIENTS)["unknown_code_rate"] > 0.5  # read as ICD-9-CM
    priv = evaluate.load(str(repo_root / "metrics" / "ehr_privacy"))
    dotted = {**cols, "visits": [[[c[:3] + "." + c[3:] if len(c) > 3 else c for c in v] for v in p]
                                 for p in cols["visits"]]}
    # E11.9 is E119 in ICD-10-CM (not in ICD-9-CM, whose E categories have 4 characters)
    assert priv.compute(**dotted, train=ICD10_PATIENTS, holdout=ICD10_PATIENTS[:1],
                        code_system="icd10cm")["exact_copy_rate"] == 1.0
    assert priv.compute(**dotted, train=ICD10_PATIENTS, holdout=ICD10_PATIENTS[:1])["exact_copy_rate"] < 1.0
