"""Held-out evaluation: does the model prefer the chosen response, before and after DPO?

For each held-out pair we compare sequence log-probs (with the run's reduction):
* reference accuracy: fraction of pairs where the reference (starting) model gives the chosen
  response a higher log-prob than the rejected one;
* policy accuracy: the same for the trained policy;
* reward accuracy: fraction where DPO's implicit reward prefers chosen, i.e.
  (policy - reference)(chosen) > (policy - reference)(rejected); 0 for an untrained policy;
* mean margin: the mean of beta * that difference (the implicit reward margin).

A run evaluates the same held-out pairs several times (before, every --eval-every steps, after).
With a frozen trunk shared (`dpo.engine.LogProbEngine`), most of that work never changes:
the trunk's output for those pairs, and the reference's log-probs. `HeldOutCache` computes them
once and then runs only the policy's trainable tail, with the same numbers as `evaluate_pairs`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from smollm import SmolLM
from smollm.layout import Packing

from . import distributed
from .engine import Batch, LogProbEngine
from .precision import autocast_context
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
                   engine: LogProbEngine | None = None) -> EvalResult:
    """Reference and policy preference accuracy on `pairs` (never trained on), everything
    computed afresh by `engine` (default: a `LogProbEngine` of the two models). `HeldOutCache`
    gives the same numbers, the unchanging part computed once."""
    if not pairs:
        raise ValueError("evaluate_pairs needs at least one pair")
    device = torch.device(device)
    engine = engine or LogProbEngine(policy, reference, recompute=False)
    was_training = policy.training
    policy.eval()
    logps = []  # (policy [2B], reference [2B]) per batch
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id).items()}
        with autocast_context(device, autocast_dtype):
            pol, ref = engine(batch, reduction)
        B = len(chunk)
        logps.append(torch.stack([pol[:B], pol[B:], ref[:B], ref[B:]]).float().cpu())  # [4, B]
    policy.train(was_training)
    return _result(torch.cat(logps, dim=1), beta)


def _result(logps: torch.Tensor, beta: float) -> EvalResult:
    """The EvalResult of log-probs [4, N]: policy chosen, policy rejected, reference chosen,
    reference rejected (fp32)."""
    pc, pr, rc, rr = logps  # each [N]
    margin = beta * ((pc - rc) - (pr - rr))
    return EvalResult(
        num_pairs=logps.shape[1],
        reference_accuracy=(rc > rr).float().mean().item(),
        policy_accuracy=(pc > pr).float().mean().item(),
        reward_accuracy=(margin > 0).float().mean().item(),
        mean_margin=margin.mean().item(),
        policy_chosen_logp=pc.mean().item(),
        policy_rejected_logp=pr.mean().item(),
        reference_chosen_logp=rc.mean().item(),
        reference_rejected_logp=rr.mean().item(),
    )


def pairs_fingerprint(pairs: list[TokenizedPair]) -> int:
    """A hash of what the held-out numbers depend on: every pair's token ids and response masks."""
    return hash(tuple((tuple(p.chosen_ids), tuple(p.chosen_mask), tuple(p.rejected_ids), tuple(p.rejected_mask))
                      for p in pairs))


@dataclass
class _CachedBatch:
    start: int  # index of its first pair in the held-out list
    batch: Batch  # collate_pairs' tensors, on the device
    packing: Packing | None  # LogProbEngine.packing(batch)
    trunk: torch.Tensor | None  # the trunk's output, packed [1, N, C] ([2B, T, C] when not packed; None: no trunk)

    def trunk_states(self) -> torch.Tensor | None:
        """[2B, T, C], as LogProbEngine.trunk_states gave it (packing it again gives `trunk` back exactly)."""
        if self.trunk is None or self.packing is None:
            return self.trunk
        return self.packing.unpack(self.trunk)


