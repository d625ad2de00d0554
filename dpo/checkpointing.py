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
# What state.json must hold to resume (see DPOTrainer.state_dict).
META_KEYS = ("step", "epoch", "cursor", "param_order", "optimizer_param_groups", "scheduler", "config")


class CheckpointLoadError(ValueError):
    """A training checkpoint that cannot be resumed from: the message names the path."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _step_of(path: Path) -> int | None:
    """NNNNNN of a `step-NNNNNN` directory name, or None for anything else."""
    digits = path.name[len("step-"):]
    return int(digits) if path.name.startswith("step-") and digits.isdigit() else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step number, not by name)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None
             and (p / META_NAME).is_file() and (p / TENSORS_NAME).is_file()]
    return sorted(found, key=_step_of)


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    *, keep: int = 2) -> Path:
    """Write checkpoint `step-NNNNNN` atomically, then delete all but the newest `keep`.

    Everything goes into a hidden `.step-NNNNNN.*` directory first, is fsync'd, and is renamed
    into place in one step. A crash (an exception, a SIGKILL, a power cut) at any point leaves
    the previous checkpoints as they were; what a killed writer left behind is hidden (never
    listed, never resumed from) and removed by the next save.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # left by a writer that was killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(meta["step"])
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(tmp / TENSORS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        for f in (tmp / TENSORS_NAME, tmp / META_NAME):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved again: move the old copy aside, swap, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=root))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
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
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointLoadError(f"{directory / META_NAME}: not a training checkpoint (missing {missing})")
    try:
        tensors = load_file(str(directory / TENSORS_NAME))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointLoadError(f"{directory / TENSORS_NAME}: corrupt or truncated ({e})") from None
    if "rng.torch" not in tensors:
        raise CheckpointLoadError(f"{directory / TENSORS_NAME}: not a training checkpoint (no RNG state)")
    return tensors, meta, directory
