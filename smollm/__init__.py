"""smollm: a hand-written SmolLM (Llama-architecture) decoder in plain PyTorch.

    from smollm import load_pretrained, load_tokenizer, generate
"""
from .checkpoint import CheckpointError, load_pretrained, save_pretrained
from .config import PRESETS, SMOLLM2_135M, SMOLLM_135M, SMOLLM_360M, ConfigError, SmolLMConfig
from .generation import generate
from .model import KVCache, SmolLM
from .tokenizer import SmolTokenizer, TokenizerError, load_tokenizer

__all__ = [
    "SmolLM", "SmolLMConfig", "KVCache", "load_pretrained", "save_pretrained", "load_tokenizer",
    "SmolTokenizer", "generate", "CheckpointError", "ConfigError", "TokenizerError", "PRESETS",
    "SMOLLM_135M", "SMOLLM_360M", "SMOLLM2_135M",
]
