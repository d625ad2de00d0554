"""The SmolLM tokenizer: HuggingFace's `tokenizers` library on `tokenizer.json`.

`read_tokenizer` reads a `tokenizer.json` file or the folder holding one (`smollm.load_tokenizer`
also takes hub ids and .gguf files, through `smollm.sources`). It returns a `SmolTokenizer`, a thin wrapper that behaves like the underlying
`tokenizers.Tokenizer` (encode, encode_batch, decode, ... are passed through) and adds the
special token ids that `tokenizer.json` alone does not say: which token is EOS, BOS and
padding. Those come from `tokenizer_config.json` when present; otherwise `<|endoftext|>`
is EOS and BOS, as in the SmolLM base models.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from .files import atomic_path, write_json

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
DEFAULT_EOS = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded: the message names the file."""


class SmolTokenizer:
    """A `tokenizers.Tokenizer` plus its special token ids."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str | None] | None = None,
                 source: Path | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.source = source  # the tokenizer.json this came from, if any
        self.chat_template = chat_template  # Jinja source, or None for a model without one
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

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated answer: EOS, and for a chat model also `<|im_end|>` and
        `<|endoftext|>` (an Instruct model ends its turn on the first, a base model on the second)."""
        ids = [self.eos_token_id]
        if self.chat_template is not None:
            ids += [self.tokenizer.token_to_id(t) for t in ("<|im_end|>", DEFAULT_EOS)]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        `add_generation_prompt` appends what opens the assistant's turn (ChatML's
        `<|im_start|>assistant\n`). Rendered as `transformers` renders it: Jinja with
        `trim_blocks` and `lstrip_blocks`, in a sandbox.
        """
        if self.chat_template is None:
            raise TokenizerError(f"{self.source or 'this tokenizer'} has no chat template")
        return _compiled_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.special_tokens["bos_token"] or "", eos_token=self.special_tokens["eos_token"] or "")

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `out_dir`, each atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / TOKENIZER_NAME) as tmp:
            if self.source is not None and self.source.is_file():
                shutil.copyfile(self.source, tmp)  # byte-for-byte, keeps formatting
            else:
                self.tokenizer.save(str(tmp))
        config = {k: v for k, v in self.special_tokens.items() if v is not None}
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(out / TOKENIZER_CONFIG_NAME, config)


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str):
    """A chat template compiled as transformers compiles it (sandboxed Jinja, trimmed blocks)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TokenizerError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])  # {% break %}, as transformers
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"the chat template is not valid Jinja ({e})") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(path: str | os.PathLike) -> SmolTokenizer:
    """Read a `tokenizer.json` file, or the folder holding one (and its tokenizer_config.json)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    file = path / TOKENIZER_NAME if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{path}: no {TOKENIZER_NAME} there")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a plain Exception on bad JSON
        raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from None

    special: dict[str, str | None] = {}
    chat_template = None
    config_file = file.parent / TOKENIZER_CONFIG_NAME
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{config_file}: not valid JSON ({e})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            if key in config:
                special[key] = _token_text(config[key])
        chat_template = config.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerError(f"{config_file}: chat_template must be one Jinja string "
                                 f"(named templates are not supported), got {type(chat_template).__name__}")
    try:
        return SmolTokenizer(tokenizer, special, source=file, chat_template=chat_template)
    except TokenizerError as e:
        raise TokenizerError(f"{config_file}: {e}") from None
