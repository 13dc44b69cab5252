"""Shared fixtures. The suite runs offline: no hub access, a throwaway HF_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Before transformers / datasets / evaluate are imported anywhere.
_HF_HOME = tempfile.mkdtemp(prefix="promptehr-hf-home-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that busy-wait make tiny-model steps ~25x slower on a busy 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _demo_dir() -> Path:
    return Path(os.environ.get("MIMIC3_DEMO_DIR", REPO.parent / "shared" / "mimic3demo"))


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The 100 real MIMIC-III demo patients, read in place from ../shared (never copied)."""
    path = _demo_dir()
    if not (path / "DIAGNOSES_ICD.csv.gz").exists():
        pytest.skip(f"MIMIC-III demo not found at {path} (set MIMIC3_DEMO_DIR to its folder)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# One tiny model for every test that trains or generates: PromptEHRConfig.from_preset("small",
# tokenizer=..., **tiny_config), or `--config-overrides tiny_config_json` on the command line.
TINY_CONFIG = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
               "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "prompt_hidden_size": 16}


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    """PromptEHRConfig overrides of the tiny test model (a fresh dict each time it is requested)."""
    return dict(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_config_json() -> str:
    """The same overrides as JSON, for ``promptehr train --config-overrides``."""
    return json.dumps(TINY_CONFIG)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine spinning OpenMP
    threads make each step 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Prepended to every clean-process script: the package may be installed in this interpreter
# (editable or not), and the child must not see it at all.
_BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "promptehr_hf":
                raise ModuleNotFoundError(name)

    sys.meta_path.insert(0, _NoPackage())
    try:
        import promptehr_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("promptehr_hf is importable in the clean process")
    """
)


@pytest.fixture
def run_clean_python(tmp_path):
    """Run a script in a fresh ``python -I`` process that cannot import promptehr_hf, from a
    folder outside the repo, with its own HF_HOME and offline: what a user who only has the
    saved checkpoint folder sees. Returns the CompletedProcess (stdout/stderr as text)."""

    def run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        path = tmp_path / "clean_child.py"
        path.write_text(_BLOCK_PACKAGE + textwrap.dedent(script))
        cwd = tmp_path / "elsewhere"
        cwd.mkdir(exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf_home"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        return subprocess.run([sys.executable, "-I", str(path), *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    return run
