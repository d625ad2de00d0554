"""What one training step computes: the objective objects the one `Trainer` is driven by.

The trainer (dpo.trainer) owns everything a step has in common: the data order, gradient
accumulation, clipping, the non-finite guard, the optimizer and the resumable state. An objective
owns the rest, for one micro-batch of items:

    objective.length(item)   how long an item is, for the length-grouped data order
    objective.count(items)   what the step's loss is a mean over (`unit`: pairs, or response tokens)
    objective(items)         (loss_sum [], stats) with loss_sum = the sum over those units

so the step's loss is sum(loss_sum of its micro-batches) / sum(count of its micro-batches), the
same number however the step is cut into micro-batches. `stats` holds per-item tensors [B] (the
trainer logs their mean over the step's items) and "tokens" (real tokens, for tokens/s).

Two objectives: `PreferenceObjective` (DPO and its variants, on `TokenizedPair`s) and
`SFTObjective` (the masked NLL of `TokenizedSequence`s). Both get their log-probs from the one
engine (dpo.engine).
"""
from __future__ import annotations

from typing import Any

import torch

from .engine import LogProbEngine, textbook_policy_and_reference_logps
from .loss import combined_loss, needs_token_counts
from .tokenization import TokenizedPair, TokenizedSequence, collate_pairs, collate_sequences

Stats = dict[str, torch.Tensor]


class PreferenceObjective:
    """The preference loss (`config.loss_type`, dpo.loss) of a micro-batch of pairs, averaged over pairs.

    The engine gives summed response log-probs; with `--logp-reduction mean` they are divided by
    the response token counts here (and the losses that normalise by length then get counts of
    1, so nothing is divided twice). A reference-free loss (SimPO, ORPO, SFT) gets no reference:
    the engine runs the policy alone.

    textbook: compute the log-probs by the textbook path (`dpo.engine.plain_logps`) instead of the
    engine: the oracle the engine is tested against, not a way to train.
    """

    unit = "pairs"  # what the loss is a mean over

    def __init__(self, engine: LogProbEngine, config: Any, *, pad_token_id: int, textbook: bool = False):
        self.engine, self.config, self.pad_token_id, self.textbook = engine, config, pad_token_id, textbook

    @staticmethod
    def length(pair: TokenizedPair) -> int:
        return max(len(pair.chosen_ids), len(pair.rejected_ids))

    @staticmethod
    def count(pairs: list[TokenizedPair]) -> int:
        return len(pairs)

    def collate(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return collate_pairs(pairs, self.pad_token_id)

    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(policy [2B], reference [2B] or None, response token counts [2B]), reduced as configured."""
        c = self.config
        if self.engine.reference is None:
            policy, reference = self.engine.policy_logps(batch, "sum", paired=True), None
        elif self.textbook:
            policy, reference = textbook_policy_and_reference_logps(
                self.engine.policy, self.engine.reference, batch, "sum")
        else:
            policy, reference = self.engine(batch, "sum")  # [2B] each
        tokens = batch["response_mask"][:, 1:].sum(-1).to(policy.dtype)  # [2B], scored positions t >= 1
        if c.logp_reduction == "mean":
            policy = policy / tokens
            reference = None if reference is None else reference / tokens
            tokens = torch.ones_like(tokens)
        return policy, reference, tokens

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        c = self.config
        policy_logps, reference_logps, tokens = self.logps(batch)
        B = policy_logps.shape[0] // 2
        ref = (None, None) if reference_logps is None else (reference_logps[:B], reference_logps[B:])
        counts = (tokens[:B], tokens[B:]) if needs_token_counts(c.loss_type) else (None, None)
        losses, chosen_rewards, rejected_rewards = combined_loss(
            c.loss_type, c.loss_weights, policy_logps[:B], policy_logps[B:], *ref,
            chosen_tokens=counts[0], rejected_tokens=counts[1], beta=c.beta, **c.loss_params())
        stats = {
            "reward_accuracy": (chosen_rewards > rejected_rewards).float(),
            "chosen_reward": chosen_rewards,
            "rejected_reward": rejected_rewards,
            "margin": chosen_rewards - rejected_rewards,
            "policy_chosen_logp": policy_logps[:B].detach().float(),
            "policy_rejected_logp": policy_logps[B:].detach().float(),
            "tokens": batch["attention_mask"].sum(),
        }
        return losses.sum(), stats


class SFTObjective:
    """The masked NLL of a micro-batch of prompt + response sequences, averaged over response tokens.

    A token counts when its response_mask is 1 at position t >= 1 (position 0 is predicted by
    nothing); prompt and padding tokens never count, and longer responses weigh more, as in a
    plain LM loss.
    """

    unit = "response_tokens"

    def __init__(self, engine: LogProbEngine, *, pad_token_id: int):
        self.engine, self.pad_token_id = engine, pad_token_id

    @staticmethod
    def length(seq: TokenizedSequence) -> int:
        return len(seq.input_ids)

    @staticmethod
    def count(seqs: list[TokenizedSequence]) -> int:
        return sum(sum(s.response_mask[1:]) for s in seqs)

    def collate(self, seqs: list[TokenizedSequence]) -> dict[str, torch.Tensor]:
        return collate_sequences(seqs, self.pad_token_id)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logps = self.engine.policy_logps(batch, "sum")  # [B] summed response-token log-probs
        return -logps.sum(), {"tokens": batch["attention_mask"].sum()}
