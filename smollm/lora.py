"""LoRA: low-rank adapters on the model's Linear layers (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"), written to be saved and loaded as peft's format.

A frozen Linear y = x W^T gains a trainable low-rank update:

    y = x W^T + (alpha / r) * dropout(x) A^T B^T        A [r, in], B [out, r]

A starts Kaiming-uniform and B at zero (as the paper and peft do), so a fresh adapter changes
nothing: the adapted model starts exactly at the base model. Only A and B train, r (in + out)
numbers per layer instead of in x out.

`add_lora` wraps the chosen layers (peft's `target_modules` names, in all blocks or the last N)
and freezes everything else. `without_adapters` gives the model with the adapters switched off,
sharing every module and tensor with it (no weight is copied): DPO's reference. `merge_lora`
folds the update into W. `save_peft` / `load_peft` write and read peft's files
(`adapter_config.json` and `adapter_model.safetensors` with peft's tensor names), so
`peft.PeftModel.from_pretrained(base, dir)` loads what we train, and we load what peft trains.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import CheckpointError, atomic_path
from .config import ConfigError
from .model import SmolLM

# HF module names peft's target_modules may name in a Llama model, where they live in a block
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = (*ATTENTION_TARGETS, *MLP_TARGETS, "lm_head")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's name for the wrapped model, before the HF names


@dataclass
class LoRAConfig:
    """What `add_lora` adds. layers: block indices to adapt (None: all blocks)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS + MLP_TARGETS))
    layers: list[int] | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def check(self, num_layers: int | None = None) -> "LoRAConfig":
        """Refuse an impossible setting, naming its flag (block indices: when num_layers is given)."""
        if self.r < 1:
            raise ConfigError(f"--lora-r: must be at least 1, got {self.r}")
        if not 0 < self.alpha < float("inf"):
            raise ConfigError(f"--lora-alpha: must be a positive finite number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout: must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"--lora-targets: {' '.join(unknown) or '(none)'} is not a module of this model; "
                              f"choose among {' '.join(TARGETS)}")
        if num_layers is not None and self.layers is not None and not all(0 <= i < num_layers for i in self.layers):
            raise ConfigError(f"--lora-layers: block indices must be in [0, {num_layers}), got {self.layers}")
        return self


class LoRALinear(nn.Module):
    """A frozen Linear (`base_layer`) plus the low-rank update B A, scaled by alpha / r.

    The submodule names are peft's (`base_layer`, `lora_A`, `lora_B`), so parameter names map
    to peft's by a prefix. `enabled = False` computes the base layer alone.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.enabled = True
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear's default, and peft's
        nn.init.zeros_(self.lora_B.weight)  # a fresh adapter adds exactly nothing

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as peft's layers expose it), e.g. to see a tied head."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # [.., out]
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # [.., in] -> [.., r] -> [.., out]

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A [out, in], in the base weight's dtype."""
        w = self.base_layer.weight
        return (w.float() + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())).to(w.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, enabled={self.enabled}"


def _targets(model: SmolLM, config: LoRAConfig) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every Linear to adapt."""
    found = []
    layers = range(model.config.num_hidden_layers) if config.layers is None else sorted(set(config.layers))
    for i in layers:
        block = model.model.layers[i]
        for name in config.targets:
            if name in ATTENTION_TARGETS:
                found.append((block.self_attn, name))
            elif name in MLP_TARGETS:
                found.append((block.mlp, name))
    if "lm_head" in config.targets:
        found.append((model, "lm_head"))
    return found


def add_lora(model: SmolLM, config: LoRAConfig) -> list[str]:
    """Wrap the target Linears of `model` in place and freeze everything but the adapters.

    Returns the HF names of the adapted modules. A tied LM head stays tied: its base layer keeps
    the embedding's tensor, and only the adapter on top of it trains.
    """
    config.check(model.config.num_hidden_layers)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    names = {id(m): n for n, m in model.named_modules()}
    adapted = []
    for parent, attr in _targets(model, config):
        base = getattr(parent, attr)
        if type(base) is not nn.Linear:
            raise ConfigError(f"--lora-targets: {names[id(base)]} is a {type(base).__name__}, not a Linear")
        setattr(parent, attr, LoRALinear(base, config.r, config.alpha, config.dropout))
        adapted.append(names[id(base)])
    return adapted


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted modules by HF name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def without_adapters(model: SmolLM) -> SmolLM:
    """The model with its adapters switched off, sharing every tensor with it (nothing copied).

    A new SmolLM object whose modules hold the very same parameters, with each LoRALinear
    replaced by its base layer: what the model computes with the adapters off. Frozen, in eval
    mode. DPO's reference for a LoRA policy.
    """
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    view = copy.deepcopy(model, memo=memo)
    for name, layer in lora_layers(view).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(view.get_submodule(parent_name) if parent_name else view, attr, layer.base_layer)
    for p in view.parameters():
        p.requires_grad_(False)
    return view.eval()


@torch.no_grad()
def merge_lora(model: SmolLM) -> int:
    """Fold every adapter into its base weight and unwrap it, in place: the plain model that
    computes what the adapted one did. Returns how many layers were merged. A tied head is
    untied first when its adapter changed it (the embedding must stay as it was)."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        merged = layer.merged_weight()
        parent_name, _, attr = name.rpartition(".")
        base = layer.base_layer
        if name == "lm_head" and model.tied:
            base = nn.Linear(base.in_features, base.out_features, bias=False, device=merged.device, dtype=merged.dtype)
            model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        base.weight = nn.Parameter(merged, requires_grad=False)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, base)
    return len(layers)


