"""Nothing lost: what each command refuses, and that an earlier output survives any failure.

A refusal is one line on stderr naming the path or value, exit code 2, and nothing written or
deleted; it comes before any heavy work (the model, the cohorts and the simulator are never
loaded). The writers' helper (`promptehr_hf.file_utils`) is tested directly first.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from promptehr_hf import cli, file_utils
from promptehr_hf.datasets_scripts.cohort_io import write_mimic3_csvs, write_parquet
from promptehr_hf.datasets_scripts.simulator import simulate
from promptehr_hf.file_utils import (
    MANIFEST,
    OutputFolderError,
    atomic_write,
    check_output,
    remove_stale,
    replace_folder,
    write_json_atomic,
)
from promptehr_hf.metrics import report as report_mod
from promptehr_hf.modeling_promptehr.configuration_promptehr import PromptEHRConfig
from promptehr_hf.modeling_promptehr.generation import command as generate_mod
from promptehr_hf.modeling_promptehr.generation.command import write_cohort
from promptehr_hf.modeling_promptehr.generation.pipeline import generate_patients
from promptehr_hf.modeling_promptehr.generation.prior import CohortPrior
from promptehr_hf.modeling_promptehr.modeling_promptehr import PromptEHRForConditionalGeneration
from promptehr_hf.modeling_promptehr.training import pipeline as train_mod
from promptehr_hf.tokenization.tokenization_promptehr import PromptEHRTokenizer

DEAD_PID = 2**31 - 2  # above any pid_max: never a running process


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included): relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], *names: object) -> str:
    """Run the CLI; assert a one-line refusal (exit code 2) that names each of ``names``."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"promptehr {argv[0]}: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)
    return lines[0]


@pytest.fixture(scope="module")
def patients() -> list[dict]:
    return simulate(40, seed=1)


@pytest.fixture
def mimic(tmp_path, patients) -> Path:
    write_mimic3_csvs(patients, tmp_path / "mimic", seed=0)
    return tmp_path / "mimic"


