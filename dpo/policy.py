"""What of the policy trains, its reference, and how the trained policy is written out.

Two ways to choose what trains, one setting each (`dpo.config.LoRASettings`, `--train-last-n`):

* **freezing** (`dpo.freeze`): the last N blocks (and the head) train; the reference is a
  frozen copy of the trainable part that shares every frozen tensor with the policy;
* **LoRA** (`smollm.lora`, `--lora-r` > 0): low-rank adapters on chosen Linear layers train,
  nothing else does; the reference is the same model with the adapters switched off, sharing
  every tensor (no weight is copied).

Either way the engine (`dpo.engine.LogProbEngine`) sees a policy and a reference whose leading
frozen blocks are the very same tensors, and computes them once.

`save_policy` writes a policy as a HuggingFace folder (`config.json` + `model.safetensors`,
loads in `smollm` and `transformers`), or with LoRA as peft's adapter folder
(`adapter_config.json` + `adapter_model.safetensors`, loads with `peft.PeftModel`), or with
`merge=True` as the merged HuggingFace folder. Atomically: a folder is complete or absent.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from smollm import SmolLM, save_pretrained
from smollm.checkpoint import save_tokenizer
from smollm.lora import LoRAConfig, add_lora, merge_lora, save_peft, without_adapters

from . import distributed
from .freeze import TrainableReport, freeze_all_but_last, frozen_reference


def make_trainable(policy: SmolLM, lora: LoRAConfig | None, *, train_last_n: int, train_head: bool
                   ) -> TrainableReport:
    """Freeze `policy` but what trains: the adapters of `lora`, or the last blocks (and head)."""
    if lora is None:
        return freeze_all_but_last(policy, train_last_n, train_head=train_head, train_final_norm=train_head)
    adapted = add_lora(policy, lora)
    where = "all blocks" if lora.layers is None else "blocks " + ", ".join(map(str, sorted(lora.layers)))
    groups = [f"LoRA r={lora.r} alpha={lora.alpha:g} on {' '.join(lora.targets)} in {where} "
              f"({len(adapted)} layers)"]
    return TrainableReport(policy.num_parameters(trainable_only=True), policy.num_parameters(), groups)


def make_reference(policy: SmolLM, lora: LoRAConfig | None) -> SmolLM:
    """DPO's frozen reference: the policy with its adapters off (LoRA), or a frozen copy of its
    trainable part (freezing); both share every frozen tensor with the policy."""
    return without_adapters(policy) if lora is not None else frozen_reference(policy)


def save_policy(policy: SmolLM, out_dir: str | os.PathLike, *, tokenizer=None, lora: LoRAConfig | None = None,
                base_model: str = "", merge: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write the policy to `out_dir`, replacing what is there only once the new folder is complete.

    Without LoRA, or with `merge`: a HuggingFace folder (merging works on a copy: `policy` keeps
    its adapters). With LoRA: peft's adapter folder, whose `base_model_name_or_path` is
    `base_model`. The tokenizer, when given, is written beside either, and `extra_files`
    ({name: text}) too.

    In a torchrun job every rank calls it (FSDP's shards are gathered first) and rank 0 writes.
    """
    out = Path(out_dir)
    policy = distributed.gathered(policy, rebuild=(lambda m: add_lora(m, lora)) if lora is not None else None)
    if not distributed.current().is_main:
        return out
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora is not None and not merge:
        save_peft(policy, tmp, lora, base_model)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
    else:
        model = policy
        if lora is not None:
            model = copy.deepcopy(policy)
            merge_lora(model)
        save_pretrained(model, tmp, tokenizer=tokenizer)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
