"""One engine from a batch to sequence log-probs, for every way of training and evaluating.

DPO needs, per row of a batch (chosen rows, then rejected rows: [2B, T]), the log-probability
of its response tokens under the policy (with grad) and under the reference (without); SFT
needs the policy's alone; an evaluation needs both without grad. `LogProbEngine` computes all
of them the same way, whatever is trained (the last N blocks, every block, adapters):

* **Only real tokens.** A padded batch runs as one row of its real tokens
  (`smollm.layout.Packing`), and the prompt a chosen and a rejected row share runs once.
* **The frozen trunk once.** When the embedding and blocks [0, K) are frozen and are the very
  same tensors in policy and reference (as `dpo.freeze.frozen_reference` makes them), both
  compute identical hidden states up to block K: the trunk runs once, under no_grad, then the
  policy's tail (with grad) and the reference's. With nothing shared (K = 0: full
  fine-tuning, or `share_trunk=False`), each model runs from its own embedding.
* **oneDNN where nothing is differentiated.** The trunk (and, in an evaluation, both tails)
  runs its Linear layers with oneDNN on a CPU in fp32, 10-20% faster than MKL with AVX2
  kernels (`run_layers`); what is trained runs through autograd's ordinary matmuls.
* **The head only where it is scored.** The LM head runs only at positions that predict a
  response token, a chunk at a time: the [N, V] logits are held for backward only up to a
  budget, and backward recomputes the rest chunk by chunk (`HeadLogProbs`). So does the last
  block, but for the keys and values every position gives attention (`SmolLM.run_layers`'s
  keep): a prompt's positions feed the head nothing.

The engine calls the model's modules (embedding, blocks, norm, head); the only weight it reads
directly is a plain Linear head's, which is exactly what calling it computes
(`smollm.autograd.plain_linear`): an adapter or a hooked head is called as itself.

`plain_logps` is the textbook path, kept as the oracle the engine is tested against
(tests/test_engine.py): `model(input_ids)` gives logits at every position, padding included,
and `dpo.logprobs.sequence_logprobs` sums the response tokens. What each piece of the engine
buys is measured in docs/benchmarks.md.
"""
from __future__ import annotations

import torch

from smollm import SmolLM
from smollm import onednn
from smollm.autograd import plain_linear
from smollm.layout import Packing

from .distributed import same_values
from .frozen_memo import FrozenMemo
from .logprobs import sequence_logprobs

Batch = dict[str, torch.Tensor]


# The last block runs only at the positions the head scores (and gives the others' keys and values):
# exact, 4-5% of a default step with AVX2 kernels (docs/benchmarks.md, section 10). bench.step_ab switches it off.
LAST_BLOCK_WHERE_READ = True
HEAD_CHUNK = 256  # positions per chunk of logits in HeadLogProbs: 256 x 49,152 fp32 = 50 MB
HEAD_KEEP_BYTES = 512 * 2**20  # logits HeadLogProbs keeps for backward, at most; the rest are recomputed


