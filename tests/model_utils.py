"""Helpers for tests: random SmolLM checkpoints at real configs, saved in HuggingFace format."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from smollm import SmolLM, SmolLMConfig, save_pretrained


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Equal up to fp32 rounding, which is relative: 1e-5 of the larger of 1 and the largest |value|.
    (Two summation orders of a gradient of 32.5 differ by about 2e-5 with AVX2 kernels, one of 21.6
    by 1.0e-5 with AVX-512 ones.)"""
    atol = 1e-5 * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=msg)


def random_model(config: SmolLMConfig, seed: int = 0) -> SmolLM:
    """A SmolLM with random weights, norm weights perturbed too (so a norm bug shows)."""
    torch.manual_seed(seed)
    model = SmolLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_random_checkpoint(directory: Path, config: SmolLMConfig, seed: int = 0, tokenizer=None) -> Path:
    save_pretrained(random_model(config, seed), directory, tokenizer=tokenizer)
    return directory


def tiny_run_inputs(root: Path, tokenizer_json: Path, n_pairs: int, seed: int, config: SmolLMConfig | None = None
                    ) -> Path:
    """What a real `python -m dpo.train` subprocess needs, small: a random checkpoint with the real
    tokenizer in root/model, and `n_pairs` synthetic pairs in root/pairs.jsonl. Returns root."""
    import json

    from dpo.data import make_synthetic_pairs
    from smollm import load_tokenizer

    save_random_checkpoint(root / "model", config or small_config(), tokenizer=load_tokenizer(tokenizer_json))
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as f:
        for p in make_synthetic_pairs(n_pairs, seed=seed):
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return root


def small_config(**overrides) -> SmolLMConfig:
    """A few-layer config with the real vocabulary, for fast tests."""
    base = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    base.update(overrides)
    return SmolLMConfig(**base)


def replace(config: SmolLMConfig, **changes) -> SmolLMConfig:
    return dataclasses.replace(config, **changes)


def crafted_pairs(n: int, seed: int = 0, *, share_first_token: bool = False, source: str = "crafted"):
    """Pairs of varied lengths: prompt 3-12 tokens, responses 2-9 tokens. With share_first_token,
    every third pair's answers share their first token (a prefix longer than the prompt)."""
    from dpo.tokenization import TokenizedPair

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(3, 13, (1,), generator=g))
        c, r = (int(x) for x in torch.randint(2, 10, (2,), generator=g))
        prompt = torch.randint(3, 1000, (p,), generator=g).tolist()
        chosen = torch.randint(3, 1000, (c,), generator=g).tolist()
        rejected = torch.randint(3, 1000, (r,), generator=g).tolist()
        if share_first_token and i % 3 == 0:
            rejected[0] = chosen[0]
        out.append(TokenizedPair(index=i, source=f"{source}:{i}", chosen_ids=prompt + chosen,
                                 chosen_mask=[0] * p + [1] * c, rejected_ids=prompt + rejected,
                                 rejected_mask=[0] * p + [1] * r, prompt_len=p))
    return out


@contextlib.contextmanager
def textbook_layers():
    """RMSNorm and MLP computed by plain autograd ops, as before the hand-written backwards:
    the oracle that the fast path is checked against (tests and bench/gpu_check.py)."""
    from smollm.model import MLP, RMSNorm

    def norm(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def mlp(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    saved = RMSNorm.forward, MLP.forward
    RMSNorm.forward, MLP.forward = norm, mlp
    try:
        yield
    finally:
        RMSNorm.forward, MLP.forward = saved