# --------------------------------------------------------------------------- peft's files


def adapter_state_dict(model: SmolLM) -> dict[str, torch.Tensor]:
    """The adapters' tensors under peft's names (`base_model.model.<HF module>.lora_A.weight`)."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    return state


def save_peft(model: SmolLM, directory: str | os.PathLike, config: LoRAConfig, base_model: str) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` as peft writes them.

    base_model: what `base_model_name_or_path` names (a hub id or the base checkpoint's path).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets), "layers_to_transform": config.layers,
        "layers_pattern": "layers" if config.layers is not None else None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }
    with atomic_path(out / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(peft_config, indent=2) + "\n")
    with atomic_path(out / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.cpu() for k, v in adapter_state_dict(model).items()}, str(tmp), metadata={"format": "pt"})
    return out


def read_peft_config(directory: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of a peft LoRA folder; a bad or unsupported one raises CheckpointError."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter config ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "use_rslora"):
        if raw.get(key):
            raise CheckpointError(f"{path}: {key} adapters are not supported")
    if raw.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias {raw['bias']!r} is not supported (only 'none')")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise CheckpointError(f"{path}: target_modules as a regular expression is not supported")
    layers = raw.get("layers_to_transform")
    return LoRAConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0)),
                      targets=list(targets), layers=[layers] if isinstance(layers, int) else layers)


def load_peft(model: SmolLM, directory: str | os.PathLike) -> LoRAConfig:
    """Add the adapters of a peft LoRA folder to `model` (in place) and load their weights."""
    config = read_peft_config(directory)
    try:
        add_lora(model, config)
    except ConfigError as e:
        raise CheckpointError(f"{Path(directory) / ADAPTER_CONFIG}: {e}") from None
    path = Path(directory) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot read the adapter weights ({e})") from None
    expected = adapter_state_dict(model)
    tensors = {k.replace(".default.", "."): v for k, v in tensors.items()}  # names with the adapter name too
    # peft also saves the base weights of an adapted tied head (save_embedding_layers): they must be ours
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head under both its names
    for name in sorted(tensors.keys() - expected.keys()):
        ours = params.get(name.removeprefix(PEFT_PREFIX))
        if ours is None:
            continue  # reported below as unexpected
        if ours.shape != tensors[name].shape or not torch.equal(ours.detach().cpu(), tensors[name].to(ours.dtype)):
            raise CheckpointError(f"{path}: {name} differs from this model's: the adapter was trained "
                                  "on another base model")
        del tensors[name]
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the adapter config "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    with torch.no_grad():
        for name, target in expected.items():
            if tensors[name].shape != target.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                      f"expected {tuple(target.shape)}")
            target.copy_(tensors[name])
    return config