class Loaded(Exception):
    """Raised by the stand-ins of the heavy steps: the command got past its checks."""


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Make loading a model, reading cohorts and preparing training data fail loudly."""

    def loaded(*args, **kwargs):
        raise Loaded("the heavy step ran")

    monkeypatch.setattr(generate_mod, "load_model", loaded)
    monkeypatch.setattr(report_mod, "read_cohort", loaded)
    monkeypatch.setattr(train_mod, "prepare_data", loaded)


# ----------------------------------------------------------------------------- the helper
def test_atomic_write_keeps_the_earlier_file(tmp_path):
    target = tmp_path / "a.json"
    write_json_atomic(target, {"v": 1})

    def half(tmp):
        Path(tmp).write_text('{"v": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half)
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_replace_folder_keeps_the_earlier_folder_on_any_failure(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with replace_folder(out, "demo") as tmp:
        (tmp / "a.txt").write_text("1")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["command"] == "demo" and manifest["files"] == ["a.txt"]
    before = snapshot(out)

    with pytest.raises(KeyboardInterrupt), replace_folder(out, "demo") as tmp:  # an error while writing
        (tmp / "a.txt").write_text("2")
        raise KeyboardInterrupt
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["out"]

    real_replace = os.replace

    def failing(src, dst):  # the rename of the new folder onto out fails
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(file_utils.os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"), replace_folder(out, "demo") as tmp:
        (tmp / "a.txt").write_text("3")
    monkeypatch.undo()
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["out"]

    # A folder holding anything else, or another command's output, is never replaced.
    with pytest.raises(OutputFolderError, match="promptehr demo"), replace_folder(out, "other"):
        pass
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="notes.txt"), replace_folder(out, "demo"):
        pass
    assert (out / "notes.txt").read_text() == "mine" and (out / "a.txt").read_text() == "1"


def test_a_killed_run_is_cleaned_up_at_the_next_start(tmp_path):
    out = tmp_path / "out"
    with replace_folder(out, "demo") as tmp:
        (tmp / "a.txt").write_text("1")
    # Killed between the two renames: the earlier output sits aside, out is missing.
    os.replace(out, tmp_path / f".out.old-{DEAD_PID}-0123abcd")
    (tmp_path / f".out.tmp-{DEAD_PID}-89abcdef").mkdir()
    live = tmp_path / f".out.tmp-{os.getpid()}-00000000"  # a concurrent writer: left alone
    live.mkdir()
    check_output(out, "demo")
    assert (out / "a.txt").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == [live.name, "out"]
    live.rmdir()
    # Killed while deleting the set-aside folder: out is the new output, the old one goes.
    (tmp_path / f".out.old-{DEAD_PID}-0123abcd").mkdir()
    assert remove_stale(out) == [tmp_path / f".out.old-{DEAD_PID}-0123abcd"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ----------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_prepare_never_writes_over_inside_or_around_its_input(mimic, tmp_path, capsys, where):
    # A file named summary.json once made any folder replaceable.
    (mimic / "summary.json").write_text("{}")
    out = {"equal": mimic, "inside": mimic / "prepared", "containing": tmp_path}[where]
    (tmp_path / "summary.json").write_text("{}")
    before = snapshot(tmp_path)
    how = {"equal": "is the input", "inside": "is inside the input", "containing": "contains the input"}[where]
    refused(capsys, ["prepare", "--mimic-dir", mimic, "--out", out], out, how, "--mimic-dir")
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["mimic", "summary.json"]


def test_prepare_replaces_only_its_own_earlier_output(mimic, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert cli.main(["prepare", "--mimic-dir", str(mimic), "--out", str(out)]) == 0
    assert json.loads((out / MANIFEST).read_text())["command"] == "prepare"
    assert cli.main(["prepare", "--mimic-dir", str(mimic), "--out", str(out), "--seed", "3"]) == 0
    assert json.loads((out / "summary.json").read_text())["seed"] == 3
    (out / "notes.txt").write_text("my notes")  # a user file in an earlier output
    before = snapshot(out)
    refused(capsys, ["prepare", "--mimic-dir", mimic, "--out", out], out, "notes.txt")
    assert snapshot(out) == before

    user = tmp_path / "user"  # holds a summary.json, but prepare did not write it
    user.mkdir()
    (user / "summary.json").write_text("{}")
    (user / "thesis.tex").write_text("years of work")
    refused(capsys, ["prepare", "--mimic-dir", mimic, "--out", user], user, MANIFEST)
    assert sorted(os.listdir(user)) == ["summary.json", "thesis.tex"]


# ----------------------------------------------------------------------------- simulate
def test_simulate_replaces_only_its_own_earlier_output(tmp_path, capsys):
    out = tmp_path / "csv"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    refused(capsys, ["simulate", "--patients", 5, "--out", out], out)
    assert os.listdir(out) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert cli.main(["simulate", "--patients", "5", "--out", str(out)]) == 0
    assert cli.main(["simulate", "--patients", "6", "--out", str(out)]) == 0  # its own output: replaced
    assert len(pd.read_csv(out / "PATIENTS.csv")) == 6
    refused(capsys, ["simulate", "--patients", 0, "--out", out], "--patients", "0")


# ----------------------------------------------------------------------------- generate
@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A folder that passes generate's checks (the model itself is never loaded here)."""
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "cohort_prior.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    return ckpt


@pytest.mark.parametrize("case", ["out=model", "out in model", "out=seed-patients", "out contains exclude-training",
                                  "out=prior's folder", "out=demographics"])
def test_generate_never_writes_over_inside_or_around_an_input(checkpoint, tmp_path, patients, capsys,
                                                              no_heavy_work, case):
    seeds = tmp_path / "seeds"
    write_parquet(patients, seeds / "train.parquet")
    train = tmp_path / "data" / "train.parquet"
    write_parquet(patients, train)
    write_json_atomic(tmp_path / "priors" / "prior.json", {})
    pd.DataFrame({"age": [30.0], "sex": ["F"]}).to_csv(tmp_path / "demo.csv", index=False)
    base = ["generate", "--model", checkpoint, "--overwrite"]
    argv, out, flag = {
        "out=model": (base + ["--n", 5, "--out", checkpoint], checkpoint, "--model"),
        "out in model": (base + ["--n", 5, "--out", checkpoint / "synthetic"], checkpoint / "synthetic", "--model"),
        "out=seed-patients": (base + ["--mode", "seeded", "--seed-patients", seeds, "--out", seeds], seeds,
                              "--seed-patients"),
        "out contains exclude-training": (base + ["--n", 5, "--exclude-training", train, "--out", train.parent],
                                          train.parent, "--exclude-training"),
        "out=prior's folder": (base + ["--n", 5, "--prior", tmp_path / "priors" / "prior.json", "--out",
                                       tmp_path / "priors"], tmp_path / "priors", "--prior"),
        "out=demographics": (base + ["--mode", "conditional", "--demographics", tmp_path / "demo.csv", "--out",
                                     tmp_path / "demo.csv"], tmp_path / "demo.csv", "--demographics"),
    }[case]
    before = snapshot(tmp_path)
    refused(capsys, argv, out, flag)
    assert snapshot(tmp_path) == before


