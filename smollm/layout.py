"""How the positions of one forward pass attend to each other: `Layout`, and `Packing`.

Attention needs to know, for each query position, which key positions it may see. Three
layouts cover every use of the model:

* **causal**: no padding and no cache: each row attends causally to itself, the fastest kernels;
* **masked**: a boolean mask [B, 1, T, S]: padded rows, or new positions after a KV cache;
* **packed**: the real tokens of several sequences laid one after another in a single row
  [1, N, C] (no padding computed at all), each sequence a `Segment` that attends causally to
  itself, and first to a prefix it shares with an earlier sequence when it has one.

`Packing` turns a padded batch [B, T] into the packed row and back. Every layer except
attention treats tokens one by one, so running only the real tokens changes no number; and a
position's hidden state depends only on the tokens up to it, so the leading tokens two rows
have in common (a prompt that two answers continue) can be computed once for both.

Shape legend: B rows, T padded length, S attended positions, N packed tokens, C hidden size,
H query heads, KV key/value heads, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)  # eq=False: never compare the mask tensors
class Layout:
    """Which key positions each query position attends to (see the module docstring).

    causal: `Layout()`. masked: `Layout(mask=...)`, a boolean [B, 1, T, S] (True: may
    attend). packed: `Layout(segments=...)`, x being [1, N, C].
    """
    mask: torch.Tensor | None = None
    segments: tuple["Segment", ...] | None = None
    # what every layer would otherwise derive from the mask again, made once per forward: the
    # boolean mask as SDPA's additive float mask (0 or -inf) per dtype (SDPA would convert a
    # boolean mask at every call), and the decoding step's key windows
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.mask is not None and self.segments is not None:
            raise ValueError("a Layout is masked or packed, not both")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               queries: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention q [B, H, T, D] over k, v [B, KV, S, D] -> [B, H, T, D].

        Grouped-query attention: each KV head serves H // KV query heads (enable_gqa: without
        copying k and v H // KV times). A masked decoding step (one query per row) attends per
        group of rows from the group's first visible key (`key_windows`), not over every padded one.

        queries [n]: q [1, H, n, D] holds only these positions (ascending) of a single row, and the
        output is theirs [1, H, n, D]; k and v hold every position's. (The last block computes its
        output only where it is read: `SmolLM.run_layers`'s keep.) Causal or packed layouts only.
        """
        if queries is not None:
            return self._attend_some(q, k, v, queries)
        if self.segments is not None:
            return torch.cat([_attend_segment(q, k, v, seg) for seg in self.segments], dim=2)
        if self.mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mask = self.additive_mask(q.dtype)  # [B, 1, T, S]
        if q.shape[2] > 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        # one query per row (a decoding step): each group of rows reads keys from its first visible one on
        windows = self.key_windows()
        if windows == ((0, q.shape[0], 0),):  # one group, every key: no slicing
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out = [F.scaled_dot_product_attention(q[a:b], k[a:b, :, first:], v[a:b, :, first:],
                                              attn_mask=mask[a:b, ..., first:], enable_gqa=True)
               for a, b, first in windows]  # [b - a, H, 1, D] each
        return out[0] if len(out) == 1 else torch.cat(out)

    def _attend_some(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """`attend` for the query positions `queries` [n] of one row: each segment's queries (or the
        row's, causal) with the rows of its mask that belong to them."""
        if q.shape[0] != 1 or self.mask is not None:
            raise ValueError("attention for some queries only takes one row, causal or packed")
        if self.segments is None:  # causal: query i sees keys 0..i
            mask = torch.arange(k.shape[2], device=q.device)[None, :] <= queries[:, None]  # [n, S]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        ends = torch.tensor([seg.start + seg.length for seg in self.segments], device=queries.device)
        cuts = [0, *torch.searchsorted(queries, ends).tolist()]  # queries [cuts[i], cuts[i+1]) are segment i's
        out = []
        for seg, a, b in zip(self.segments, cuts, cuts[1:]):
            if a == b:
                continue
            local = queries[a:b] - seg.start  # [n_i] positions within the segment
            keys, values = _segment_keys(k, v, seg)  # [1, KV, L + length, D] each
            if seg.prefix_length == 0:
                mask = torch.arange(seg.length, device=q.device)[None, :] <= local[:, None]  # [n_i, length]
            else:
                mask = seg.mask[local]  # [n_i, L + length]
            out.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=mask, enable_gqa=True))
        return torch.cat(out, dim=2)  # [1, H, n, D]

    def key_windows(self) -> tuple[tuple[int, int, int], ...]:
        """Groups of consecutive rows (a, b, first): rows [a, b) see no key before position `first`.

        A decoding step of a left-padded batch reads every row's cached keys and values over all
        S positions, though a short prompt's row sees only its last few: in a batch of 16 prompts of
        ~50 tokens and 16 of up to 512, most of what each step reads is masked away. Splitting the
        rows where that saves at least a quarter of the reading (and 1,024 row-positions), each
        group attends only from its own first visible key: the same softmax, since every key
        skipped is masked (-inf) for all of the group's queries. One group when nothing is saved.
        Made once per forward, from the mask.
        """
        if "windows" not in self._cache:
            visible = self.mask.any(dim=2).squeeze(1)  # [B, S]: keys some query of the row sees
            firsts = visible.float().argmax(-1).tolist()  # [B] each row's first visible key
            self._cache["windows"] = _split_rows(firsts, visible.shape[-1], 0, len(firsts))
        return self._cache["windows"]

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask [B, 1, T, S] as 0 where attending is allowed and -inf elsewhere, in `dtype`:
        what SDPA turns a boolean mask into at each call, made once and kept."""
        if dtype not in self._cache:
            self._cache[dtype] = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(
                ~self.mask, float("-inf"))
        return self._cache[dtype]


def _split_rows(firsts: list[int], S: int, a: int, b: int, depth: int = 2) -> tuple[tuple[int, int, int], ...]:
    """Rows [a, b) as up to 2**depth consecutive groups (a', b', first key of the group): split in
    two where it cuts the keys read, sum over rows of (S - the group's first key), by at least a
    quarter and 1,024 row-positions (each group is one more attention call)."""
    whole = (a, b, min(firsts[a:b]))
    cost = (b - a) * (S - whole[2])
    best, best_cost = None, cost
    prefix_min = []
    for i in range(a, b):
        prefix_min.append(min(prefix_min[-1], firsts[i]) if prefix_min else firsts[i])
    suffix_min = firsts[b - 1]
    for i in range(b - 1, a, -1):  # split before row i: [a, i) and [i, b)
        suffix_min = min(suffix_min, firsts[i])
        split_cost = (i - a) * (S - prefix_min[i - 1 - a]) + (b - i) * (S - suffix_min)
        if split_cost < best_cost:
            best, best_cost = i, split_cost
    if depth == 0 or best is None or cost - best_cost < max(cost / 4, 1024):
        return (whole,)
    return _split_rows(firsts, S, a, best, depth - 1) + _split_rows(firsts, S, best, b, depth - 1)


def _segment_keys(k: torch.Tensor, v: torch.Tensor, seg: "Segment") -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values one packed segment attends to, from the packed row's k, v [1, KV, N, D]:
    its shared prefix's L (none without a prefix), then its own n: [1, KV, L + n, D] each."""
    own = slice(seg.start, seg.start + seg.length)
    if seg.prefix_length == 0:
        return k[:, :, own], v[:, :, own]
    prefix = slice(seg.prefix_start, seg.prefix_start + seg.prefix_length)
    return torch.cat([k[:, :, prefix], k[:, :, own]], dim=2), torch.cat([v[:, :, prefix], v[:, :, own]], dim=2)


def _attend_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: "Segment") -> torch.Tensor:
    """Attention of one packed segment: q [1, H, N, D], k, v [1, KV, N, D] -> [1, H, n, D]."""
    queries = q[:, :, seg.start:seg.start + seg.length]  # [1, H, n, D]
    keys, values = _segment_keys(k, v, seg)  # [1, KV, L + n, D] each
    if seg.prefix_length == 0:
        return F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=seg.mask, enable_gqa=True)


