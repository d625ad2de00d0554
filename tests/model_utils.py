"""Helpers for tests: random SmolLM checkpoints at real configs, saved in HuggingFace format."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from smollm import SmolLM, SmolLMConfig, save_pretrained


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


def small_config(**overrides) -> SmolLMConfig:
    """A few-layer config with the real vocabulary, for fast tests."""
    base = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    base.update(overrides)
    return SmolLMConfig(**base)


def replace(config: SmolLMConfig, **changes) -> SmolLMConfig:
    return dataclasses.replace(config, **changes)
