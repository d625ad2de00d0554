"""What the frozen side of a training step computes, kept for the next time the same batch comes.

A sweep (notebooks/04_reflection_questions.ipynb: runs that differ in the loss, beta or learning
rate) trains every run on the same first batches of the same pairs, from the same starting model,
which is every run's reference. In each step, two things depend on nothing that trains: the frozen
trunk's output (blocks [0, K), which policy and reference share) and the reference's log-probs. A
later run would compute them again, to the bit. `FrozenMemo` keeps them: handed to each run's
`DPOTrainer` (`frozen_memo=`), it lets a repeated step run only the policy's tail, forward and
backward. That skips about 58% of the default step's arithmetic (the trunk's 25 blocks, the
reference's tail and head; docs/benchmarks.md, section 10).

Exact: what is kept is what the same code computed from the same inputs, so a run with the memo
gives the same losses and weights as without, to the bit (tests/test_engine.py).

The keys hold everything a kept tensor depends on: the batch's tokens and attention mask (the
trunk's output), and also its response mask, the reduction and the kernel the reference's tail
ran with (its log-probs), with the engine's trunk depth, its prefix sharing and the autocast
dtype. A memo belongs to one reference model: used with another, or once a tensor of its reference
has changed in place, it forgets everything first.

Memory: the trunk's output packed, [N, C] per batch (N its real tokens, each prompt once), about
4 MB a batch of 8 HH pairs at length 512 in fp32; the log-probs are nothing. Batches beyond
`max_bytes` (default 1 GiB) are not kept.
"""
from __future__ import annotations

import hashlib
import weakref

import torch

from smollm.layout import Packing

Batch = dict[str, torch.Tensor]


def _digest(*tensors: torch.Tensor) -> bytes:
    """A 16-byte hash of the tensors' shapes and values."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(repr((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


class FrozenMemo:
    """The trunk's output and the reference's log-probs of the batches seen, by batch (see the module).

    `LogProbEngine(..., memo=)` consults it in every paired step; `hits` and `misses` count its
    lookups (the trunk's and the reference's), `nbytes` what it keeps.
    """

    def __init__(self, max_bytes: int = 2**30):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._trunks: dict[tuple, torch.Tensor] = {}  # key -> the trunk's output, packed [1, N, C] or [R, T, C]
        self._references: dict[tuple, torch.Tensor] = {}  # key -> the reference's log-probs [R]
        self._owner: tuple | None = None  # (a weak reference to the reference model, its tensors' versions)
        self.nbytes = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._trunks.clear()
        self._references.clear()
        self._owner, self.nbytes = None, 0

    def bind(self, reference: torch.nn.Module) -> None:
        """Make sure what is kept is `reference`'s, with its tensors as they were: else forget it all."""
        versions = tuple(p._version for p in reference.parameters())
        if self._owner is None or self._owner[0]() is not reference or self._owner[1] != versions:
            self.clear()
            self._owner = (weakref.ref(reference), versions)

    @staticmethod
    def keys(batch: Batch, *, split: int, share_prefixes: bool, reduction: str, fast: bool) -> tuple[tuple, tuple]:
        """(the trunk's key, the reference's key) of a batch under the current autocast."""
        device = batch["input_ids"].device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        trunk = (_digest(batch["input_ids"], batch["attention_mask"]), split, share_prefixes, str(autocast))
        return trunk, (*trunk, _digest(batch["response_mask"]), reduction, fast)

    def trunk(self, key: tuple, packing: Packing | None) -> torch.Tensor | None:
        """The kept trunk output [R, T, C] of this batch, or None."""
        kept = self._trunks.get(key)
        self._count(kept)
        return kept if kept is None or packing is None else packing.unpack(kept)

    def keep_trunk(self, key: tuple, trunk: torch.Tensor, packing: Packing | None) -> None:
        kept = packing.pack(trunk) if packing is not None else trunk  # [1, N, C]: the real tokens only
        self._keep(self._trunks, key, kept)

    def reference(self, key: tuple) -> torch.Tensor | None:
        """The kept reference log-probs [R] of this batch, or None."""
        kept = self._references.get(key)
        self._count(kept)
        return kept

    def keep_reference(self, key: tuple, logps: torch.Tensor) -> None:
        self._keep(self._references, key, logps)

    def _count(self, kept) -> None:
        if kept is None:
            self.misses += 1
        else:
            self.hits += 1

    def _keep(self, store: dict, key: tuple, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if key not in store and self.nbytes + size <= self.max_bytes:
            store[key] = tensor.detach()
            self.nbytes += size
