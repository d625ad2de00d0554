"""A decoding step compiled by TorchInductor for an x86 CPU: `CompiledDecoder`.

Once the prompt is in the KV cache, every new token is one decoding step: B rows (one per
sequence) through every block and the LM head. On a CPU that step is a chain of small matmuls,
one row per sequence, and of many small operations between them (norms, rotary, residual adds),
each dispatched from Python. `smollm.generate` runs them eagerly, its matmuls by oneDNN
(`smollm.onednn`). Compiled, the same step is one C++ function:

* the weights are frozen into it as constants (Inductor's `freezing`), so its matmuls can be
  Inductor's own C++ GEMM kernels, made for the step's exact shapes and the weights' layout
  (`max_autotune` with the "CPP" backend only: with MKL among the choices, its timing on one
  call can pick MKL's packed matmul, which is slower within the step);
* the small operations between matmuls are fused into a few loops, with no Python between them.

Attention stays outside the compiled code, as one custom op per block (`decode_attention`): it
writes the step's keys and values into the cache and runs PyTorch's flash kernel over the first
S positions, as the eager step does, so the graph never sees the cache's length and one compiled
step serves every length. The prompt (prefill) runs eagerly, as in `generate`.

Measured (docs/benchmarks.md, section 16; 2 cores of an AMD EPYC, AVX2 kernels, the real
SmolLM2-135M-Instruct, fp32, greedy, 128 new tokens): the compiled steps make 1.96x the tokens/s
of the eager ones at batch 1 and 1.28x at batch 16, the same tokens, 2.7x and 2.2x transformers'
`generate`. Compiling takes about a minute and a half per batch size on those 2 cores (Inductor's
cache on disk saves little of it), and the compiled code holds its own copy of the weights (the
process's peak memory 2.6 GB instead of 1.4). So it pays for long-lived processes that generate
a lot (a server, many prompts at one batch size), not for one answer: `generate` compiles nothing
unless it is given a decoder (`decoder=CompiledDecoder(model)`), `python -m smollm.serve --compile`
builds one before it listens, and `python -m bench.generate_speed --compile` measures it.

Limits: the model as it is when the decoder is built, on a CPU, in fp32, every Linear layer plain
(no LoRA adapter; merge it first). The weights are copied into the compiled code: a decoder
refuses to run once a parameter has changed in place (an optimizer step, `load_state_dict`),
since it would still compute with the old values (a change made through `.data` is not seen:
build a new decoder after one).
"""
from __future__ import annotations

import os
import shutil
import time

import torch
import torch.nn.functional as F
from torch import nn

from .autograd import plain_linear, rms_norm
from .model import KVCache, SmolLM, apply_rotary

# Inductor settings of the compiled step (see the module docstring); autotuning's tables not printed
OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
           "autotune_num_choices_displayed": 0}