def test_generate_overwrites_only_its_own_earlier_output(checkpoint, tmp_path, patients, capsys, no_heavy_work):
    out = tmp_path / "synthetic"
    write_cohort(patients, out, stats={"n_patients": len(patients)})
    argv = ["generate", "--model", checkpoint, "--n", 5, "--out", out]
    refused(capsys, argv, out, "not empty")  # no --overwrite
    with pytest.raises(Loaded):  # its own earlier output: accepted, the model would load next
        cli.main([str(a) for a in argv + ["--overwrite"]])
    (out / "notes.txt").write_text("keep")
    before = snapshot(out)
    refused(capsys, argv + ["--overwrite"], out, "notes.txt")
    assert snapshot(out) == before

    prepared = tmp_path / "prepared"  # another command's output
    with replace_folder(prepared, "prepare") as tmp:
        (tmp / "train.parquet").write_bytes(b"x")
    refused(capsys, ["generate", "--model", checkpoint, "--n", 5, "--out", prepared, "--overwrite"], prepared,
            "promptehr prepare")
    assert (prepared / "train.parquet").read_bytes() == b"x"


@pytest.mark.parametrize("flag, value", [("--temperature", "0"), ("--top-p", "1.5"), ("--batch-size", "0"),
                                         ("--n", "-1"), ("--top-k", "0")])