class HeldOutCache:
    """The part of a held-out evaluation that never changes, computed once.

    Built from a `LogProbEngine` with a reference and the held-out pairs, it runs, batch by
    batch, the frozen trunk (the embedding and blocks [0, K) shared by identity with the
    reference; none when K = 0) and the reference's tail and head, and keeps the trunk's output
    and the reference's log-probs.
    Each `evaluate` then runs only the policy's blocks [K, L), final norm and head (at response
    positions) from the kept states; and nothing at all while the policy still equals the
    reference (`LogProbEngine.policy_is_reference`, before the first step), whose log-probs are
    then the policy's. So at step 0 one tail runs, not two, and later evaluations call neither
    the reference nor the trunk.

    Exact: the same batches through the same code as `evaluate_pairs` with the same engine
    (only the trunk's output is kept in between), so the same numbers, in fp32 and under
    autocast (tests/test_evaluate.py).

    Memory (`nbytes`): the trunk's output is kept packed, as the tail reads it: [N, C] per
    batch, N its real tokens with each prompt counted once, in the dtype the trunk gives (fp32
    under autocast too: the residual stream stays fp32; a bf16 copy would change the numbers),
    on `device`. For 200 HH pairs at max length 512 and C = 576 (the default run's held-out
    set) that is about 110 MiB: 46,041 token states of 2.25 KiB, where the padded [2B, T, C]
    layout would take 372 MiB (at most 450 MiB). docs/benchmarks.md, section 6.

    In a torchrun job each rank keeps and runs every R-th batch and the ranks add up their columns
    (one small all-reduce), except under FSDP, where every rank runs every batch.

    `fits` says whether the cache still applies: the same list object with the same tokens,
    the same settings, and no frozen tensor modified in place since the build.

    Without a reference (a reference-free loss: no reference model exists), the "reference"
    columns are the STARTING model's, measured once here: by `start_model` when given (e.g. the
    starting weights loaded again to resume a run, then dropped), else by the policy itself,
    which must then not have trained yet (the trainer checks it).
    """

    def __init__(self, engine: LogProbEngine, pairs: list[TokenizedPair], *, pad_token_id: int,
                 reduction: str = "mean", batch_size: int = 8, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None, start_model: SmolLM | None = None):
        if not pairs:
            raise ValueError("HeldOutCache needs at least one pair")
        if engine.reference is not None and start_model is not None:
            raise ValueError("start_model is for an engine without a reference; this one has one")
        # whose log-probs are the "reference" column
        start_side = next(m for m in (engine.reference, start_model, engine.policy) if m is not None)
        self.engine, self.pairs = engine, pairs

        self.settings = dict(pad_token_id=pad_token_id, reduction=reduction, batch_size=batch_size,
                             device=torch.device(device), autocast_dtype=autocast_dtype)
        self.fingerprint = pairs_fingerprint(pairs)
        self.batches: list[_CachedBatch] = []
        # In a torchrun job each rank keeps and runs every R-th batch, and the log-probs are summed over
        # the ranks (each pair's column is one rank's). Not under FSDP, where every rank takes part in
        # every block's forward, so every rank runs every batch.
        d = distributed.current()
        self.split = d.enabled and not any(distributed.is_sharded(p) for p in engine.policy.parameters())
        starts = list(range(0, len(pairs), batch_size))
        reference = torch.zeros(2, len(pairs))  # chosen, rejected
        device = self.settings["device"]
        with torch.no_grad():
            for start in starts[d.rank::d.world_size] if self.split else starts:
                chunk = pairs[start:start + batch_size]
                batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id).items()}
                with autocast_context(device, autocast_dtype):
                    packing = engine.packing(batch)
                    trunk = engine.trunk_states(batch, packing)  # [2B, T, C], or None (no trunk)
                    ref = engine.tail_logps(start_side, batch, trunk, packing, reduction)
                kept = packing.pack(trunk) if packing is not None and trunk is not None else trunk  # [1, N, C]
                self.batches.append(_CachedBatch(start, batch, packing, kept))
                B = len(chunk)
                reference[:, start:start + B] = torch.stack([ref[:B], ref[B:]]).float().cpu()  # [2, B]
        self.reference_logps = self._gathered(reference)  # [2, N pairs]: chosen, rejected
        self._versions = self._frozen_versions()

    def bind(self, engine: LogProbEngine) -> "HeldOutCache":
        """This cache for another engine that starts from the same place: the very same reference
        model and, when a trunk is shared, the very same trunk tensors (e.g. the next run of a sweep,
        whose fresh policy shares the starting model's frozen trunk and uses it as the reference).
        The kept trunk states and reference log-probs are reused, so that engine's evaluations run
        only its own policy's tail. Raises ValueError when anything they rely on differs."""
        old = self.engine
        if engine.reference is None or engine.reference is not old.reference:
            raise ValueError("bind needs an engine with the very same reference model as the cache's")
        if engine.split != old.split:
            raise ValueError(f"the engines share different trunks ({engine.split} vs {old.split} blocks)")

        def trunk(e: LogProbEngine) -> list[torch.Tensor]:
            m = e.policy.model
            return [*m.embed_tokens.parameters(), *m.layers[:e.split].parameters()] if e.split else []

        if any(p is not q for p, q in zip(trunk(engine), trunk(old), strict=True)):
            raise ValueError("the engine's trunk is not the cache's trunk (the same tensors are needed)")
        bound = copy.copy(self)
        bound.engine = engine
        return bound

    def _frozen_versions(self) -> tuple[int, ...]:
        """In-place modification counters of the frozen tensors: the reference's (the shared trunk
        among them), or without a reference the policy's frozen ones."""
        model = self.engine.reference if self.engine.reference is not None else self.engine.policy
        return tuple(p._version for p in model.parameters() if not p.requires_grad)

    def _policy_is_start(self) -> bool:
        """Whether the policy's log-probs are the cached reference column's. Without a reference
        this is not checked (an in-place fused optimizer step need not bump a tensor's version,
        and a copy to compare with would cost memory): the policy's tail runs, once more than
        needed at step 0."""
        return self.engine.reference is not None and self.engine.policy_is_reference()

    @property
    def nbytes(self) -> int:
        """Bytes kept on the device: trunk states, the batches' tensors and their packings."""
        total = 0
        for b in self.batches:
            tensors = [*([b.trunk] if b.trunk is not None else []), *b.batch.values()]
            if b.packing is not None:
                p = b.packing
                tensors += [p.index, p.position_ids, p.gather, *(s.mask for s in p.segments if s.mask is not None)]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def fits(self, pairs: list[TokenizedPair], *, pad_token_id: int, reduction: str = "mean", batch_size: int = 8,
             device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> bool:
        """Whether this cache gives `evaluate_pairs`' numbers for these pairs and settings."""
        settings = dict(pad_token_id=pad_token_id, reduction=reduction, batch_size=batch_size,
                        device=torch.device(device), autocast_dtype=autocast_dtype)
        return (pairs is self.pairs and settings == self.settings and self._frozen_versions() == self._versions
                and pairs_fingerprint(pairs) == self.fingerprint)

    @torch.no_grad()
    def policy_logps(self) -> torch.Tensor:
        """The policy's log-probs [2, N pairs] (chosen, rejected): its tail from the kept states."""
        engine = self.engine
        if self._policy_is_start():
            return self.reference_logps
        policy, device = engine.policy, self.settings["device"]
        was_training = policy.training
        policy.eval()
        out = torch.zeros(2, len(self.pairs))  # chosen, rejected
        for b in self.batches:
            with autocast_context(device, self.settings["autocast_dtype"]):
                pol = engine.tail_logps(policy, b.batch, b.trunk_states(), b.packing, self.settings["reduction"])
            B = pol.shape[0] // 2
            out[:, b.start:b.start + B] = torch.stack([pol[:B], pol[B:]]).float().cpu()  # [2, B]
        policy.train(was_training)
        return self._gathered(out)

    def _gathered(self, columns: torch.Tensor) -> torch.Tensor:
        """[2, N pairs] with every rank's batches filled in (each rank filled only its own)."""
        return distributed.current().all_reduce(columns) if self.split else columns

    def evaluate(self, beta: float) -> EvalResult:
        """Reference and policy preference accuracy on the cached pairs, as `evaluate_pairs`."""
        return _result(torch.cat([self.policy_logps(), self.reference_logps]), beta)
