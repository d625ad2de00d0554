"""smollm: a hand-written SmolLM (Llama-architecture) decoder in plain PyTorch.

    from smollm import load_pretrained, load_tokenizer, generate
"""
from .checkpoint import CheckpointError, save_pretrained
from .config import (PRESETS, SMOLLM2_1_7B, SMOLLM2_135M, SMOLLM2_360M, SMOLLM_1_7B, SMOLLM_135M, SMOLLM_360M,
                     ConfigError, SmolLMConfig, preset_of)
from .generation import generate
from .model import KVCache, SmolLM
from .sources import HubError, load_pretrained, load_tokenizer
from .tokenizer import SmolTokenizer, TokenizerError

__all__ = [
    "SmolLM", "SmolLMConfig", "KVCache", "load_pretrained", "save_pretrained", "load_tokenizer",
    "SmolTokenizer", "generate", "CheckpointError", "ConfigError", "TokenizerError", "HubError", "PRESETS",
    "SMOLLM_135M", "SMOLLM_360M", "SMOLLM_1_7B", "SMOLLM2_135M", "SMOLLM2_360M", "SMOLLM2_1_7B", "preset_of",
]
