"""Preference losses: DPO and its variants, as pure functions on sequence log-probs.

DPO (Rafailov et al. 2023, "Direct Preference Optimization") starts from the
KL-regularised RL objective

    max_pi  E[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x)),

whose optimum is pi*(y|x) = pi_ref(y|x) * exp(r(x, y) / beta) / Z(x). Reading that
backwards, every policy defines an implicit reward r(x, y) = beta * log(pi / pi_ref)
(+ a term in x only), and plugging it into the Bradley-Terry preference model gives a
plain classification loss on a preferred (chosen, y_w) and a dispreferred
(rejected, y_l) response:

    L = -log sigmoid(beta * h),
    h = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x)).

What beta does: it is the weight of the KL penalty. A preference of a given strength
is satisfied by a log-ratio margin h of about logit(p) / beta, so HIGHER beta means a
SMALLER deviation from the reference: higher beta keeps the policy CLOSER to the
reference (several tutorials state it backwards; tests/test_loss.py checks the
direction).

Variants, selected by ``loss_type`` (see ``dpo_loss``): "sigmoid" (DPO, and
conservative DPO / cDPO with label smoothing), "robust" (Chowdhury et al. 2024, an
unbiased loss under label noise), "ipo" (Azar et al. 2023, regress h onto 1/(2 beta)),
"hinge" (SLiC-style, Zhao et al. 2023).

Shapes: B = batch of preference pairs. All log-probs are per sequence, [B].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "ipo", "hinge")


def _check_inputs(named: dict[str, Tensor]) -> None:
    """Every input must be a 1-D tensor [B], and all of them the same shape."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D [B] (one log-prob per sequence), got shape {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}; "
                "all four log-prob tensors must be [B]"
            )


def _check_hyperparameters(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {', '.join(LOSS_TYPES)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    ls = label_smoothing
    if not math.isfinite(ls):
        raise ValueError(f"label_smoothing must be finite, got {ls}")
    if loss_type == "sigmoid" and not 0.0 <= ls <= 0.5:
        raise ValueError(f"label_smoothing for loss_type 'sigmoid' must be in [0, 0.5], got {ls}")
    if loss_type == "robust" and not 0.0 <= ls < 0.5:
        raise ValueError(
            f"label_smoothing for loss_type 'robust' must be in [0, 0.5) (it divides by 1 - 2*ls), got {ls}"
        )
    if loss_type in ("ipo", "hinge") and ls != 0.0:
        raise ValueError(f"label_smoothing is not used by loss_type {loss_type!r}; it must be 0, got {ls}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference loss and the implicit rewards.

    Args:
        policy_chosen_logps:      [B] log pi(y_w | x), summed (or averaged) over response tokens.
        policy_rejected_logps:    [B] log pi(y_l | x).
        reference_chosen_logps:   [B] log pi_ref(y_w | x) (no gradient needed).
        reference_rejected_logps: [B] log pi_ref(y_l | x).
        beta: KL weight, > 0. Higher beta keeps the policy closer to the reference.
        loss_type: one of ``LOSS_TYPES``. With h the log-ratio margin
            ``(policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)``
            and ls = label_smoothing:

            - "sigmoid": ``-logsigmoid(beta*h)*(1-ls) - logsigmoid(-beta*h)*ls``.
              ls = 0 is DPO; ls > 0 is conservative DPO (cDPO: the label is assumed
              flipped with probability ls). ls may be in [0, 0.5]; at 0.5 the labels
              carry no information and the loss only pulls h to 0.
            - "robust": ``(-logsigmoid(beta*h)*(1-ls) + logsigmoid(-beta*h)*ls) / (1-2*ls)``,
              ls in [0, 0.5) strictly.
            - "ipo": ``(h - 1/(2*beta))**2``.
            - "hinge": ``relu(1 - beta*h)``.

            label_smoothing must be 0 for "ipo" and "hinge" (it is not silently ignored).
        label_smoothing: assumed label-noise rate, see above.

    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]), all fp32. The rewards are
        the implicit DPO rewards ``beta * (policy - reference)``, detached (for logging:
        reward accuracy = chosen > rejected, reward margin = chosen - rejected).
        Take ``losses.mean()`` for the batch loss.

    Raises:
        ValueError: unknown loss_type (the message lists the valid ones), beta not a
            finite positive number, label_smoothing out of range, or inputs that are
            not all 1-D with the same shape (the message names the argument).

    Everything is computed in fp32: the inputs are upcast (gradients still flow to
    bf16 inputs through the cast).
    """
    _check_inputs(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "reference_chosen_logps": reference_chosen_logps,
            "reference_rejected_logps": reference_rejected_logps,
        }
    )
    beta = float(beta)
    label_smoothing = float(label_smoothing)
    _check_hyperparameters(beta, loss_type, label_smoothing)

    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = reference_chosen_logps.float(), reference_rejected_logps.float()
    h = (pc - pr) - (rc - rr)  # [B] log-ratio margin
    ls = label_smoothing

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - ls) - F.logsigmoid(-beta * h) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - ls) + F.logsigmoid(-beta * h) * ls) / (1 - 2 * ls)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # "hinge"
        losses = torch.relu(1 - beta * h)

    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return losses, chosen_rewards, rejected_rewards
