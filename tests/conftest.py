"""Shared test fixtures: where the read-only project data lives, and small helpers.

The HH-RLHF test splits ship inside the package (``dpo/bundled/hh-rlhf``, see
``dpo.data.bundled_hh_files``), so the tests read them from there. The SmolLM tokenizer
is read from ``../shared/data`` beside the checkout, as in CI, and so is the NLTK data
when it is there (the filter falls back to its bundled copy otherwise).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpo.data import bundled_hh_files

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SMOLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
TOKENIZER_JSON = SHARED_DATA / "smollm-135m" / "tokenizer.json"
NLTK_DIR = SHARED_DATA / "nltk_data"

# NLTK finds its data through NLTK_DATA; point it at the shared copy unless the
# caller chose another one. Set before any test imports nltk.
if NLTK_DIR.is_dir():
    os.environ.setdefault("NLTK_DATA", str(NLTK_DIR))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data file {path} is missing (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    return _require(TOKENIZER_JSON)


@pytest.fixture(scope="session")
def hh_files() -> list[Path]:
    """[helpful-base, harmless-base] test.jsonl.gz, bundled with the package (4,666 rows)."""
    return bundled_hh_files()