def test_generate_checks_its_arguments_before_loading_the_model(checkpoint, tmp_path, capsys, no_heavy_work,
                                                                flag, value):
    argv = ["generate", "--model", checkpoint, "--n", 5, "--out", tmp_path / "out", flag, value]
    refused(capsys, argv, flag, value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_never_writes_over_inside_or_around_an_input(tmp_path, patients, capsys, no_heavy_work):
    prepared = tmp_path / "prepared"
    for split in ("train", "validation", "test"):
        write_parquet(patients, prepared / f"{split}.parquet")
    generated = tmp_path / "generated"
    write_cohort(patients, generated)
    project = tmp_path / "project"  # an earlier report with the real cohort kept beside it
    project.mkdir()
    (project / "metrics.json").write_text("{}")
    write_parquet(patients, project / "real.parquet")
    before = snapshot(tmp_path)
    for out, flag, argv in [
        (prepared, "--real", ["--real", prepared, "--synthetic", generated]),
        (prepared / "report", "--real", ["--real", prepared, "--synthetic", generated]),
        (generated, "--synthetic", ["--real", prepared, "--synthetic", generated]),
        (project, "--real", ["--real", project / "real.parquet", "--synthetic", generated]),
        (tmp_path / "r", "--train", ["--real", prepared, "--synthetic", generated, "--train", tmp_path / "r"]),
    ]:
        refused(capsys, ["evaluate", *argv, "--out", out], out, flag)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- train
@pytest.mark.parametrize("where", ["equal", "inside", "containing", "foreign synthetic/"])
def test_train_checks_its_output_dir_first(mimic, tmp_path, capsys, no_heavy_work, where):
    out = {"equal": mimic, "inside": mimic / "run", "containing": tmp_path,
           "foreign synthetic/": tmp_path / "run"}[where]
    if where == "foreign synthetic/":
        (out / "synthetic").mkdir(parents=True)
        (out / "synthetic" / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    name = out / "synthetic" if where == "foreign synthetic/" else "--mimic-dir"
    refused(capsys, ["train", "--mimic-dir", mimic, "--output-dir", out], name)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- errors
def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-model"
    argv = ["generate", "--model", str(missing), "--n", "3", "--out", str(tmp_path / "out")]
    refused(capsys, argv, missing)
    refused(capsys, ["evaluate", "--real", tmp_path / "nope", "--synthetic", tmp_path, "--out", tmp_path / "r"],
            tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", *argv])
    with pytest.raises(FileNotFoundError):
        cli.main([*argv, "--debug"])
    monkeypatch.setenv("PROMPTEHR_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


def _row_of_icd_version(folder: Path, version: int) -> None:
    diag = pd.read_csv(folder / "DIAGNOSES_ICD.csv", dtype=str)
    diag["ICD_VERSION"] = version
    diag.to_csv(folder / "DIAGNOSES_ICD.csv", index=False)


def test_messages_show_plain_numbers(mimic, tmp_path, capsys):
    _row_of_icd_version(mimic, 10)
    line = refused(capsys, ["prepare", "--mimic-dir", mimic, "--out", tmp_path / "out"], "DIAGNOSES_ICD.csv")
    assert "e.g. 10 at data row 1" in line and "np." not in line
    _row_of_icd_version(mimic, 9)
    diag = pd.read_csv(mimic / "DIAGNOSES_ICD.csv", dtype=str)
    diag.loc[2, "SEQ_NUM"] = "1.5"
    diag.to_csv(mimic / "DIAGNOSES_ICD.csv", index=False)
    line = refused(capsys, ["prepare", "--mimic-dir", mimic, "--out", tmp_path / "out"], "seq_num")
    assert "first at data row 3: 1.5" in line and "np." not in line
    assert not (tmp_path / "out").exists()


def test_a_non_utf8_byte_names_the_file_and_the_row(mimic, tmp_path, capsys):
    path = mimic / "DIAGNOSES_ICD.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].rstrip(b"\r\n")[:-1] + b'\xe9"\n'  # data row 3: a Latin-1 byte in the quoted code
    path.write_bytes(b"".join(lines))
    line = refused(capsys, ["prepare", "--mimic-dir", mimic, "--out", tmp_path / "out"], path, "data row 3",
                   "0xe9")
    assert "line 4" in line
    assert not (tmp_path / "out").exists()


KILLED_PREPARE = textwrap.dedent("""
    import os, signal, sys, time
    from promptehr_hf import cli
    from promptehr_hf.datasets_scripts import prepare

    def killed(*args, **kwargs):  # the process is killed while it writes the splits
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(60)

    prepare.write_parquet = killed
    sys.exit(cli.main(sys.argv[2:]))
""")


def test_a_killed_prepare_keeps_the_earlier_output_and_leaves_nothing_behind(mimic, tmp_path):
    out = tmp_path / "out"
    argv = ["prepare", "--mimic-dir", str(mimic), "--out", str(out)]
    assert cli.main(argv) == 0
    before = snapshot(out)

    def killed_run(sig: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", KILLED_PREPARE, sig, *argv], capture_output=True, text=True,
                              timeout=300)

    # SIGTERM: the command cleans up itself and exits with 143.
    term = killed_run("SIGTERM")
    assert term.returncode == 143, term.stderr[-2000:]
    assert term.stderr.strip().splitlines()[-1] == "promptehr prepare: interrupted"
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["mimic", "out"]

    # SIGKILL: its temporary folder stays until the next run removes it.
    kill = killed_run("SIGKILL")
    assert kill.returncode == -signal.SIGKILL
    assert snapshot(out) == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
    assert cli.main(argv) == 0
    assert sorted(os.listdir(tmp_path)) == ["mimic", "out"]


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("custom_decoding", [True, False])
def test_generation_emits_no_past_key_values_deprecation(patients, custom_decoding, tiny_config):
    tokenizer = PromptEHRTokenizer.from_patients(patients)
    torch.manual_seed(0)
    config = PromptEHRConfig.from_preset("small", tokenizer=tokenizer, **tiny_config)
    model = PromptEHRForConditionalGeneration(config).eval()
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cohort, _ = generate_patients(model, tokenizer, 6, prior=CohortPrior.from_patients(patients),
                                          batch_size=6, progress=False, custom_decoding=custom_decoding)
    finally:
        transformers_logger.removeHandler(handler)
    assert len(cohort) == 6
    messages = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    about_cache = [m for m in messages + logged if "past_key_values" in m or "deprecated" in m.lower()]
    assert not about_cache, about_cache