@dataclass(frozen=True, eq=False)  # eq=False: never compare the mask tensors
class Segment:
    """One row's tokens in a packed row: packed positions [start, start + length).

    They attend causally to themselves and, before that, to all of `prefix_length` tokens at
    [prefix_start, prefix_start + prefix_length): the leading tokens this row shares with
    another row, computed once there. `mask` [length, prefix_length + length] is the boolean
    mask of that (None when there is no prefix: plain causal).
    """
    start: int
    length: int
    prefix_start: int = 0
    prefix_length: int = 0
    mask: torch.Tensor | None = None


class Packing:
    """Where the real tokens of a padded batch are, to run them as one row [1, N, ...].

    Each row's real tokens must be one contiguous run (right or left padding); `of` returns
    None otherwise. Rows are packed one after another, each one a `Segment`.

    Shared prefixes: for a pair of rows (a, b) given to `of`, the tokens b has in common with
    a from the start (e.g. a prompt that two answers continue, or the system prompt of a batch
    of chat prompts) are computed once, in a's segment; b's segment holds only its tokens after
    them and attends to a's copy of the prefix. Exact: a position's hidden state depends only on
    the tokens up to it, so the prefix's states are the same in both rows. `unpack` gives both
    rows their prefix states. Several rows may reuse one row's prefix (`common_prefixes`).
    """

    def __init__(self, index: torch.Tensor, position_ids: torch.Tensor, segments: list[Segment],
                 gather: torch.Tensor, shape: tuple[int, int]):
        self.index = index  # [N] flat indices into [B*T] of the packed tokens, in order
        self.position_ids = position_ids  # [1, N] each packed token's position in its own row
        self.segments = segments  # one per row with tokens of its own, covering [0, N) in order
        self.gather = gather  # [B*T] packed position of every (row, position); N for padding
        self.shape = shape  # (B, T)

    @classmethod
    def of(cls, attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
           shared_prefixes: list[tuple[int, int]] | None = None) -> "Packing | None":
        """The packing of a [B, T] mask; None when a row's real tokens are not contiguous.

        shared_prefixes: pairs of rows (a, b) whose common leading tokens (by `input_ids`) are
        computed once, in row a. A row b reuses at most one prefix, and a row a that lends its
        prefix (to one row or several) computes all of its own tokens.
        """
        device = attention_mask.device
        real = attention_mask.bool().cpu()  # [B, T]: index bookkeeping is done on the CPU
        B, T = real.shape
        counts = real.sum(-1)  # [B]
        first = real.long().argmax(-1)  # [B] first real position (0 for an empty row)
        inside = torch.arange(T)[None, :] - first[:, None]  # [B, T]
        if not bool((real == ((inside >= 0) & (inside < counts[:, None]))).all()):
            return None  # a row with a hole in it: keep the padded path
        counts, first = counts.tolist(), first.tolist()
        partner: dict[int, int] = {}  # row b -> row a whose prefix it reuses
        shared = [0] * B  # b's leading tokens equal to a's
        if shared_prefixes:
            if input_ids is None:
                raise ValueError("shared_prefixes needs input_ids, to find the common prefixes")
            ids = input_ids.cpu()
            lenders = {a for a, _ in shared_prefixes}
            for a, b in shared_prefixes:
                if not (0 <= a < B and 0 <= b < B) or a == b or b in partner or b in lenders:
                    raise ValueError(f"shared_prefixes: ({a}, {b}) must be two different rows of {B}; a row "
                                     "reuses at most one prefix, and a row that lends its prefix reuses none")
                n = min(counts[a], counts[b])
                differs = (ids[a, first[a]:first[a] + n] != ids[b, first[b]:first[b] + n]).nonzero()
                partner[b], shared[b] = a, int(differs[0]) if len(differs) else n
        # Order: first the rows that own all their tokens, then the rest of each row that
        # reuses a prefix (e.g. each first answer to a prompt whole, then what each second
        # answer adds to the prompt).
        start = [0] * B  # packed position of each owning row's first real token
        cursor = 0
        for r in range(B):
            if r not in partner:
                start[r], cursor = cursor, cursor + counts[r]
        own_start = {}  # packed position of the first token after a reusing row's shared prefix
        for r in sorted(partner):
            own_start[r], cursor = cursor, cursor + counts[r] - shared[r]
        # gather: [B, T] -> packed position; a row's j-th real token is at start + j, except the
        # second row of a pair, whose first `shared` tokens are its partner's.
        gather = torch.full((B, T), cursor, dtype=torch.long)  # padding -> N (a zero row)
        index = torch.empty(cursor, dtype=torch.long)
        positions = torch.empty(cursor, dtype=torch.long)  # positions count a row's real tokens
        segments = []
        for r in range(B):
            j = torch.arange(counts[r])  # [n] real token number
            if r in partner:
                a, L = partner[r], shared[r]
                gather[r, first[r]:first[r] + counts[r]] = torch.where(j < L, start[a] + j, own_start[r] + j - L)
                index[own_start[r]:own_start[r] + counts[r] - L] = r * T + first[r] + j[L:]
                positions[own_start[r]:own_start[r] + counts[r] - L] = j[L:]
                if counts[r] > L:
                    n = counts[r] - L  # query i (position L + i) sees prefix keys and own keys <= i
                    mask = torch.ones(n, L + n, dtype=torch.bool).tril(diagonal=L)
                    segments.append(Segment(own_start[r], n, start[a], L, mask.to(device) if L else None))
            else:
                gather[r, first[r]:first[r] + counts[r]] = start[r] + j
                index[start[r]:start[r] + counts[r]] = r * T + first[r] + j
                positions[start[r]:start[r] + counts[r]] = j
                if counts[r]:
                    segments.append(Segment(start[r], counts[r]))
        segments.sort(key=lambda seg: seg.start)
        return cls(index.to(device), positions[None].to(device), segments, gather.flatten().to(device), (B, T))

    @property
    def layout(self) -> "Layout":
        """The attention layout of the packed row."""
        return Layout(segments=tuple(self.segments))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [1, N, ...]: the packed positions, segment after segment."""
        if tuple(x.shape[:2]) != self.shape:
            raise ValueError(f"a Packing of shape {self.shape} cannot pack a tensor of shape {tuple(x.shape)}")
        return x.flatten(0, 1)[self.index].unsqueeze(0)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> [B, T, ...], zeros at padding positions; a shared prefix goes to both rows."""
        rows = torch.cat([x[0], x.new_zeros((1, *x.shape[2:]))])  # [N + 1, ...]: the last for padding
        return rows[self.gather].view(*self.shape, *x.shape[2:])


