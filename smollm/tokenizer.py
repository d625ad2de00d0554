"""The SmolLM tokenizer: HuggingFace's `tokenizers` library on `tokenizer.json`.

`load_tokenizer` returns a `SmolTokenizer`, a thin wrapper that behaves like the underlying
`tokenizers.Tokenizer` (encode, encode_batch, decode, ... are passed through) and adds the
special token ids that `tokenizer.json` alone does not say: which token is EOS, BOS and
padding. Those come from `tokenizer_config.json` when present; otherwise `<|endoftext|>`
is EOS and BOS, as in the SmolLM base models.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
DEFAULT_EOS = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded: the message names the file."""


class SmolTokenizer:
    """A `tokenizers.Tokenizer` plus its special token ids."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str | None] | None = None,
                 source: Path | None = None):
        self.tokenizer = tokenizer
        self.source = source  # the tokenizer.json this came from, if any
        special = {"bos_token": DEFAULT_EOS, "eos_token": DEFAULT_EOS, "pad_token": None}
        special.update({k: v for k, v in (special_tokens or {}).items() if k in special})
        self.special_tokens = special
        self.bos_token_id = self._id(special["bos_token"])
        self.eos_token_id = self._id(special["eos_token"])
        pad = self._id(special["pad_token"])
        self.pad_token_id = pad if pad is not None else self.eos_token_id

    def _id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def __getattr__(self, name):  # encode, encode_batch, decode, token_to_id, ...
        return getattr(self.tokenizer, name)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `out_dir`, each atomically."""
        from .checkpoint import atomic_path, write_json  # lazy: checkpoint imports the model

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / TOKENIZER_NAME) as tmp:
            if self.source is not None and self.source.is_file():
                shutil.copyfile(self.source, tmp)  # byte-for-byte, keeps formatting
            else:
                self.tokenizer.save(str(tmp))
        config = {k: v for k, v in self.special_tokens.items() if v is not None}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(out / TOKENIZER_CONFIG_NAME, config)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(name_or_path: str | os.PathLike) -> SmolTokenizer:
    """Load from a `tokenizer.json` file, a directory holding one, or a hub id."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        from . import hub

        if not hub.looks_like_repo_id(str(name_or_path)):
            raise TokenizerError(f"{path}: no such tokenizer file or directory")
        path = hub.download_file(str(name_or_path), TOKENIZER_NAME)
        try:
            hub.download_file(str(name_or_path), TOKENIZER_CONFIG_NAME)
        except hub.HubFileNotFoundError:
            pass  # optional: special tokens then default to <|endoftext|>
    file = path / TOKENIZER_NAME if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{path}: no {TOKENIZER_NAME} there")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a plain Exception on bad JSON
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from None

    special: dict[str, str | None] = {}
    config_file = file.parent / TOKENIZER_CONFIG_NAME
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{config_file}: not valid JSON ({e})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in config:
                special[key] = _token_text(config[key])
    try:
        return SmolTokenizer(tokenizer, special, source=file)
    except TokenizerError as e:
        raise TokenizerError(f"{config_file}: {e}") from None