class HeadLogProbs(torch.autograd.Function):
    """log_softmax(h @ W^T)[target] for N positions, HEAD_CHUNK positions at a time.

    h [N, C], weight [V, C], targets [N] -> log-probs [N] fp32. The same numbers as
    `F.linear(h, weight).float().log_softmax(-1).gather(...)`, without holding [N, V] beyond a
    budget: forward keeps h, the targets, each position's logsumexp [N] and, when a gradient is
    wanted, the logits of its first chunks up to `keep_bytes` (HEAD_KEEP_BYTES: 512 MiB, the
    default run's ~870 response positions a step take 170 MB); backward recomputes the logits of
    any other chunk (one more [chunk, C] x [C, V] matmul: on an AVX2 CPU, a quarter of the head's
    time in a step), turns them into d log p / d logits = onehot(target) - softmax, and
    accumulates the gradients of h and weight. A kept chunk and a recomputed one are the same
    matmul of the same operands, so the gradients do not depend on the budget.
    Under autocast, call it with h and weight already cast (see `head_logps`).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int = HEAD_CHUNK, keep_bytes: int = HEAD_KEEP_BYTES):
        N = h.shape[0]
        out = torch.empty(N, device=h.device, dtype=torch.float32)
        lse = torch.empty(N, device=h.device, dtype=torch.float32)
        room = keep_bytes if any(ctx.needs_input_grad[:2]) else 0  # nothing to keep without a backward
        kept = []  # the first chunks' logits [n, V], while they fit in the budget
        for s in range(0, N, chunk):
            logits = onednn.linear(h[s:s + chunk], weight).float()  # [n, V]
            lse[s:s + chunk] = logits.logsumexp(-1)
            out[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if len(kept) == s // chunk and logits.numel() * logits.element_size() <= room:
                kept.append(logits)
                room -= logits.numel() * logits.element_size()
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.kept = chunk, kept
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if want_w else None
        for i, s in enumerate(range(0, h.shape[0], ctx.chunk)):
            hc, g = h[s:s + ctx.chunk], grad_out[s:s + ctx.chunk].float()  # [n, C], [n]
            logits = ctx.kept[i] if i < len(ctx.kept) else onednn.linear(hc, weight).float()  # [n, V]
            # d out / d logits = onehot(target) - softmax(logits), times the incoming gradient
            # (out of place: a kept chunk stays intact for a second backward with retain_graph)
            grad_logits = logits.sub(lse[s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])
            grad_logits.scatter_add_(-1, targets[s:s + ctx.chunk, None], g[:, None])  # [n, V]
            grad_logits = grad_logits.to(h.dtype)
            if want_h:
                grad_h[s:s + ctx.chunk] = grad_logits @ weight  # [n, C]
            if want_w and grad_logits.dtype == torch.float32:
                grad_w.addmm_(grad_logits.T, hc)  # [V, C], accumulated in place
            elif want_w:
                grad_w += (grad_logits.T @ hc).float()  # [V, C], low-precision matmul, fp32 sum
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None


def _head_token_logps(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) [N] fp32 at hidden states h [N, C], autocast-aware.

    A plain bias-free Linear head runs through HeadLogProbs (its weight read directly, which is
    exactly what calling it computes). Any other head (an adapter, a hooked or biased Linear) is
    called as a module, HEAD_CHUNK positions at a time.
    """
    if not plain_linear(lm_head):
        parts = []
        for s in range(0, h.shape[0], HEAD_CHUNK):
            logits = lm_head(h[s:s + HEAD_CHUNK]).float()  # [n, V]
            parts.append(logits.gather(-1, targets[s:s + HEAD_CHUNK, None]).squeeze(-1) - logits.logsumexp(-1))
        return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    weight = lm_head.weight
    if torch.is_autocast_enabled(h.device.type):  # do what F.linear does under autocast: cast both
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    else:
        h = h.to(weight.dtype)
    with torch.autocast(h.device.type, enabled=False):
        return HeadLogProbs.apply(h, weight, targets)


