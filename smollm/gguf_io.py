"""GGUF files, llama.cpp's format, in and out: a SmolLM's config, weights and tokenizer.

A HuggingFace checkpoint is a folder (config.json, model.safetensors, tokenizer.json). A GGUF
file is one binary that holds all three:

    magic "GGUF", version
    metadata     typed key/values: llama.block_count = 30, tokenizer.ggml.tokens = [...], ...
    tensor table name, shape, type and offset of every tensor
    tensor data  plain floats (F32, F16, BF16) or quantized blocks (Q8_0, Q4_1, Q4_K, ...)

Reading one as a SmolLM takes three translations, one per section of this file:

1. Config: the `llama.*` keys become a `SmolLMConfig`. A setting our model cannot run (rope
   scaling, mixture of experts, partial rotary) is refused rather than ignored.
2. Weights: every tensor is dequantized to fp32 with gguf-py, renamed to HF's names
   (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight), and the query and key
   rows are put back in HF's order (llama.cpp permutes them; see `permute_qk`).
3. Tokenizer: the vocabulary, merges and token types become a `tokenizers` byte-level BPE,
   with the pre-tokenizer that `tokenizer.ggml.pre` names.

`write_gguf` goes the other way, so a model trained here runs in llama.cpp, and `gguf_to_hf`
turns a GGUF into a HuggingFace folder. Every problem with a file raises `GGUFError`, one line
naming the file and the key or tensor at fault.

Shape legend: C hidden size, H query heads, KV key/value heads, D head dim, V vocabulary,
I MLP width, R rows of a weight matrix.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import gguf  # llama.cpp's own Python package (gguf-py): the reader, the writer and the block formats
import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .checkpoint import CheckpointError, atomic_path, checkpoint_shapes, export_state_dict, save_pretrained
from .config import ConfigError, SmolLMConfig
from .model import SmolLM
from .tokenizer import SmolTokenizer, TokenizerError


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read as a SmolLM: the message names the file and the key or tensor."""


# --------------------------------------------------------------------- tensor types
# How each type stores a row of weights. Block types cut a row into blocks that share scales:
#   Q8_0  32 weights: an f16 scale d and 32 int8 q;               w = d * q
#   Q4_1  32 weights: f16 scale d, f16 minimum m, 32 4-bit q;      w = d * q + m
#   Q4_K  256 weights in 8 sub-blocks of 32, each with a 6-bit scale and minimum, those
#         scaled again by the block's f16 d and dmin ("K-quants": scales of scales)
#   IQ*   256 weights as indices into a fixed grid of lattice points, plus signs and scales
# gguf-py dequantizes all of them; tests/test_gguf.py checks each against transformers' own
# dequantizer (or, for Q5_0/Q5_1, a decoder written out in the test).
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)
BLOCK_TYPES = (
    GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
    GGMLType.IQ1_S, GGMLType.IQ1_M, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S,
    GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ4_NL, GGMLType.IQ4_XS,
)
SUPPORTED_TYPES = FLOAT_TYPES + BLOCK_TYPES  # not: ternary TQ1_0/TQ2_0, MXFP4, NVFP4, integer types


# --------------------------------------------------------------------- tensor names
# llama.cpp's names for the tensors, and HF's. A block's tensors are blk.{i}.<short name>.weight.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",  # [V, C]
    "output_norm.weight": "model.norm.weight",  # [C]
    "output.weight": "lm_head.weight",  # [V, C], only in an untied model
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",  # [H * D, C], rows permuted (see permute_qk)
    "attn_k": "self_attn.k_proj",  # [KV * D, C], rows permuted
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(0|[1-9][0-9]*)\.([a-z_]+)\.weight")
_HF_BLOCK_RE = re.compile(r"model\.layers\.([0-9]+)\.(.+)\.weight")
ROPE_FREQS = "rope_freqs.weight"  # llama 3's per-frequency rope factors; all ones means none


def hf_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight (None: not a SmolLM tensor)."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in BLOCK_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}.weight"


