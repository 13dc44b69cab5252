"""Shared fixtures. The suite runs offline: no hub access, a throwaway HF_HOME."""

from __future__ import annotations

import os
import tempfile
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine spinning OpenMP
    threads make each step 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