def head_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
               response_mask: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Sequence log-probs [R] from final hidden states [R, T, C], the head applied sparsely.

    Equal to `sequence_logprobs(lm_head(hidden), input_ids, response_mask, reduction)`, but
    only the N positions t-1 whose next token t is a response token go through the head,
    a chunk at a time (`HeadLogProbs`).
    """
    counted = response_mask[:, 1:].bool()  # [R, T-1]: token t+1 is a response token
    return scored_logps(lm_head, hidden[:, :-1][counted], input_ids, response_mask, reduction)


def scored_logps(lm_head: torch.nn.Module, h: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                 reduction: str = "sum") -> torch.Tensor:
    """`head_logps` from the final hidden states h [N, C] of the scored positions alone, in the
    order of `response_mask[:, 1:]`'s True entries (row by row)."""
    R = input_ids.shape[0]
    counted = response_mask[:, 1:].bool()  # [R, T-1]: token t+1 is a response token
    targets = input_ids[:, 1:][counted]  # [N]
    rows = torch.arange(R, device=input_ids.device)[:, None].expand_as(counted)[counted]  # [N]
    token_logps = _head_token_logps(lm_head, h, targets)  # [N]
    sums = torch.zeros(R, device=h.device, dtype=torch.float32).index_add(0, rows, token_logps)
    if reduction == "sum":
        return sums
    if reduction == "mean":
        counts = counted.sum(-1)
        if bool((counts == 0).any()):
            raise ValueError(f"row {int((counts == 0).nonzero()[0])} has no response tokens to average")
        return sums / counts
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def run_layers(model: SmolLM, x: torch.Tensor, batch: Batch, packing: Packing | None, start: int,
               end: int | None = None, recompute: bool = False, fast: bool = False,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks [start, end) of `model` on the residual stream x [R, T, C] of a batch's rows.

    With a `Packing`, only its packed tokens run (each shared prefix once, in its first row:
    a reusing row's states at its shared positions are not read, its partner's stand for
    them) and the result comes back as [R, T, C], zeros at padding; without one, the padded
    rows run with their attention mask.
    fast: their Linear layers multiply with oneDNN on a CPU in fp32 (`smollm.onednn.onednn_linears`,
    packed=False: 10-20% faster than MKL with AVX2 kernels), which has no backward; for blocks
    that run without a gradient. Its sums differ from MKL's in the last bits.
    keep [n] (with a Packing): packed positions whose output is read; the last block computes
    only theirs, returned as [1, n, C] (`SmolLM.run_layers`).
    """
    fast = fast and not torch.is_grad_enabled()
    with onednn.onednn_linears(model.model.layers[start:end], packed=False, enabled=fast):
        if packing is None:
            positions, layout = model.positions_and_layout(batch["input_ids"], batch["attention_mask"])
            return model.run_layers(x, positions, layout, start, end, recompute=recompute)
        model.check_positions(past=0, new=x.shape[1])
        x = model.run_layers(packing.pack(x), packing.position_ids, packing.layout, start, end,
                             recompute=recompute, keep=keep)  # [1, N, C], or [1, n, C] with keep
    return x if keep is not None else packing.unpack(x)


def shared_trunk_depth(policy: SmolLM, reference: SmolLM | None) -> int:
    """K: how many leading blocks policy and reference share, frozen, as the very same tensors,
    on a shared frozen embedding (0 when the embedding is not shared). Without a reference: how
    many leading blocks of the policy are frozen, on a frozen embedding."""
    pol = policy.model
    ref = (reference if reference is not None else policy).model
    if pol.embed_tokens.weight is not ref.embed_tokens.weight or pol.embed_tokens.weight.requires_grad:
        return 0
    depth = 0
    for a, b in zip(pol.layers, ref.layers):
        pa, pb = list(a.parameters()), list(b.parameters())
        if len(pa) != len(pb) or not all(p is q and not p.requires_grad for p, q in zip(pa, pb)):
            break
        depth += 1
    return min(depth, policy.config.num_hidden_layers)


class LogProbEngine:
    """Sequence log-probs of a batch for a policy and, optionally, its reference.

    reference: None for the policy alone (SFT, a reference-free loss): its frozen leading blocks
        then run without grad, as the trunk.
    share_trunk: run the frozen blocks both models share once (see the module docstring);
        False runs each model from its own embedding (same numbers, more work).
    recompute: the policy's trainable blocks keep only their inputs for backward and run again
        during backward (activation checkpointing): the same gradients for ~90% less
        activation memory, at the price of one more forward of those blocks.
    share_prefixes: in a paired batch, row i (chosen) and row B + i (rejected) run their common
        leading tokens, the prompt and any first response tokens they agree on, once (in row i).
    memo: a `dpo.frozen_memo.FrozenMemo` shared by the runs of a sweep: a paired batch seen before
        takes its trunk output and reference log-probs from it (exact: what the same code computed).
    """

    def __init__(self, policy: SmolLM, reference: SmolLM | None = None, *, share_trunk: bool = True,
                 recompute: bool = True, share_prefixes: bool = True, memo: FrozenMemo | None = None):
        self.policy, self.reference = policy, reference
        self.recompute, self.share_prefixes, self.memo = recompute, share_prefixes, memo
        self.split = shared_trunk_depth(policy, reference) if share_trunk else 0  # K

    def packing(self, batch: Batch, paired: bool = True) -> Packing | None:
        """The batch's `Packing`, made once for the trunk and both tails: padding removed and, for
        a paired batch, each pair's common prefix run once. A batch with neither padding nor
        shared prompts runs unpacked (None: one batched attention call is faster than one per row)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        B = ids.shape[0] // 2
        pairs = [(i, B + i) for i in range(B)] if paired and self.share_prefixes else None  # chosen, rejected
        return Packing.of(mask, ids, pairs) if pairs or not bool(mask.bool().all()) else None

    @torch.no_grad()
    def trunk_states(self, batch: Batch, packing: Packing | None) -> torch.Tensor | None:
        """The shared trunk's output [R, T, C], the residual stream entering block K (None when K = 0).
        Never differentiated, so its Linear layers run with oneDNN on a CPU in fp32 (`run_layers`)."""
        if self.split == 0:
            return None
        x = self.policy.model.embed_tokens(batch["input_ids"])  # [R, T, C]
        return run_layers(self.policy, x, batch, packing, 0, self.split, fast=True)

    def tail_logps(self, model: SmolLM, batch: Batch, trunk: torch.Tensor | None, packing: Packing | None,
                   reduction: str = "sum", recompute: bool = False, fast: bool = True) -> torch.Tensor:
        """Log-probs [R] of `model` (the policy or the reference) from the trunk's output [R, T, C]
        (or from its own embedding when there is no trunk): its blocks [K, L), final norm and
        head, the head at response positions only.

        fast: the blocks' Linear layers with oneDNN where no gradient is wanted (`run_layers`).
        The policy's and the reference's tails of one batch must agree on it, so that an
        untrained policy's log-probs equal the reference's to the bit (`__call__` sees to it).
        """
        ids, response_mask = batch["input_ids"], batch["response_mask"]
        x = trunk if trunk is not None else model.model.embed_tokens(ids)  # [R, T, C]
        if packing is None or self.split == model.config.num_hidden_layers or not LAST_BLOCK_WHERE_READ:
            x = run_layers(model, x, batch, packing, self.split, recompute=recompute, fast=fast)  # [R, T, C]
            return head_logps(model.lm_head, model.model.norm(x), ids, response_mask, reduction)
        # The last block only where the head reads: the packed positions that predict a response token
        R, T = ids.shape
        counted = response_mask[:, 1:].bool()  # [R, T-1]
        scored = packing.gather.view(R, T)[:, :-1][counted]  # [N] packed position of each, in order
        keep, where = torch.unique(scored, sorted=True, return_inverse=True)  # [n] (a shared prompt's once), [N]
        h = run_layers(model, x, batch, packing, self.split, recompute=recompute, fast=fast, keep=keep)  # [1, n, C]
        return scored_logps(model.lm_head, model.model.norm(h)[0][where], ids, response_mask, reduction)

    @torch.no_grad()
    def policy_is_reference(self) -> bool:
        """Whether the policy's blocks [K, L), final norm and head (and embedding, when K = 0)
        still equal the reference's, e.g. before the first step: then their log-probs are equal."""
        if self.reference is None:
            return False

        def tail(model: SmolLM) -> list[torch.Tensor]:
            first = [] if self.split else list(model.model.embed_tokens.parameters())
            return [*first, *model.model.layers[self.split:].parameters(), *model.model.norm.parameters(),
                    *model.lm_head.parameters()]

        pol, ref = tail(self.policy), tail(self.reference)  # (FSDP's shards gathered: every rank decides alike)
        return len(pol) == len(ref) and all(same_values(p, q) for p, q in zip(pol, ref))

    def __call__(self, batch: Batch, reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
        """(policy log-probs [2B] with grad, reference log-probs [2B] without) of a paired batch."""
        if self.reference is None:
            raise ValueError("this engine has no reference model; use policy_logps")
        packing = self.packing(batch)
        fast = not torch.is_grad_enabled()  # both tails alike: oneDNN only when neither needs a backward
        trunk, reference = self._frozen_side(batch, packing, reduction, fast)
        policy = self.tail_logps(self.policy, batch, trunk, packing, reduction, recompute=self.recompute, fast=fast)
        return policy, reference

    @torch.no_grad()
    def _frozen_side(self, batch: Batch, packing: Packing | None, reduction: str,
                     fast: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the trunk's output [2B, T, C] or None, the reference's log-probs [2B]): from the memo
        when it has them, else computed (and kept there)."""
        memo = self.memo
        if memo is None:
            trunk = self.trunk_states(batch, packing)
            return trunk, self.tail_logps(self.reference, batch, trunk, packing, reduction, fast=fast)
        memo.bind(self.reference)
        trunk_key, reference_key = memo.keys(batch, split=self.split, share_prefixes=self.share_prefixes,
                                             reduction=reduction, fast=fast)
        reference = memo.reference(reference_key)
        trunk = memo.trunk(trunk_key, packing) if self.split else None
        if trunk is None and self.split:
            trunk = self.trunk_states(batch, packing)
            memo.keep_trunk(trunk_key, trunk, packing)
        if reference is None:
            reference = self.tail_logps(self.reference, batch, trunk, packing, reduction, fast=fast)
            memo.keep_reference(reference_key, reference)
        return trunk, reference

    def policy_logps(self, batch: Batch, reduction: str = "sum", paired: bool = False) -> torch.Tensor:
        """The policy's log-probs [R] alone (with grad when enabled), e.g. SFT's rows (not paired)."""
        packing = self.packing(batch, paired=paired)
        with torch.no_grad():
            trunk = self.trunk_states(batch, packing)
        return self.tail_logps(self.policy, batch, trunk, packing, reduction,
                               recompute=self.recompute and torch.is_grad_enabled())


def plain_logps(model: SmolLM, batch: Batch, reduction: str = "sum") -> torch.Tensor:
    """Log-probs [2B] by a full forward of `model` over every position, padding included."""
    logits = model(batch["input_ids"], batch["attention_mask"], pack=False)  # [2B, T, V]
    return sequence_logprobs(logits, batch["input_ids"], batch["response_mask"], reduction=reduction)


def textbook_policy_and_reference_logps(policy: SmolLM, reference: SmolLM, batch: Batch,
                                        reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """(policy [2B] with grad, reference [2B] without) by the textbook path: the engine's oracle."""
    with torch.no_grad():
        ref = plain_logps(reference, batch, reduction)
    return plain_logps(policy, batch, reduction), ref
