"""Policy and reference log-probabilities of a collated batch of preference pairs.

A batch from `dpo.tokenization.collate_pairs` holds chosen rows then rejected rows
([2B, T]), so one forward covers both sides. Two ways to get the log-probs, equal to
fp32 rounding (tests/test_batch_logps.py shows it):

* `plain_logps`: the textbook path. `model(input_ids)` gives logits at every position,
  `dpo.logprobs.sequence_logprobs` sums the response tokens. Run once for the policy (with
  grad) and once for the reference (without).
* `SharedTrunk`: the fast path. With the embedding and blocks [0, K) frozen, policy and
  reference compute identical hidden states up to block K. So the trunk runs once, under
  no_grad; then the policy's trainable tail (with grad) and the reference's frozen tail.
  The LM head is applied only at positions that predict a response token
  (`head_logps`), not at all 2B x T positions x 49,152 classes.
"""
from __future__ import annotations

import torch

from smollm import SmolLM

from .freeze import first_trainable_layer
from .logprobs import sequence_logprobs

Batch = dict[str, torch.Tensor]


def head_logps(lm_head: torch.nn.Linear, hidden: torch.Tensor, input_ids: torch.Tensor,
               response_mask: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Sequence log-probs [R] from final hidden states [R, T, C], the head applied sparsely.

    Equal to `sequence_logprobs(lm_head(hidden), input_ids, response_mask, reduction)`, but
    only the N positions t-1 whose next token t is a response token go through the head.
    """
    R = input_ids.shape[0]
    counted = response_mask[:, 1:].bool()  # [R, T-1]: token t+1 is a response token
    h = hidden[:, :-1][counted]  # [N, C]: the positions that predict them
    targets = input_ids[:, 1:][counted]  # [N]
    rows = torch.arange(R, device=input_ids.device)[:, None].expand_as(counted)[counted]  # [N]
    logits = lm_head(h).float()  # [N, V]
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)  # [N]
    sums = torch.zeros(R, device=hidden.device, dtype=torch.float32).index_add(0, rows, token_logps)
    if reduction == "sum":
        return sums
    if reduction == "mean":
        counts = counted.sum(-1)
        if bool((counts == 0).any()):
            raise ValueError(f"row {int((counts == 0).nonzero()[0])} has no response tokens to average")
        return sums / counts
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def plain_logps(model: SmolLM, batch: Batch, reduction: str = "sum") -> torch.Tensor:
    """Log-probs [2B] by a full forward of `model` over every position."""
    logits = model(batch["input_ids"], batch["attention_mask"])  # [2B, T, V]
    return sequence_logprobs(logits, batch["input_ids"], batch["response_mask"], reduction=reduction)


class SharedTrunk:
    """Policy and reference log-probs with the frozen trunk computed once.

    Valid only when the embedding and blocks [0, K) of the policy are frozen and are the very
    same tensors in the reference (as `dpo.freeze.frozen_reference` makes them); checked here.
    """

    def __init__(self, policy: SmolLM, reference: SmolLM):
        self.policy, self.reference = policy, reference
        self.split = first_trainable_layer(policy)  # K
        pol, ref = policy.model, reference.model
        shared = pol.embed_tokens.weight is ref.embed_tokens.weight and all(
            p is q for i in range(self.split)
            for p, q in zip(pol.layers[i].parameters(), ref.layers[i].parameters())
        )
        if not shared:
            raise ValueError("SharedTrunk needs a reference that shares the policy's frozen trunk "
                             "(make it with dpo.freeze.frozen_reference after freezing)")

    def __call__(self, batch: Batch, reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
        """(policy log-probs [2B] with grad, reference log-probs [2B] without)."""
        ids, mask, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        with torch.no_grad():
            trunk = self.policy.hidden_states(ids, mask, end_layer=self.split, final_norm=False)  # [2B, T, C]
            ref_hidden = self.reference.hidden_states(ids, mask, start_layer=self.split, hidden=trunk)
            reference = head_logps(self.reference.lm_head, ref_hidden, ids, response, reduction)
        hidden = self.policy.hidden_states(ids, mask, start_layer=self.split, hidden=trunk)  # [2B, T, C]
        policy = head_logps(self.policy.lm_head, hidden, ids, response, reduction)
        return policy, reference


def policy_and_reference_logps(policy: SmolLM, reference: SmolLM, batch: Batch, reduction: str = "sum",
                               shared_trunk: SharedTrunk | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy [2B] with grad, reference [2B] without), by the shared trunk when given."""
    if shared_trunk is not None:
        return shared_trunk(batch, reduction)
    with torch.no_grad():
        ref = plain_logps(reference, batch, reduction)
    return plain_logps(policy, batch, reduction), ref