@torch.library.custom_op("smollm::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, visible: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """One decoding step's attention, q [B, H, 1, D] -> [B, H, 1, D]: the step's k, v [B, KV, 1, D]
    are written at position `at` (a 0-d tensor) of the caches [B, KV, S_max, D], then q attends to
    positions [0, at] of them where visible [B, >= at + 1] (bool) allows it."""
    S = int(at) + 1
    k_cache[:, :, S - 1:S] = k
    v_cache[:, :, S - 1:S] = v
    mask = torch.zeros(visible.shape[0], 1, 1, S, dtype=q.dtype, device=q.device).masked_fill_(
        ~visible[:, None, None, :S], float("-inf"))  # [B, 1, 1, S]
    return F.scaled_dot_product_attention(q, k_cache[:, :, :S], v_cache[:, :, :S], attn_mask=mask, enable_gqa=True)


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, visible, at):
    return torch.empty_like(q)


class DecodeStep(nn.Module):
    """One decoding step of `model`, written for the compiler: tokens [B] at positions [B] ->
    logits [B, V] (fp32), the step's keys and values written at position `at` of each layer's
    cache. The same arithmetic as `SmolLM.forward` over one new position per row, without the
    KV cache object, layouts or packing (which the compiler would trace through)."""

    def __init__(self, model: SmolLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, at: torch.Tensor, visible: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        m, c = self.model, self.model.config
        B, H, KV, D = tokens.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        x = m.model.embed_tokens(tokens)  # [B, C]
        cos, sin = m.rotary.cos[positions][:, None], m.rotary.sin[positions][:, None]  # [B, 1, D] each
        for i, block in enumerate(m.model.layers):
            attn, mlp = block.self_attn, block.mlp
            h = rms_norm(x, block.input_layernorm.weight, block.input_layernorm.eps)  # [B, C]
            q = apply_rotary(attn.q_proj(h).view(B, H, D), cos, sin)  # [B, H, D]
            k = apply_rotary(attn.k_proj(h).view(B, KV, D), cos, sin)  # [B, KV, D]
            v = attn.v_proj(h).view(B, KV, D)  # [B, KV, D]
            y = decode_attention(q[:, :, None], k[:, :, None], v[:, :, None], keys[i], values[i], visible, at)
            x = x + attn.o_proj(y.reshape(B, H * D))  # [B, H, 1, D] -> [B, H*D] -> [B, C]
            h = rms_norm(x, block.post_attention_layernorm.weight, block.post_attention_layernorm.eps)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))  # [B, C]
        return m.lm_head(rms_norm(x, m.model.norm.weight, m.model.norm.eps)).float()  # [B, V]


class CompiledDecoder:
    """The decoding steps of `model`, compiled once per batch size (lazily, at the first step of
    that size) and reused by every `generate(model, ..., decoder=this)` call. See the module
    docstring for what it does, what it costs and its limits.

    compile_seconds: batch size -> how long its first step took (tracing, compiling, autotuning).
    """

    def __init__(self, model: SmolLM):
        problems = unsupported(model)
        if problems:
            raise ValueError("CompiledDecoder: " + "; ".join(problems))
        self.model = model
        self.step = DecodeStep(model)
        self.compiled: dict[int, nn.Module] = {}
        self.compile_seconds: dict[int, float] = {}
        self._versions = _versions(model)

    def check(self, model: SmolLM) -> None:
        """Raise unless this decoder was built for `model` and no parameter of it changed since."""
        if model is not self.model:
            raise ValueError("this CompiledDecoder was built for another model")
        if _versions(model) != self._versions:
            raise RuntimeError("the model's parameters changed after its CompiledDecoder was built, which still "
                               "holds the old values: build a new CompiledDecoder")

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                 visible: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (fp32) of tokens [B] at positions [B], the next position of `cache`;
        visible [B, >= cache.length + 1]: which cached positions (and this one) each row attends to.
        Advances the cache by one position."""
        B = tokens.shape[0]
        start = None
        if B not in self.compiled:  # compiled at this call: traced with the cache's length left free
            self.compiled[B] = torch.compile(self.step, dynamic=False)
            for t in (*cache.keys, *cache.values):
                torch._dynamo.maybe_mark_dynamic(t, 2)  # one compiled step for every cache length
            torch._dynamo.maybe_mark_dynamic(visible, 1)
            start = time.perf_counter()
        at = torch.tensor(cache.length, device=tokens.device)
        from torch._inductor import config as inductor_config

        with inductor_config.patch(OPTIONS):  # (torch.compile's options= does not reach freezing)
            logits = self.compiled[B](tokens, positions, at, visible, cache.keys, cache.values)
        if start is not None:
            self.compile_seconds[B] = time.perf_counter() - start
        cache.length += 1
        return logits


def unsupported(model: SmolLM) -> list[str]:
    """Why `model` cannot be compiled into a `CompiledDecoder` (empty: it can)."""
    weight = model.model.embed_tokens.weight
    problems = []
    compiler = os.environ.get("CXX", "g++")  # what Inductor compiles its C++ with
    if shutil.which(compiler) is None:
        problems.append(f"Inductor compiles C++ with {compiler}, which is not installed (or set CXX)")
    if weight.device.type != "cpu":
        problems.append(f"the model is on {weight.device}; the compiled step is for a CPU")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        problems.append("the model is not fp32")
    projections = [model.lm_head] + [getattr(module, name) for block in model.model.layers
                                     for module, names in ((block.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                           (block.mlp, ("gate_proj", "up_proj", "down_proj")))
                                     for name in names]
    if not all(plain_linear(m) for m in projections):
        problems.append("a projection is not a plain Linear layer (a LoRA adapter? merge it first)")
    return problems


def _versions(model: nn.Module) -> list[tuple[int, int]]:
    """Each parameter's storage and in-place version counter: what an optimizer step or a
    load_state_dict changes."""
    return [(p.data_ptr(), p._version) for p in model.parameters()]
