"""HuggingFace checkpoint folders in and out: `config.json` + safetensors, strictly.

This module reads and writes folders only: `smollm.sources` turns a hub id or a `.gguf` file
into such a folder, and `smollm.load_pretrained` does both. Loading never unpickles anything:
only `model.safetensors` or a sharded `model.safetensors.index.json` is read. Every tensor the
model needs must be there with the right shape, and every tensor there must be used; otherwise
a `CheckpointError` names the tensor (and both shapes), or the file when it is truncated or corrupt.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, SmolLMConfig
from .files import atomic_path, write_json  # noqa: F401 (re-exported: dpo writes through them too)
from .model import SmolLM
from .tokenizer import read_tokenizer

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
# Buffers some older Llama checkpoints stored; we rebuild them from the config.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file or tensor."""


# ------------------------------------------------------------------------ loading
def read_config(checkpoint_dir: Path) -> SmolLMConfig:
    """The checkpoint's config.json; an unsupported or broken one raises CheckpointError."""
    try:
        return SmolLMConfig.from_json(checkpoint_dir / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    single, index = checkpoint_dir / WEIGHTS_NAME, checkpoint_dir / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        shards = []
        for name in dict.fromkeys(weight_map.values()):  # unique, in order
            shard = checkpoint_dir / name
            if Path(name).is_absolute() or ".." in Path(name).parts or shard.parent != checkpoint_dir:
                raise CheckpointError(f"{index}: shard name {name!r} points outside {checkpoint_dir}")
            if not shard.is_file():
                raise CheckpointError(f"{index}: shard {name} is missing from {checkpoint_dir}")
            shards.append(shard)
        return shards
    pickled = [n for n in PICKLE_NAMES if (checkpoint_dir / n).exists()]
    if pickled:
        raise CheckpointError(
            f"{checkpoint_dir} holds only {pickled[0]}, a pickle checkpoint, which is never loaded "
            f"(it can run arbitrary code). Convert it to {WEIGHTS_NAME} with safetensors first."
        )
    raise CheckpointError(f"{checkpoint_dir}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} is there")


@contextlib.contextmanager
def open_safetensors(file: Path):
    """`safe_open` on CPU; a corrupt or truncated file raises CheckpointError naming it."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield f
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({size} bytes): {e}") from None


def read_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) for every tensor; a corrupt or truncated file raises CheckpointError."""
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                yield name, f.get_tensor(name), file


def checkpoint_shapes(config: SmolLMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` holds, by HF name, with its shape: read off the
    model itself, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = SmolLM(config, init_weights=False)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied head is listed once


def verify_checkpoint(directory: str | os.PathLike) -> SmolLMConfig:
    """Check a checkpoint folder from its safetensors headers alone (milliseconds, nothing loaded).

    The same errors as `read_checkpoint` for a bad config.json, a truncated or corrupt file, and a
    missing, unexpected or mis-shaped tensor; returns the config.
    """
    directory = Path(directory)
    config = read_config(directory)
    expected = checkpoint_shapes(config)
    files = weight_files(directory)
    found: dict[str, tuple[tuple[int, ...], Path]] = {}  # name -> (shape, file)
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                found[name] = tuple(f.get_slice(name).get_shape()), file
    for name, (shape, file) in found.items():
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {name} (config.json does not describe it)")
        if shape != expected[name]:
            raise CheckpointError(f"{file}: tensor {name} has shape {shape}, but the model "
                                  f"(from config.json) expects {expected[name]}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"tensors missing from {', '.join(f.name for f in files)}: {missing[:10]}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    return config


@torch.no_grad()
def load_weights(model: SmolLM, files: list[Path]) -> None:
    """Copy every tensor of `files` into `model`, strictly (names, shapes, completeness)."""
    params = dict(model.named_parameters())  # a tied head appears once, as embed_tokens
    expected = set(params)
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor, file in read_safetensors(files):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and model.tied:
            continue  # a tied checkpoint may carry a copy of the embedding; the embedding wins
        if name not in params:
            unexpected.append(f"{name} (in {file.name})")
            continue
        target = params[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{file}: tensor {name} has shape {tuple(tensor.shape)}, but the model "
                f"(from config.json) expects {tuple(target.shape)}"
            )
        if name in seen:
            raise CheckpointError(f"{file}: tensor {name} appears in more than one shard")
        target.copy_(tensor)
        seen.add(name)
    if unexpected:
        raise CheckpointError(
            f"unexpected tensors in the checkpoint (config.json does not describe them): {unexpected[:10]}"
            + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        )
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(
            f"tensors missing from {', '.join(f.name for f in files)}: {missing[:10]}"
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        )


def read_checkpoint(directory: str | os.PathLike, device=None, dtype: torch.dtype | None = None) -> SmolLM:
    """Load a SmolLM from a HuggingFace checkpoint folder (`smollm.load_pretrained` also takes hub
    ids and .gguf files).

    dtype: the parameters' dtype (default float32, whatever the checkpoint stores).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    config = read_config(directory)
    files = weight_files(directory)
    model = SmolLM(config, init_weights=False)  # every weight is overwritten below
    load_weights(model, files)
    model.to(device=device, dtype=dtype or torch.float32)
    return model.eval()


# ------------------------------------------------------------------------- saving
def export_state_dict(model: SmolLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named tensors to save: contiguous CPU copies, the tied head left out (HF re-ties it)."""
    adapters = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if adapters:
        raise CheckpointError(f"the model has LoRA adapters ({adapters[0]}, ...): write them with "
                              "smollm.lora.save_peft, or fold them in with smollm.lora.merge_lora first")
    out = {}
    for name, p in model.named_parameters():  # tied: lm_head.weight is not listed separately
        t = p.detach().to("cpu", dtype=dtype or p.dtype).contiguous()
        out[name] = t.clone() if t.data_ptr() == p.data_ptr() else t
    if not model.tied and "lm_head.weight" not in out:
        out["lm_head.weight"] = model.lm_head.weight.detach().cpu().contiguous()
    return out


def save_pretrained(model: SmolLM, out_dir: str | os.PathLike, *, tokenizer=None,
                    dtype: torch.dtype | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write `config.json` + `model.safetensors` (or shards + index) in HuggingFace's layout.

    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads the result. A tokenizer
    (a `SmolTokenizer`, or a tokenizer.json or folder that `read_tokenizer` reads) is written beside it.
    Each file is written atomically.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config["tie_word_embeddings"] = model.tied  # an untied copy of a tied model stays untied
    tensors = export_state_dict(model, dtype)
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json(out / CONFIG_NAME, config)

    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        with atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(shards[0], str(tmp), metadata={"format": "pt"})
        (out / WEIGHTS_INDEX_NAME).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            with atomic_path(out / name) as tmp:
                save_file(shard, str(tmp), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(out / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        (out / WEIGHTS_NAME).unlink(missing_ok=True)

    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    return out


def _split_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_shard_bytes:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_tokenizer(tokenizer, out: Path) -> None:
    """Write a tokenizer (a `SmolTokenizer`, or a path `read_tokenizer` reads) into folder `out`."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = read_tokenizer(tokenizer)
    tokenizer.save(out)
