"""Shared test fixtures: where the read-only project data lives, and small helpers.

The real data (HH-RLHF test splits, the SmolLM tokenizer, NLTK data) is never copied
into the repository; it is read from ``../shared/data`` beside the checkout, as in CI.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SMOLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
HH_DIR = SHARED_DATA / "hh-rlhf"
HH_HELPFUL_TEST = HH_DIR / "helpful-base" / "test.jsonl.gz"
HH_HARMLESS_TEST = HH_DIR / "harmless-base" / "test.jsonl.gz"
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
    return [_require(HH_HELPFUL_TEST), _require(HH_HARMLESS_TEST)]