def common_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Pairs (a, b) for `Packing.of`'s shared_prefixes: each row b that begins with at least one
    of the same tokens as an earlier row, with the earlier row (one computing all its own tokens)
    it shares the most leading tokens with. A batch of chat prompts shares its system prompt; the
    rows are left- or right-padded [B, T], each row's real tokens one contiguous run.

    Exact for any pairs (see `Packing`); the work saved is the tokens shared. Made on the CPU:
    B x (rows lending) x T comparisons."""
    real = attention_mask.bool().cpu()  # [B, T]
    ids = input_ids.cpu()
    B, T = real.shape
    counts, first = real.sum(-1), real.long().argmax(-1)  # [B] each
    column = torch.arange(T)
    # each row's real tokens from column 0 on, -1 after them: [B, T]
    aligned = torch.where(column < counts[:, None], ids.gather(1, (first[:, None] + column).clamp(max=T - 1)), -1)
    lenders, pairs = [], []
    for b in range(B):
        if lenders:
            same = (aligned[lenders] == aligned[b]) & (aligned[b] >= 0)  # [lenders, T]
            shared = same.cumprod(-1).sum(-1)  # [lenders] leading tokens in common with row b
            best = int(shared.argmax())
            if int(shared[best]) > 0:
                pairs.append((lenders[best], b))
                continue
        lenders.append(b)
    return pairs
