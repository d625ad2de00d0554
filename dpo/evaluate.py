"""Held-out evaluation: does the model prefer the chosen response, before and after DPO?

For each held-out pair we compare sequence log-probs (with the run's reduction):
* reference accuracy: fraction of pairs where the reference (starting) model gives the chosen
  response a higher log-prob than the rejected one;
* policy accuracy: the same for the trained policy;
* reward accuracy: fraction where DPO's implicit reward prefers chosen, i.e.
  (policy - reference)(chosen) > (policy - reference)(rejected); 0 for an untrained policy;
* mean margin: the mean of beta * that difference (the implicit reward margin).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from smollm import SmolLM

from .batch_logps import SharedTrunk, policy_and_reference_logps
from .tokenization import TokenizedPair, collate_pairs


@dataclass
class EvalResult:
    num_pairs: int
    reference_accuracy: float
    policy_accuracy: float
    reward_accuracy: float
    mean_margin: float
    policy_chosen_logp: float
    policy_rejected_logp: float
    reference_chosen_logp: float
    reference_rejected_logp: float

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The reference-vs-policy table printed at the end of a run."""
        rows = [
            ("", "reference", "policy"),
            ("preference accuracy", f"{self.reference_accuracy:.1%}", f"{self.policy_accuracy:.1%}"),
            ("mean log p(chosen)", f"{self.reference_chosen_logp:.4f}", f"{self.policy_chosen_logp:.4f}"),
            ("mean log p(rejected)", f"{self.reference_rejected_logp:.4f}", f"{self.policy_rejected_logp:.4f}"),
        ]
        lines = [f"{a:<22}{b:>12}{c:>12}" for a, b, c in rows]
        lines.append(f"held-out pairs: {self.num_pairs}; implicit reward accuracy {self.reward_accuracy:.1%}, "
                     f"mean reward margin {self.mean_margin:+.4f}")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_pairs(policy: SmolLM, reference: SmolLM, pairs: list[TokenizedPair], *, pad_token_id: int,
                   beta: float, reduction: str = "mean", batch_size: int = 8,
                   device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                   shared_trunk: SharedTrunk | None = None) -> EvalResult:
    """Reference and policy preference accuracy on `pairs` (never trained on)."""
    if not pairs:
        raise ValueError("evaluate_pairs needs at least one pair")
    device = torch.device(device)
    was_training = policy.training
    policy.eval()
    logps = []  # (policy [2B], reference [2B]) per batch
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id).items()}
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            pol, ref = policy_and_reference_logps(policy, reference, batch, reduction, shared_trunk)
        B = len(chunk)
        logps.append(torch.stack([pol[:B], pol[B:], ref[:B], ref[B:]]).float().cpu())  # [4, B]
    policy.train(was_training)
    pc, pr, rc, rr = torch.cat(logps, dim=1)  # each [N]
    margin = beta * ((pc - rc) - (pr - rr))
    return EvalResult(
        num_pairs=len(pairs),
        reference_accuracy=(rc > rr).float().mean().item(),
        policy_accuracy=(pc > pr).float().mean().item(),
        reward_accuracy=(margin > 0).float().mean().item(),
        mean_margin=margin.mean().item(),
        policy_chosen_logp=pc.mean().item(),
        policy_rejected_logp=pr.mean().item(),
        reference_chosen_logp=rc.mean().item(),
        reference_rejected_logp=rr.mean().item(),
    )
