"""SmolLM configuration: a typed dataclass with HuggingFace's `config.json` field names.

SmolLM is a Llama-architecture decoder, so a checkpoint's `config.json` is a
`LlamaConfig`. We read the fields we implement, and refuse (with a clear error)
any setting this model cannot honour, rather than silently running a different
network: another `model_type`, a `rope_scaling` other than the default, biases
in attention or MLP, an activation other than SiLU.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work, named in the message: a model config.json this model cannot
    run faithfully, or a training setting (`dpo.config`) caught before any expensive work."""


@dataclass
class SmolLMConfig:
    vocab_size: int = 49152  # tokens in the vocabulary (embedding rows)
    hidden_size: int = 576  # width of the residual stream, C
    intermediate_size: int = 1536  # width of the SwiGLU MLP's hidden layer
    num_hidden_layers: int = 30  # number of transformer blocks
    num_attention_heads: int = 9  # query heads, H
    num_key_value_heads: int = 3  # key/value heads, KV (grouped-query attention: H % KV == 0)
    head_dim: int | None = None  # per-head width D; None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm's square root
    rope_theta: float = 10000.0  # base of the rotary frequencies
    max_position_embeddings: int = 2048  # longest sequence the rotary table is built for
    tie_word_embeddings: bool = True  # LM head shares the input embedding matrix
    bos_token_id: int | None = 0  # beginning-of-sequence token id
    eos_token_id: int | None = 0  # end-of-sequence token id (generation stops here)
    pad_token_id: int | None = None  # padding id; None means reuse eos for padding
    initializer_range: float = 0.02  # std of the normal init for fresh (untrained) weights

    def __post_init__(self) -> None:
        # Sizes first: the divisibility checks below would fail obscurely on 0 or a string.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if name == "head_dim" and value is None:
                continue  # derived below
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def padding_id(self) -> int:
        """The id used to pad batches: pad_token_id, else eos_token_id, else 0."""
        for candidate in (self.pad_token_id, self.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    # ------------------------------------------------------------------ HF JSON
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config") -> "SmolLMConfig":
        """Build from a HuggingFace config dict, refusing settings we do not implement."""
        _check_supported(raw, source)
        nullable = {"head_dim", "bos_token_id", "eos_token_id", "pad_token_id"}
        kwargs = {
            f.name: raw[f.name]
            for f in dataclasses.fields(cls)
            if f.name in raw and (raw[f.name] is not None or f.name in nullable)
        }
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if "rope_theta" not in kwargs and isinstance(rope, dict) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]  # transformers >= 5 nests it here
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kwargs.get(key), list):  # some configs list several EOS ids
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "SmolLMConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json there") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that `transformers` reads as a LlamaForCausalLM."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            mlp_bias=False,
            rope_scaling=None,
            use_cache=True,
            torch_dtype="float32",
        )
        return d


def _check_supported(raw: dict[str, Any], source: str) -> None:
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{source}: model_type={model_type!r} is not supported; SmolLM is a 'llama' model")
    archs = raw.get("architectures") or ["LlamaForCausalLM"]
    if any(a != "LlamaForCausalLM" for a in archs):
        raise ConfigError(f"{source}: architectures={archs} is not supported; expected ['LlamaForCausalLM']")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{source}: hidden_act={act!r} is not supported; the SwiGLU MLP uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise ConfigError(f"{source}: {key}=true is not supported; SmolLM has no biases")
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: {key}={rope!r} is not a JSON object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"{source}: {key} with rope_type={rope_type!r} is not implemented; "
                "only plain rotary embeddings (rope_type 'default') are"
            )
    if raw.get("pretraining_tp", 1) != 1:
        raise ConfigError(f"{source}: pretraining_tp={raw['pretraining_tp']} is not supported")


# ----------------------------------------------------------------------- presets
# The published config.json of each model (https://huggingface.co/HuggingFaceTB/<name>/blob/main/
# config.json). Every size ties the head to the embedding and has 49,152 tokens; SmolLM2 raised
# rope_theta and the context to 8,192. The -Instruct models are the same networks with the chat
# special tokens as BOS/EOS/padding (INSTRUCT_TOKENS).
SMOLLM_135M = SmolLMConfig()  # 30 x 576, 9 heads / 3 KV heads, rope_theta 1e4, 2,048 positions
SMOLLM_360M = SmolLMConfig(  # 32 x 960, 15 heads / 5 KV heads
    hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
    num_attention_heads=15, num_key_value_heads=5,
)
SMOLLM_1_7B = SmolLMConfig(  # 24 x 2048, 32 heads, no grouping (32 KV heads)
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
    num_attention_heads=32, num_key_value_heads=32,
)
SMOLLM2_135M = dataclasses.replace(SMOLLM_135M, rope_theta=100000.0, max_position_embeddings=8192)
SMOLLM2_360M = dataclasses.replace(SMOLLM_360M, rope_theta=100000.0, max_position_embeddings=8192)
SMOLLM2_1_7B = dataclasses.replace(SMOLLM_1_7B, rope_theta=130000.0, max_position_embeddings=8192)
INSTRUCT_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)  # <|im_start|>, <|im_end|>
SMOLLM_135M_INSTRUCT = dataclasses.replace(SMOLLM_135M, **INSTRUCT_TOKENS)

PRESETS: dict[str, SmolLMConfig] = {
    "smollm-135m": SMOLLM_135M,
    "smollm-135m-instruct": SMOLLM_135M_INSTRUCT,
    "smollm-360m": SMOLLM_360M,
    "smollm-1.7b": SMOLLM_1_7B,
    "smollm2-135m": SMOLLM2_135M,
    "smollm2-360m": SMOLLM2_360M,
    "smollm2-1.7b": SMOLLM2_1_7B,
}
# Hub ids of the models whose networks the presets are (`--model` takes any of them, or any
# other Llama-architecture id): `preset_of("HuggingFaceTB/SmolLM2-1.7B-Instruct")`.
HUB_IDS: dict[str, str] = {
    f"HuggingFaceTB/{name}{suffix}": name.lower() + ("-instruct" if suffix else "")
    for name in ("SmolLM-135M", "SmolLM-360M", "SmolLM-1.7B", "SmolLM2-135M", "SmolLM2-360M", "SmolLM2-1.7B")
    for suffix in ("", "-Instruct")
}


def preset_of(model_id: str) -> SmolLMConfig:
    """The published config of a SmolLM hub id (the -Instruct ids with their chat tokens), without
    downloading anything: e.g. to size a run before the weights are fetched."""
    if model_id not in HUB_IDS:
        raise ConfigError(f"no preset for {model_id!r}; known: {', '.join(HUB_IDS)}")
    name = HUB_IDS[model_id]
    base = PRESETS[name.removesuffix("-instruct")]
    return dataclasses.replace(base, **INSTRUCT_TOKENS) if name.endswith("-instruct") else base
