"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, written atomically.

Layout inside a run directory:

    checkpoints/step-000040/state.safetensors   trainable weights, optimizer moments, RNG states
    checkpoints/step-000040/state.json          step, data position, scheduler, config, fingerprint

A checkpoint is first written to a hidden temporary directory beside the others and renamed into
place only when complete, so a crash mid-write leaves the previous checkpoints intact; only the
newest `keep` are kept. Nothing is pickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINTS_DIR = "checkpoints"
TENSORS_NAME = "state.safetensors"
META_NAME = "state.json"


class CheckpointLoadError(ValueError):
    """A training checkpoint that cannot be resumed from: the message names the path."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / META_NAME).is_file() and (p / TENSORS_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(run_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    *, keep: int = 2) -> Path:
    """Write checkpoint `step-NNNNNN` atomically, then delete all but the newest `keep`."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(meta["step"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / TENSORS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        for f in (tmp / TENSORS_NAME, tmp / META_NAME):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / META_NAME).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointLoadError(f"{path}: no checkpoint there (expected {META_NAME} + {TENSORS_NAME}, "
                                  f"or a run directory with {CHECKPOINTS_DIR}/step-*)")
    return found[-1]


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(tensors, meta, checkpoint_dir) of a checkpoint or of a run's latest one."""
    directory = resolve_checkpoint(path)
    try:
        meta = json.loads((directory / META_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointLoadError(f"{directory / META_NAME}: unreadable ({e})") from None
    try:
        tensors = load_file(str(directory / TENSORS_NAME))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointLoadError(f"{directory / TENSORS_NAME}: corrupt or truncated ({e})") from None
    return tensors, meta, directory