def gguf_name(hf: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (the inverse of `hf_name`)."""
    for short, long in GLOBAL_NAMES.items():
        if hf == long:
            return short
    match = _HF_BLOCK_RE.fullmatch(hf)
    for short, long in BLOCK_NAMES.items():
        if match is not None and match.group(2) == long:
            return f"blk.{match.group(1)}.{short}.weight"
    raise KeyError(f"{hf} has no GGUF name")


# ------------------------------------------------------------- the q/k permutation
# Rotary embeddings rotate pairs of dimensions within each head. HF (and our model, see
# model.RotaryEmbedding) pairs dimension i with i + D/2, the two halves of a head. Meta's
# original LLaMA code, and llama.cpp after it, pairs dimension 2i with 2i + 1, neighbours.
# The two agree once the rows of q_proj and k_proj are reordered within each head, halves to
# neighbours: the same pairs turn by the same angles, only stored elsewhere, and q.k, a sum
# over all dimensions, does not care where. HF's conversion of Meta's weights made this
# reordering one way; llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) makes
# it back. So reading a GGUF undoes it, and writing one redoes it. tests/test_gguf.py checks
# that both conventions give the same attention scores.


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's row order -> llama.cpp's: w [n_heads * D, C], rows (head, half, i) -> (head, i, half).

    n_heads is H for q_proj and KV for k_proj.
    """
    R, C = w.shape
    return (w.reshape(n_heads, 2, R // n_heads // 2, C)  # [heads, 2 halves, D/2, C]
             .transpose(1, 2)  # [heads, D/2, 2, C]: row 2i + half holds HF's row half * D/2 + i
             .reshape(R, C))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's row order -> HF's: the inverse of `permute_qk`, rows (head, i, half) -> (head, half, i)."""
    R, C = w.shape
    return (w.reshape(n_heads, R // n_heads // 2, 2, C)  # [heads, D/2, 2, C]
             .transpose(1, 2)  # [heads, 2 halves, D/2, C]
             .reshape(R, C))


# ------------------------------------------------------------------ opening a file
def _open(path: str | os.PathLike) -> tuple[gguf.GGUFReader, Path]:
    """Parse a file's metadata and tensor table (the data stays memory-mapped, unread)."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, MemoryError, struct.error, OSError) as e:
        # GGUFReader raises ValueError on a bad magic number or version and on a short tensor
        # (numpy cannot reshape what the memory map cut off), IndexError on metadata cut off
        # mid-value, KeyError on a duplicate key, UnicodeDecodeError (a ValueError) on a bad name.
        raise GGUFError(f"{path}: not a GGUF file, or a truncated or corrupt one ({size} bytes): "
                        f"{type(e).__name__}: {e}") from None
    for t in reader.tensors:  # the reader checks this implicitly; say it outright
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, past the "
                            f"end of the file ({size} bytes): the file is truncated")
    return reader, path


_REQUIRED = object()
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array"}


def _is(value, kind: type) -> bool:
    """Whether a metadata value is of the kind asked for (an int counts as a float)."""
    if kind is bool or isinstance(value, bool):  # bool is an int in Python: keep them apart
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def _meta(reader: gguf.GGUFReader, path: Path, key: str, kind: type, default=_REQUIRED):
    """The value of metadata `key`, checked to be a `kind` (int, float, str, bool or list)."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"{path}: metadata key {key} is missing")
        return default
    value = field.contents()
    if not _is(value, kind):
        raise GGUFError(f"{path}: metadata key {key} should be {_KIND_NAMES[kind]}, found {value!r:.80}")
    return float(value) if kind is float else value


def _float32(value: float) -> float:
    """A float32 from the file as its shortest decimal: 9.999999747378752e-06 -> 1e-05 (same float32)."""
    return float(str(np.float32(value)))


# ------------------------------------------------------------------------ 1. config
def read_gguf_config(path: str | os.PathLike) -> SmolLMConfig:
    """The `SmolLMConfig` a GGUF file's metadata describes."""
    reader, path = _open(path)
    return _config(reader, path)


def _config(reader: gguf.GGUFReader, path: Path) -> SmolLMConfig:
    arch = _meta(reader, path, "general.architecture", str)
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only 'llama' (SmolLM's architecture) is supported")

    def get(key, kind, default=_REQUIRED):
        return _meta(reader, path, f"llama.{key}", kind, default)

    hidden = get("embedding_length", int)
    n_heads = get("attention.head_count", int)
    head_dim = get("attention.key_length", int, None)  # present only when D != C / H
    value_dim = get("attention.value_length", int, head_dim)
    if head_dim != value_dim:
        raise GGUFError(f"{path}: llama.attention.key_length={head_dim} differs from "
                        f"llama.attention.value_length={value_dim}; SmolLM needs equal head sizes")
    if head_dim is None:
        if n_heads <= 0 or hidden % n_heads:
            raise GGUFError(f"{path}: llama.embedding_length={hidden} is not a multiple of "
                            f"llama.attention.head_count={n_heads}, and llama.attention.key_length is missing")
        head_dim = hidden // n_heads
    rope_dims = get("rope.dimension_count", int, head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"{path}: llama.rope.dimension_count={rope_dims} rotates part of a head of "
                        f"{head_dim}; partial rotary embeddings are not implemented")
    scaling = get("rope.scaling.type", str, "none")
    factor = get("rope.scaling.factor", float, 1.0)
    if scaling != "none" or factor not in (0.0, 1.0):
        raise GGUFError(f"{path}: llama.rope.scaling.type={scaling!r} (factor {factor}) is not implemented; "
                        "only plain rotary embeddings are")
    experts = get("expert_count", int, 0)
    if experts:
        raise GGUFError(f"{path}: llama.expert_count={experts}: a mixture of experts is not a SmolLM")

    vocab = get("vocab_size", int, None)
    if vocab is None:  # older files: the vocabulary is as long as the token list
        field = reader.get_field("tokenizer.ggml.tokens")
        if field is None:
            raise GGUFError(f"{path}: metadata key llama.vocab_size is missing, and so is tokenizer.ggml.tokens")
        vocab = len(field.data)

    def token_id(name):
        return _meta(reader, path, f"tokenizer.ggml.{name}_token_id", int, None)

    try:
        return SmolLMConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length", int),
            num_hidden_layers=get("block_count", int),
            num_attention_heads=n_heads,
            num_key_value_heads=get("attention.head_count_kv", int, n_heads),
            head_dim=head_dim,
            rms_norm_eps=_float32(get("attention.layer_norm_rms_epsilon", float)),
            rope_theta=_float32(get("rope.freq_base", float, 10000.0)),
            max_position_embeddings=get("context_length", int),
            # llama.cpp ties the head by leaving output.weight out
            tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
            bos_token_id=token_id("bos"),
            eos_token_id=token_id("eos"),
            pad_token_id=token_id("padding"),
        )
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None


# ----------------------------------------------------------------------- 2. weights
def read_gguf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as fp32, by HF name, q/k rows in HF's order."""
    reader, path = _open(path)
    return _state_dict(reader, path, _config(reader, path))


def _state_dict(reader: gguf.GGUFReader, path: Path, config: SmolLMConfig) -> dict[str, torch.Tensor]:
    expected = checkpoint_shapes(config)  # HF name -> shape: what a model of this config holds
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # GGUF lists dimensions fastest-varying first (ggml's `ne`): the embedding [V, C] is
        # stored as (C, V). Reversed, it is the row-major shape that numpy and torch use.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.name == ROPE_FREQS:
            _check_rope_freqs(t, path, shape)
            continue
        name = hf_name(t.name)
        if name is None or name not in expected:
            raise GGUFError(f"{path}: unexpected tensor {t.name} (a {config.num_hidden_layers}-layer "
                            f"{'tied' if config.tie_word_embeddings else 'untied'} llama has no such tensor)")
        if shape != expected[name]:
            raise GGUFError(f"{path}: tensor {t.name} has shape {list(shape)}, but the metadata "
                            f"describes a model that expects {list(expected[name])}")
        out[name] = _dequantize(t, path, shape)
    missing = [gguf_name(n) for n in expected if n not in out]
    if missing:
        raise GGUFError(f"{path}: tensor {missing[0]} is missing" + (
            f" (and {len(missing) - 1} more: {', '.join(missing[1:6])}{', ...' if len(missing) > 6 else ''})"
            if len(missing) > 1 else ""))
    for i in range(config.num_hidden_layers):  # llama.cpp's neighbour pairs back to HF's halves
        q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
        out[q] = unpermute_qk(out[q], config.num_attention_heads)  # [H * D, C]
        out[k] = unpermute_qk(out[k], config.num_key_value_heads)  # [KV * D, C]
    return out


def _dequantize(t, path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """One tensor as fp32 of `shape`, whatever its type in the file."""
    if t.tensor_type not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which is not supported "
                        f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
    # t.data is the memory-mapped bytes, row-major: floats [R, cols] for F32/F16, and for block
    # types [R, bytes per row] (BF16 counts as one: gguf-py maps it as raw bytes).
    # dequantize unpacks the blocks of each row: -> float32 [R, cols].
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    if values.shape != shape:
        raise GGUFError(f"{path}: tensor {t.name} dequantized to shape {list(values.shape)}, expected {list(shape)}")
    if not np.isfinite(values).all():
        raise GGUFError(f"{path}: tensor {t.name} ({t.tensor_type.name}) holds NaN or infinite values")
    if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
        values = values.copy()
    return torch.from_numpy(values)


def _check_rope_freqs(t, path: Path, shape: tuple[int, ...]) -> None:
    """rope_freqs (llama 3.1's long-context factors) is harmless only when every factor is 1."""
    if t.tensor_type != GGMLType.F32 or len(shape) != 1 or not np.all(np.asarray(t.data) == 1.0):
        raise GGUFError(f"{path}: tensor {ROPE_FREQS} rescales the rotary frequencies (llama 3 rope "
                        "scaling); only plain rotary embeddings are implemented")


# --------------------------------------------------------------------- 3. tokenizer
# llama.cpp names a byte-level BPE's pre-tokenizer (how text is cut before merging) with
# `tokenizer.ggml.pre`. These are the ones we build, the same as the HF tokenizer.json of the
# models that use them. Both end in GPT-2's byte-level regex ('s|'t|...| ?\p{L}+| ?\p{N}+|...);
# "smollm" first isolates every digit (llama.cpp's regex "\p{N}").
def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "gpt-2": _byte_level,
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # tokenizer.ggml.token_type


def read_gguf_tokenizer(path: str | os.PathLike) -> SmolTokenizer:
    """The tokenizer a GGUF file describes, as a `SmolTokenizer` (chat template included)."""
    reader, path = _open(path)
    return _tokenizer(reader, path)


def _tokenizer(reader: gguf.GGUFReader, path: Path) -> SmolTokenizer:
    def get(key, kind, default=_REQUIRED):
        return _meta(reader, path, f"tokenizer.{key}", kind, default)

    model = get("ggml.model", str)
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported")
    pre = get("ggml.pre", str)
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(PRE_TOKENIZERS)}")
    tokens = get("ggml.tokens", list)
    types = get("ggml.token_type", list, [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        duplicate = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise GGUFError(f"{path}: tokenizer.ggml.tokens lists {duplicate!r} twice")
    merges = []
    for i, merge in enumerate(get("ggml.merges", list)):
        pair = merge.split(" ")  # "Ġ t": a byte-level token never holds a space (it is spelled Ġ)
        if len(pair) != 2:
            raise GGUFError(f"{path}: tokenizer.ggml.merges[{i}] = {merge!r} is not two tokens")
        merges.append((pair[0], pair[1]))

    specials = {}  # ids of bos, eos, unk, padding, checked against the vocabulary
    for name in ("bos", "eos", "unknown", "padding"):
        token_id = get(f"ggml.{name}_token_id", int, None)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.{name}_token_id={token_id} is outside the "
                            f"vocabulary of {len(tokens)} tokens")
        specials[name] = None if token_id is None else tokens[token_id]

    try:
        bpe = models.BPE(vocab=vocab, merges=merges, unk_token=specials["unknown"], fuse_unk=False,
                         byte_fallback=False)
    except Exception as e:  # the Rust side raises a plain Exception for a merge of unknown tokens
        raise GGUFError(f"{path}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    # Control tokens (<|im_start|>, ...) and user-defined ones are matched whole in the text,
    # never cut into bytes; only control tokens are special (dropped by skip_special_tokens).
    # They keep their ids: each is already in the BPE vocabulary.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == TOKEN_USER_DEFINED])
    # add_special_tokens=True adds BOS/EOS only when the file asks (SmolLM's do not).
    add_bos = get("ggml.add_bos_token", bool, False) and specials["bos"] is not None
    add_eos = get("ggml.add_eos_token", bool, False) and specials["eos"] is not None
    if add_bos or add_eos:
        bos, eos = [specials["bos"]] * add_bos, [specials["eos"]] * add_eos
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(bos + ["$A"] + eos), pair=" ".join(bos + ["$A"] + eos + bos + ["$B:1"] + eos),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(bos + eos)])

    chat_template = get("chat_template", str, None)
    try:
        return SmolTokenizer(tokenizer, {"bos_token": specials["bos"], "eos_token": specials["eos"],
                                         "pad_token": specials["padding"]}, chat_template=chat_template)
    except TokenizerError as e:
        raise GGUFError(f"{path}: {e}") from None


# ----------------------------------------------------------- loading and converting
def load_gguf(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None
              ) -> tuple[SmolLM, SmolTokenizer]:
    """A SmolLM (eval mode; fp32 unless `dtype`) and its tokenizer from one GGUF file."""
    reader, path = _open(path)  # parsed once for all three
    config = _config(reader, path)
    state = _state_dict(reader, path, config)
    tokenizer = _tokenizer(reader, path)
    model = SmolLM(config, init_weights=False)  # every weight is overwritten below
    params = dict(model.named_parameters())  # a tied head appears once, as embed_tokens
    assert set(params) == set(state), "checkpoint_shapes and the model disagree"
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    model.to(device=device, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def gguf_to_hf(path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a GGUF file to a HuggingFace folder: config.json, model.safetensors (fp32),
    tokenizer.json and tokenizer_config.json (with the chat template).

    The folder is written under a temporary name beside `out_dir` and renamed into place, so
    a crash never leaves a half-written folder. An existing non-empty `out_dir` is replaced
    only with `overwrite=True`.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
    model, tokenizer = load_gguf(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        save_pretrained(model, tmp, tokenizer=tokenizer)
        if out.exists():  # move the old folder aside first: a directory is replaced only when empty
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- writing
WRITE_TYPES = {  # type= of write_gguf -> (ggml type of the 2-D weights, general.file_type)
    "f32": (GGMLType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (GGMLType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def write_gguf(model: SmolLM, tokenizer: SmolTokenizer, path: str | os.PathLike, type: str = "f32") -> Path:
    """Write `model` and `tokenizer` as one GGUF file that llama.cpp runs, atomically.

    type: how the 2-D weights are stored: "f32", "f16", "bf16" or "q8_0". Norms stay F32, as in
    llama.cpp's converter. Q8_0 needs rows whose length is a multiple of 32; a tensor whose rows
    are not is written as F16 instead, with a warning naming it. The head is written as
    output.weight only when the model is untied.
    """
    if type not in WRITE_TYPES:
        raise ValueError(f"type={type!r}; choose one of {', '.join(WRITE_TYPES)}")
    weight_type, file_type = WRITE_TYPES[type]
    c = model.config
    vocab = _gguf_vocab(tokenizer, c.vocab_size)
    tensors = []  # (gguf name, data, ggml type)
    for name, weight in export_state_dict(model, torch.float32).items():  # fp32 CPU copies, HF names
        if name.endswith("self_attn.q_proj.weight"):
            weight = permute_qk(weight, c.num_attention_heads)  # [H * D, C]
        elif name.endswith("self_attn.k_proj.weight"):
            weight = permute_qk(weight, c.num_key_value_heads)  # [KV * D, C]
        data, qtype = _encode(gguf_name(name), weight.numpy(), weight_type)
        tensors.append((gguf_name(name), data, qtype))

    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")  # writes general.architecture = "llama"
        writer.add_name("SmolLM")
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(c.vocab_size)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        if c.head_dim * c.num_attention_heads != c.hidden_size:  # llama.cpp assumes D = C / H otherwise
            writer.add_key_length(c.head_dim)
            writer.add_value_length(c.head_dim)
        writer.add_rope_dimension_count(c.head_dim)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        for key, token_id in vocab["special_ids"].items():
            if token_id is not None:
                writer.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
        writer.add_add_bos_token(vocab["add_bos"])
        writer.add_add_eos_token(vocab["add_eos"])
        if tokenizer.chat_template is not None:
            writer.add_chat_template(tokenizer.chat_template)

        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _encode(name: str, w: np.ndarray, weight_type: GGMLType) -> tuple[np.ndarray, GGMLType]:
    """One fp32 tensor in the bytes of its GGUF type: norms (1-D) F32, matrices `weight_type`."""
    if w.ndim == 1 or weight_type == GGMLType.F32:
        return w, GGMLType.F32
    if weight_type == GGMLType.Q8_0 and w.shape[-1] % 32:
        warnings.warn(f"{name}: rows of {w.shape[-1]} are not a multiple of Q8_0's 32-weight blocks; "
                      "written as F16", stacklevel=3)
        weight_type = GGMLType.F16
    if weight_type == GGMLType.F16:
        half = w.astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError(f"{name}: values beyond float16's range (max |w| = {np.abs(w).max():.4g})")
        return half, GGMLType.F16
    return gguf.quants.quantize(w, weight_type), weight_type  # bytes [R, bytes per row]


def _gguf_vocab(tokenizer: SmolTokenizer, vocab_size: int) -> dict:
    """What GGUF's tokenizer.ggml.* keys need, from a byte-level BPE `tokenizers.Tokenizer`."""
    tok = tokenizer.tokenizer
    spec = json.loads(tok.to_str())
    if spec["model"]["type"] != "BPE" or spec.get("normalizer") is not None:
        raise ValueError("only a byte-level BPE tokenizer without a normalizer can be written to GGUF")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"the tokenizer's decoder is {spec.get('decoder')}, not ByteLevel")
    pre = next((name for name, build in PRE_TOKENIZERS.items()
                if spec["pre_tokenizer"] == _pre_tokenizer_spec(build())), None)
    if pre is None:
        raise ValueError(f"no GGUF pre-tokenizer name for {json.dumps(spec['pre_tokenizer'])}; "
                         f"known: {', '.join(PRE_TOKENIZERS)}")

    by_id = {i: token for token, i in tok.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {max(by_id)}, but the model only {vocab_size} embeddings")
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):  # llama.cpp needs one token per embedding row: pad as its converter does
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    unk = spec["model"].get("unk_token")
    # Does encoding add BOS or EOS? (a TemplateProcessing post-processor; SmolLM's add neither)
    marked = tok.encode("", add_special_tokens=True).ids
    add_bos = tokenizer.bos_token_id is not None and marked[:1] == [tokenizer.bos_token_id]
    add_eos = tokenizer.eos_token_id is not None and marked[int(add_bos):][-1:] == [tokenizer.eos_token_id]
    return dict(
        pre=pre, tokens=tokens, types=types, merges=merges, add_bos=add_bos, add_eos=add_eos,
        special_ids={"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                     "unknown": tok.token_to_id(unk) if unk is not None else None,
                     "padding": tokenizer.pad_token_id},
    )


def _pre_tokenizer_spec(pre_tokenizer: pre_tokenizers.PreTokenizer) -> dict:
    """A pre-tokenizer as tokenizer.json writes it, to compare with a tokenizer's."""
    probe = Tokenizer(models.BPE())
    probe.pre_tokenizer = pre_tokenizer
    return json.loads(probe.to_str())["pre_tokenizer"]
