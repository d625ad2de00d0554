"""Token and sequence log-probabilities from causal-LM logits, as pure functions.

Shapes: B = batch, T = sequence length, V = vocabulary size.

Alignment: ``logits[:, t]`` is the model's prediction for ``input_ids[:, t + 1]``, so
token t >= 1 has log-prob ``log_softmax(logits[:, t - 1])[input_ids[:, t]]`` and token
0 has none (nothing predicts it).

Memory: each log-prob is computed as ``logit[target] - logsumexp(logits)`` in fp32,
a slice of the sequence at a time, so a full [B, T, V] fp32 log_softmax is never
materialised (V = 49152 for SmolLM). This lowers peak memory when no graph is kept
(the reference model under ``torch.no_grad()``); with autograd on, the fp32 copy of
each slice is still saved for the backward pass. The result is exact either way.

Sum or mean: the DPO paper uses the SUM of token log-probs, i.e. the log-prob of the
whole response. The MEAN over response tokens is a different objective (length
normalised, as in SimPO-style or some course set-ups); with it, beta has a different
scale. Choose explicitly with ``reduction``.
"""
from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS: tuple[str, ...] = ("sum", "mean")


def _check_logits_and_ids(logits: Tensor, input_ids: Tensor) -> None:
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits [B, T, V] has shape {tuple(logits.shape)} but input_ids [B, T] has shape "
            f"{tuple(input_ids.shape)}: B and T must match"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.numel() > 0:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= logits.shape[-1]:
            raise ValueError(
                f"input_ids must lie in [0, V={logits.shape[-1]}), got values in [{lo}, {hi}] "
                "(ignore-index values such as -100 belong in response_mask, not input_ids)"
            )


def token_logprobs(logits: Tensor, input_ids: Tensor, chunk_size: int = 256) -> Tensor:
    """Log-prob of each token given the tokens before it.

    Args:
        logits: [B, T, V] any float dtype; ``logits[:, t]`` predicts ``input_ids[:, t+1]``.
        input_ids: [B, T] integer token ids.
        chunk_size: number of sequence positions processed at once (memory only; the
            result does not depend on it).

    Returns:
        [B, T-1] fp32, where ``out[:, t-1] = log p(input_ids[:, t] | input_ids[:, :t])``.
    """
    _check_logits_and_ids(logits, input_ids)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pred = logits[:, :-1]  # [B, T-1, V] predictions for positions 1..T-1
    targets = input_ids[:, 1:].long()  # [B, T-1]
    pieces = []
    for s in range(0, pred.shape[1], chunk_size):
        lg = pred[:, s : s + chunk_size]  # [B, C, V]
        tg = targets[:, s : s + chunk_size]  # [B, C]
        # gather in the native dtype, then upcast: exact, since bf16/fp16 values are fp32-representable
        picked = lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1).float()  # [B, C]
        pieces.append(picked - torch.logsumexp(lg.float(), dim=-1))  # [B, C]
    if not pieces:  # T == 1: nothing is predicted
        return logits.new_zeros((logits.shape[0], 0), dtype=torch.float32)
    return torch.cat(pieces, dim=1)  # [B, T-1]


def sequence_logprobs(
    logits: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    reduction: str = "sum",
    chunk_size: int = 256,
) -> Tensor:
    """Log-prob of the response part of each sequence.

    Args:
        logits: [B, T, V] (any float dtype; computed in fp32).
        input_ids: [B, T].
        response_mask: [B, T], 1 (or True) on response tokens, 0 on prompt and
            padding. Position 0 never counts, whatever its mask (nothing predicts it).
        reduction: "sum" (the DPO paper: log pi(y|x)) or "mean" (average over the
            counted tokens of each row).
        chunk_size: see ``token_logprobs``.

    Returns:
        [B] fp32: sum (or mean) over t >= 1 with response_mask[:, t] == 1 of
        log p(input_ids[:, t] | input_ids[:, :t]).

    Raises:
        ValueError: bad shapes (naming the tensor and both shapes), an unknown
            reduction, a mask with values other than 0/1, or — with "mean" — a row
            with no counted tokens (named; a silent NaN would poison the batch).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(REDUCTIONS)}")
    _check_logits_and_ids(logits, input_ids)
    if response_mask.shape != input_ids.shape:
        raise ValueError(
            f"response_mask [B, T] has shape {tuple(response_mask.shape)} but input_ids [B, T] has shape "
            f"{tuple(input_ids.shape)}"
        )
    if bool(((response_mask != 0) & (response_mask != 1)).any()):
        raise ValueError("response_mask must contain only 0 and 1")

    counted = response_mask[:, 1:] != 0  # [B, T-1] aligned with token_logprobs
    lp = token_logprobs(logits, input_ids, chunk_size=chunk_size)  # [B, T-1]
    # where, not multiply: a masked position never contributes, even if it were -inf
    total = torch.where(counted, lp, torch.zeros_like(lp)).sum(dim=-1)  # [B]
    if reduction == "sum":
        return total
    n = counted.sum(dim=-1)  # [B]
    empty = (n == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"reduction='mean' needs at least one counted response token (t >= 1) per row; "
            f"row(s) {empty} have none"
        )
    return total / n.float()
