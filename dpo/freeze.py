"""Layer freezing: train only the last N transformer blocks (and optionally the head).

The assignment freezes the first 25 of SmolLM-135M's 30 blocks. Two choices are made here:

* SmolLM ties its LM head to the input embedding. Training a tied head would also change
  every input embedding, i.e. the bottom of the "frozen" trunk. So when the head is trained,
  it is untied first: the head becomes its own trainable copy and the embedding stays frozen.
  A model saved afterwards has `tie_word_embeddings: false` and its own `lm_head.weight`.
* The final RMSNorm sits between the last block and the head; it trains with the head.

With the embedding and the first blocks exactly frozen, a policy and its reference compute the
same hidden states up to the first trainable block, which the trainer exploits (see
`dpo.engine.LogProbEngine`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from smollm import SmolLM


@dataclass
class TrainableReport:
    trainable: int  # parameters that receive gradients
    total: int  # all parameters, a tied tensor counted once
    groups: list[str]  # what trains, e.g. ["layers 25-29", "final norm", "lm_head (untied)"]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.2f}%) "
                f"- {', '.join(self.groups) or 'nothing'}")


def untie_lm_head(model: SmolLM) -> None:
    """Give the LM head its own copy of the (tied) embedding matrix."""
    if model.tied:
        model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)


def freeze_all_but_last(model: SmolLM, n_blocks: int, *, train_head: bool = True,
                        train_final_norm: bool = True) -> TrainableReport:
    """Freeze everything, then unfreeze the last `n_blocks` blocks (and head / final norm).

    n_blocks == num_hidden_layers with the head trained is full fine-tuning (the embedding
    then stays tied to the head and trains with it).
    """
    num_layers = model.config.num_hidden_layers
    if not 0 <= n_blocks <= num_layers:
        raise ValueError(f"cannot train the last {n_blocks} blocks: the model has {num_layers}")
    full = n_blocks == num_layers and train_head
    if train_head and not full:
        untie_lm_head(model)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    if n_blocks:
        for layer in model.model.layers[num_layers - n_blocks:]:
            layer.requires_grad_(True)
        groups.append(f"layers {num_layers - n_blocks}-{num_layers - 1}")
    if train_final_norm:
        model.model.norm.requires_grad_(True)
        groups.append("final norm")
    if train_head:
        model.lm_head.requires_grad_(True)
        groups.append("lm_head (tied to the embedding)" if model.tied else "lm_head (untied)")
    return TrainableReport(model.num_parameters(trainable_only=True), model.num_parameters(), groups)


def first_trainable_layer(model: SmolLM) -> int:
    """Index of the first block with a trainable parameter (num_layers if none; 0 if the
    embedding trains): blocks below it form the frozen trunk."""
    if model.model.embed_tokens.weight.requires_grad:
        return 0
    for i, layer in enumerate(model.model.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return model.config.num_hidden_layers


def frozen_reference(policy: SmolLM) -> SmolLM:
    """A frozen copy of `policy` as it is now, for DPO's reference model.

    Frozen tensors are shared, not copied: they never change, so the reference only costs
    memory for the policy's trainable part (e.g. 5 blocks + final norm, not a second 135M model).
    And when `untie_lm_head` gave the policy a trainable copy of the embedding that has not
    moved yet, the reference's head is that frozen embedding itself, tied again as in the
    checkpoint: the same numbers without another 28M-parameter copy.
    """
    shared = {id(p): p for p in policy.parameters() if not p.requires_grad}
    reference = copy.deepcopy(policy, memo=shared)
    embedding = reference.model.embed_tokens.weight
    if (not reference.tied and embedding is policy.model.embed_tokens.weight
            and torch.equal(reference.lm_head.weight, embedding)):  # False for unequal shapes too
        reference.lm_head.weight = embedding  # [V, C], shared with the policy's frozen embedding
        reference.config = dataclasses.replace(reference.config, tie_word_embeddings=True)
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference.eval()


@torch.no_grad()
def count_shared(policy: SmolLM, reference: SmolLM) -> int:
    """How many parameters the two models share (same tensor)."""
    mine = {id(p) for p in policy.parameters()}
    return sum(p.numel() for p in reference.parameters() if id(p) in mine)
