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
  The model runs the real tokens only, not the padding, and the prompt a chosen and a
  rejected row share only once (`smollm.model.Packing`). The LM
  head is applied only at positions that predict a response token (`head_logps`), not at
  all 2B x T positions x 49,152 classes, and a chunk of those positions at a time: the
  [N, V] logits are never held whole, and backward recomputes them chunk by chunk
  (`HeadLogProbs`) instead of keeping them from the forward.

What each piece buys is measured in docs/benchmarks.md.
"""
from __future__ import annotations

import torch

from smollm import SmolLM
from smollm.model import Packing

from .freeze import first_trainable_layer
from .logprobs import sequence_logprobs

Batch = dict[str, torch.Tensor]


HEAD_CHUNK = 256  # positions per chunk of logits in HeadLogProbs: 256 x 49,152 fp32 = 50 MB


class HeadLogProbs(torch.autograd.Function):
    """log_softmax(h @ W^T)[target] for N positions, HEAD_CHUNK positions at a time.

    h [N, C], weight [V, C], targets [N] -> log-probs [N] fp32. The same numbers as
    `F.linear(h, weight).float().log_softmax(-1).gather(...)`, without holding [N, V]:
    forward keeps only h, the targets and each position's logsumexp [N]; backward recomputes
    a chunk's logits, turns them into d log p / d logits = onehot(target) - softmax, and
    accumulates the gradients of h and weight. Costs one extra [chunk, C] x [C, V] matmul per
    chunk; saves the [N, V] fp32 logits (and their gradient) that autograd would keep.
    Under autocast, call it with h and weight already cast (see `head_logps`).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int = HEAD_CHUNK):
        N = h.shape[0]
        out = torch.empty(N, device=h.device, dtype=torch.float32)
        lse = torch.empty(N, device=h.device, dtype=torch.float32)
        for s in range(0, N, chunk):
            logits = (h[s:s + chunk] @ weight.T).float()  # [n, V]
            lse[s:s + chunk] = logits.logsumexp(-1)
            out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_w else None
        for s in range(0, h.shape[0], ctx.chunk):
            hc, g = h[s:s + ctx.chunk], grad_out[s:s + ctx.chunk].float()  # [n, C], [n]
            # d out / d logits = onehot(target) - softmax(logits), times the incoming gradient
            grad_logits = (hc @ weight.T).float().sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(-1, targets[s:s + ctx.chunk, None], g[:, None])  # [n, V]
            grad_logits = grad_logits.to(h.dtype)
            if want_h:
                grad_h[s:s + ctx.chunk] = grad_logits @ weight  # [n, C]
            if want_w and grad_logits.dtype == torch.float32:
                grad_w.addmm_(grad_logits.T, hc)  # [V, C], accumulated in place
            elif want_w:
                grad_w += (grad_logits.T @ hc).float()  # [V, C], low-precision matmul, fp32 sum
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None


def _head_token_logps(lm_head: torch.nn.Linear, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) [N] fp32 at hidden states h [N, C], by HeadLogProbs, autocast-aware."""
    if lm_head.bias is not None:  # SmolLM's head has none; keep a biased head exact the plain way
        logits = lm_head(h).float()  # [N, V]
        return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)
    weight = lm_head.weight
    if torch.is_autocast_enabled(h.device.type):  # do what F.linear does under autocast: cast both
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    else:
        h = h.to(weight.dtype)
    with torch.autocast(h.device.type, enabled=False):
        return HeadLogProbs.apply(h, weight, targets)


def head_logps(lm_head: torch.nn.Linear, hidden: torch.Tensor, input_ids: torch.Tensor,
               response_mask: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Sequence log-probs [R] from final hidden states [R, T, C], the head applied sparsely.

    Equal to `sequence_logprobs(lm_head(hidden), input_ids, response_mask, reduction)`, but
    only the N positions t-1 whose next token t is a response token go through the head,
    a chunk at a time (`HeadLogProbs`).
    """
    R = input_ids.shape[0]
    counted = response_mask[:, 1:].bool()  # [R, T-1]: token t+1 is a response token
    h = hidden[:, :-1][counted]  # [N, C]: the positions that predict them
    targets = input_ids[:, 1:][counted]  # [N]
    rows = torch.arange(R, device=input_ids.device)[:, None].expand_as(counted)[counted]  # [N]
    token_logps = _head_token_logps(lm_head, h, targets)  # [N]
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
    """Log-probs [2B] by a full forward of `model` over every position, padding included."""
    logits = model(batch["input_ids"], batch["attention_mask"], pack=False)  # [2B, T, V]
    return sequence_logprobs(logits, batch["input_ids"], batch["response_mask"], reduction=reduction)


class SharedTrunk:
    """Policy and reference log-probs with the frozen trunk computed once.

    Valid only when the embedding and blocks [0, K) of the policy are frozen and are the very
    same tensors in the reference (as `dpo.freeze.frozen_reference` makes them); checked here.
    recompute_tail: the policy's trainable blocks keep only their inputs for backward and run
    again during backward (activation checkpointing): the same gradients for ~90% less
    activation memory, at the price of one more forward of the tail (a few % of a step).
    share_prefixes: row i (chosen) and row B + i (rejected) run their common leading tokens,
    the prompt and any first response tokens they agree on, once (in row i). Exact, since a
    position's hidden state depends only on the tokens up to it.
    """

    def __init__(self, policy: SmolLM, reference: SmolLM, recompute_tail: bool = True,
                 share_prefixes: bool = True):
        self.policy, self.reference, self.recompute_tail = policy, reference, recompute_tail
        self.share_prefixes = share_prefixes
        self.split = first_trainable_layer(policy)  # K
        pol, ref = policy.model, reference.model
        shared = pol.embed_tokens.weight is ref.embed_tokens.weight and all(
            p is q for i in range(self.split)
            for p, q in zip(pol.layers[i].parameters(), ref.layers[i].parameters())
        )
        if not shared:
            raise ValueError("SharedTrunk needs a reference that shares the policy's frozen trunk "
                             "(make it with dpo.freeze.frozen_reference after freezing)")

    def packing(self, batch: Batch) -> Packing | None:
        """The batch's `Packing`, made once for the trunk and both tails: padding removed and
        each pair's common prefix run once. A batch with neither padding nor shared prompts runs
        unpacked (None: one batched attention call is faster than one per sequence)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B = ids.shape[0] // 2
        pairs = [(i, B + i) for i in range(B)] if self.share_prefixes else None  # chosen, rejected
        return Packing.of(mask, ids, pairs) if pairs or not bool(mask.bool().all()) else None

    @torch.no_grad()
    def trunk_states(self, batch: Batch, packing: Packing | None) -> torch.Tensor:
        """The frozen trunk's output [2B, T, C]: the residual stream entering block K."""
        return self.policy.hidden_states(batch["input_ids"], batch["attention_mask"], end_layer=self.split,
                                         final_norm=False, packing=packing)

    def tail_logps(self, model: SmolLM, batch: Batch, trunk: torch.Tensor, packing: Packing | None,
                   reduction: str = "sum", recompute: bool = False) -> torch.Tensor:
        """Log-probs [2B] of `model` (the policy or the reference) from the trunk's output
        [2B, T, C]: its blocks [K, L), final norm and head, the head at response positions only."""
        ids = batch["input_ids"]
        hidden = model.hidden_states(ids, batch["attention_mask"], start_layer=self.split, hidden=trunk,
                                     recompute=recompute, packing=packing)  # [2B, T, C]
        return head_logps(model.lm_head, hidden, ids, batch["response_mask"], reduction)

    @torch.no_grad()
    def policy_is_reference(self) -> bool:
        """Whether the policy's blocks [K, L), final norm and head still equal the reference's
        (e.g. before the first step): then the policy's log-probs are the reference's."""
        def tail(model: SmolLM) -> list[torch.Tensor]:
            return [*model.model.layers[self.split:].parameters(), *model.model.norm.parameters(),
                    *model.lm_head.parameters()]

        pol, ref = tail(self.policy), tail(self.reference)
        return len(pol) == len(ref) and all(p is q or torch.equal(p, q) for p, q in zip(pol, ref))

    def __call__(self, batch: Batch, reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
        """(policy log-probs [2B] with grad, reference log-probs [2B] without)."""
        packing = self.packing(batch)
        with torch.no_grad():
            trunk = self.trunk_states(batch, packing)  # [2B, T, C]
            reference = self.tail_logps(self.reference, batch, trunk, packing, reduction)
        policy = self.tail_logps(self.policy, batch, trunk, packing, reduction, recompute=self.recompute_tail)
        return policy, reference


def policy_and_reference_logps(policy: SmolLM, reference: SmolLM, batch: Batch, reduction: str = "sum",
                               shared_trunk: SharedTrunk | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy [2B] with grad, reference [2B] without), by the shared trunk when given."""
    if shared_trunk is not None:
        return shared_trunk(batch, reduction)
    with torch.no_grad():
        ref = plain_logps(reference, batch, reduction)
    return plain_logps(policy, batch, reduction), ref
