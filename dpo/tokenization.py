"""Turning (prompt, response) text into token ids and a response mask, and batching them.

The one thing that must be right here is the response mask: it marks exactly the
tokens whose log-probs the loss counts. Byte-level BPE can merge characters across the
prompt/response boundary ("Hello wor" + "ld" encodes as "Hello" " world", not
"Hello" " wor" "ld"), and then no token boundary sits where the text boundary is.
So we encode ``prompt + response`` once and check that the prompt's own encoding is
exactly a prefix of it. If it is, the remaining tokens decode to exactly the response.
If it is not, we fall back to ``prompt_ids + response_ids`` (the two encodings
concatenated): a slightly unnatural tokenization at the seam, but the mask is exact by
construction. Fallbacks are counted in ``TokenizeStats``. A response mask never covers
a prompt token.

Layout of one sequence (no special tokens are added except the final EOS):

    [ prompt tokens ........ | response tokens ..... EOS ]
      response_mask = 0        response_mask = 1

Truncation to ``max_length`` keeps the response and the latest part of the prompt:
  1. if ``max_prompt_length`` is given, the prompt keeps only its last
     ``max_prompt_length`` tokens (cut from the LEFT, so the latest turns survive);
  2. if prompt + the longer response still exceeds ``max_length``, the prompt is cut
     from the left just enough (possibly to nothing, when a response alone fills
     ``max_length``);
  3. each response is cut from the right to fit (it then loses its EOS).
For a DPO pair the prompt is encoded and truncated once and shared by both sides, so
chosen and rejected always see identical prompt tokens.

Dropped: a side with no counted response tokens. A token is counted when it is a
response token at position t >= 1 (the token at position 0 has nothing predicting
it). An empty response text is also dropped: its only target would be the EOS we
append ourselves, which says nothing about the human-written response.

Sequences hold plain Python ``list[int]`` (cheap to keep, pickle and measure);
``collate_pairs`` / ``collate_sequences`` turn a batch into int64 tensors.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from torch import Tensor


class _PairLike(Protocol):  # dpo.data.PreferencePair, or anything with these attributes
    prompt: str
    chosen: str
    rejected: str


@dataclass
class TokenizedSequence:
    """One prompt + response, for SFT or for one side of a pair.

    input_ids: prompt tokens then response tokens (EOS last unless truncated).
    response_mask: same length; 1 on response tokens (incl. EOS), 0 on prompt tokens.
    prompt_len: number of prompt tokens (after truncation); response starts there.
    """

    input_ids: list[int]
    response_mask: list[int]
    prompt_len: int
    boundary_fallback: bool = False  # the prefix check failed; separate encodings were joined
    prompt_truncated: bool = False
    response_truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizedPair:
    """A tokenized preference pair. Both sides start with the same ``prompt_len`` prompt tokens.

    index: position of the pair in the list given to ``tokenize_pairs`` (0 for ``tokenize_pair``).
    chosen_ids / rejected_ids: prompt + response (+ EOS) token ids, ``list[int]``.
    chosen_mask / rejected_mask: response masks, same lengths, 1 on response tokens.
    """

    index: int
    source: str
    chosen_ids: list[int]
    chosen_mask: list[int]
    rejected_ids: list[int]
    rejected_mask: list[int]
    prompt_len: int
    boundary_fallbacks: int = 0  # how many of the two sides needed the fallback (0, 1 or 2)
    prompt_truncated: bool = False
    response_truncated: bool = False  # at least one side was cut

    @property
    def length(self) -> int:
        """Length of the longer side: what this pair costs in a padded batch."""
        return max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizeStats:
    """Counts over all input pairs (dropped ones included, except ``kept``).

    boundary_fallbacks counts sequences (sides), so it can reach 2 * total.
    """

    total: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    boundary_fallbacks: int = 0

    @property
    def dropped_no_response(self) -> int:
        """Pairs dropped because a side kept no response token: every pair not kept."""
        return self.total - self.kept

    def record(self, kept: bool, fallbacks: int, prompt_cut: bool, response_cut: bool) -> None:
        """Count one tokenized pair or sequence."""
        self.total += 1
        self.kept += kept
        self.boundary_fallbacks += fallbacks
        self.prompt_truncated += prompt_cut
        self.response_truncated += response_cut

    def __str__(self) -> str:
        return (
            f"{self.kept}/{self.total} pairs kept, {self.dropped_no_response} dropped (no response token), "
            f"{self.prompt_truncated} prompt-truncated, {self.response_truncated} response-truncated, "
            f"{self.boundary_fallbacks} boundary fallbacks (sequences)"
        )


# ---------------------------------------------------------------------------------------
# the core, on token ids


def _check_args(max_length: int, eos_token_id: int, max_prompt_length: int | None) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(
            f"max_length must be an int >= 2 (one token to condition on, one to predict), got {max_length!r}"
        )
    if not isinstance(eos_token_id, int) or eos_token_id < 0:
        raise ValueError(f"eos_token_id must be a non-negative int, got {eos_token_id!r}")
    if max_prompt_length is not None and (not isinstance(max_prompt_length, int) or max_prompt_length < 1):
        raise ValueError(f"max_prompt_length must be None or an int >= 1, got {max_prompt_length!r}")


def _split_response(
    prompt_ids: list[int], joint_ids: list[int], response_ids: Callable[[], list[int]]
) -> tuple[list[int], bool]:
    """Response tokens of ``prompt + response``; falls back to the separate encoding.

    ``response_ids`` is called (lazily) only on fallback. Returns (ids, fell_back).
    """
    n = len(prompt_ids)
    if joint_ids[:n] == prompt_ids:
        return joint_ids[n:], False
    return list(response_ids()), True


def _truncate(
    prompt: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int | None
) -> tuple[list[int], list[list[int]], bool, bool]:
    """Apply the truncation rules of the module docstring. Returns (prompt, responses, prompt_cut, response_cut)."""
    n0 = len(prompt)
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]  # keep the latest tokens
    longest = max(len(r) for r in responses)
    overflow = len(prompt) + longest - max_length
    if overflow > 0:
        prompt = prompt[min(overflow, len(prompt)) :]
    room = max_length - len(prompt)
    cut = [r[:room] for r in responses]
    response_cut = any(len(c) < len(r) for c, r in zip(cut, responses))
    return prompt, cut, len(prompt) < n0, response_cut


def _has_counted_token(prompt_len: int, response_len: int, content_len: int) -> bool:
    """At least one response token at position t >= 1, and at least one text token (not only our EOS)."""
    if content_len == 0:
        return False
    return response_len - (1 if prompt_len == 0 else 0) >= 1


def _build(prompt: list[int], response: list[int]) -> tuple[list[int], list[int]]:
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def _pair_from_ids(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    *,
    fallbacks: int,
    index: int,
    source: str,
    max_length: int,
    eos_token_id: int,
    max_prompt_length: int | None,
    stats: TokenizeStats | None,
) -> TokenizedPair | None:
    """prompt/chosen/rejected ids (responses without EOS) -> a truncated pair, or None if dropped."""
    responses = [chosen_ids + [eos_token_id], rejected_ids + [eos_token_id]]
    prompt, (c, r), prompt_cut, response_cut = _truncate(prompt_ids, responses, max_length, max_prompt_length)
    # text tokens left on each side = what remains once our own EOS is discounted
    keep = all(
        _has_counted_token(len(prompt), len(side), min(len(side), len(orig)))
        for side, orig in ((c, chosen_ids), (r, rejected_ids))
    )
    if stats is not None:
        stats.record(keep, fallbacks, prompt_cut, response_cut)
    if not keep:
        return None
    c_ids, c_mask = _build(prompt, c)
    r_ids, r_mask = _build(prompt, r)
    return TokenizedPair(
        index=index,
        source=source,
        chosen_ids=c_ids,
        chosen_mask=c_mask,
        rejected_ids=r_ids,
        rejected_mask=r_mask,
        prompt_len=len(prompt),
        boundary_fallbacks=fallbacks,
        prompt_truncated=prompt_cut,
        response_truncated=response_cut,
    )


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------
# public API


def tokenize_prompt_response(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    max_length: int,
    eos_token_id: int,
    max_prompt_length: int | None = None,
    stats: TokenizeStats | None = None,
) -> TokenizedSequence | None:
    """Tokenize one prompt + response (+ EOS) with an exact response mask (for SFT).

    Args:
        tokenizer: a ``tokenizers.Tokenizer``; encoded with ``add_special_tokens=False``.
        max_length: total length cap (>= 2). Truncation rules: module docstring.
        eos_token_id: appended after the response (0 for SmolLM, ``<|endoftext|>``).
        max_prompt_length: optional cap on prompt tokens (cut from the left).
        stats: if given, updated in place (this call counts as one item of ``total``).

    Returns:
        a ``TokenizedSequence``, or None when no response token would be counted.
    """
    _check_args(max_length, eos_token_id, max_prompt_length)
    prompt_ids = _encode(tokenizer, prompt)
    joint = _encode(tokenizer, prompt + response)
    resp, fell_back = _split_response(prompt_ids, joint, lambda: _encode(tokenizer, response))
    p, (r,), prompt_cut, response_cut = _truncate(prompt_ids, [resp + [eos_token_id]], max_length, max_prompt_length)
    keep = _has_counted_token(len(p), len(r), min(len(r), len(resp)))
    if stats is not None:
        stats.record(keep, fell_back, prompt_cut, response_cut)
    if not keep:
        return None
    ids, mask = _build(p, r)
    return TokenizedSequence(ids, mask, len(p), fell_back, prompt_cut, response_cut)


def tokenize_pair(
    tokenizer: Any,
    pair: _PairLike,
    *,
    max_length: int,
    eos_token_id: int,
    max_prompt_length: int | None = None,
    index: int = 0,
    stats: TokenizeStats | None = None,
) -> TokenizedPair | None:
    """Tokenize one preference pair (``.prompt``, ``.chosen``, ``.rejected``, optional ``.source``).

    The prompt is encoded and truncated once and shared by both sides. Returns None
    (and counts it in ``stats`` if given) when a side has no counted response token.
    """
    _check_args(max_length, eos_token_id, max_prompt_length)
    prompt_ids = _encode(tokenizer, pair.prompt)
    sides, fallbacks = [], 0
    for response in (pair.chosen, pair.rejected):
        joint = _encode(tokenizer, pair.prompt + response)
        ids, fell_back = _split_response(prompt_ids, joint, lambda: _encode(tokenizer, response))
        sides.append(ids)
        fallbacks += fell_back
    return _pair_from_ids(
        prompt_ids,
        sides[0],
        sides[1],
        fallbacks=fallbacks,
        index=index,
        source=getattr(pair, "source", ""),
        max_length=max_length,
        eos_token_id=eos_token_id,
        max_prompt_length=max_prompt_length,
        stats=stats,
    )


def tokenize_pairs(
    tokenizer: Any,
    pairs: Sequence[_PairLike],
    *,
    max_length: int,
    eos_token_id: int,
    max_prompt_length: int | None = None,
    progress: bool = False,
    chunk_size: int = 1024,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize many pairs with ``tokenizer.encode_batch`` (parallel, in Rust).

    Same result as calling ``tokenize_pair`` on each pair, with ``index`` = position in
    ``pairs``. Dropped pairs are left out of the list and counted in the stats.
    """
    _check_args(max_length, eos_token_id, max_prompt_length)
    pairs = list(pairs)
    stats = TokenizeStats()
    out: list[TokenizedPair] = []
    starts: Iterable[int] = range(0, len(pairs), chunk_size)
    if progress:
        from tqdm.auto import tqdm  # lazy: only when asked for

        starts = tqdm(starts, desc="tokenizing pairs", unit="chunk")
    for s in starts:
        chunk = pairs[s : s + chunk_size]
        texts = [p.prompt for p in chunk]
        texts += [p.prompt + p.chosen for p in chunk]
        texts += [p.prompt + p.rejected for p in chunk]
        enc = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        n = len(chunk)
        for k, pair in enumerate(chunk):
            prompt_ids = enc[k]
            sides, fallbacks = [], 0
            for joint, response in ((enc[n + k], pair.chosen), (enc[2 * n + k], pair.rejected)):
                ids, fell_back = _split_response(prompt_ids, joint, lambda: _encode(tokenizer, response))
                sides.append(ids)
                fallbacks += fell_back
            tp = _pair_from_ids(
                prompt_ids,
                sides[0],
                sides[1],
                fallbacks=fallbacks,
                index=s + k,
                source=getattr(pair, "source", ""),
                max_length=max_length,
                eos_token_id=eos_token_id,
                max_prompt_length=max_prompt_length,
                stats=stats,
            )
            if tp is not None:
                out.append(tp)
    return out, stats


def without_end_of_turn(pair: TokenizedPair, eos_token_id: int, side: str = "rejected") -> TokenizedPair:
    """The pair with the end-of-turn token that closes `side`'s answer left out of its log-prob.

    Only the mask changes (the token stays in the sequence, as context for nothing), and only
    when that answer ends with `eos_token_id` (it was not cut) and keeps another counted token.
    Why: DPO lowers every token of a rejected answer, its end-of-turn included, so a policy trained
    on pairs whose rejected answer is the shorter one learns that ending a turn is what is wrong
    with an answer. Masked, the token teaches nothing either way (dpo.train's default;
    --rejected-end-of-turn counts it).
    """
    if side not in ("chosen", "rejected"):
        raise ValueError(f"side must be 'chosen' or 'rejected', got {side!r}")
    ids, mask = getattr(pair, f"{side}_ids"), getattr(pair, f"{side}_mask")
    counted = sum(mask[1:])
    if not ids or ids[-1] != eos_token_id or not mask[-1] or counted < 2 or len(ids) < 2:
        return pair
    return dataclasses.replace(pair, **{f"{side}_mask": mask[:-1] + [0]})


# ---------------------------------------------------------------------------------------
# batching


def _pad_right(rows: list[list[int]], value: int) -> Tensor:
    """list of B int lists -> [B, T_max] int64, right-padded with ``value``."""
    t = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), t), value, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out


def collate_pairs(batch: list[TokenizedPair], pad_token_id: int) -> dict[str, Tensor]:
    """Stack B pairs into one policy/reference forward pass of 2B rows.

    Returns int64 tensors, right-padded to the longest sequence in this batch:
        input_ids      [2B, T]: rows 0..B-1 chosen, rows B..2B-1 rejected (row i and B+i are one pair)
        attention_mask [2B, T]: 1 on real tokens, 0 on padding
        response_mask  [2B, T]: 1 on response tokens, 0 on prompt and padding
        pair_index     [B]:     ``TokenizedPair.index`` of each pair
    The pad id may equal EOS (SmolLM); use attention_mask/response_mask, never the id, to find padding.
    """
    if not batch:
        raise ValueError("collate_pairs needs at least one pair")
    ids = [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch]
    masks = [p.chosen_mask for p in batch] + [p.rejected_mask for p in batch]
    return {
        "input_ids": _pad_right(ids, pad_token_id),
        "attention_mask": _pad_right([[1] * len(r) for r in ids], 0),
        "response_mask": _pad_right(masks, 0),
        "pair_index": torch.tensor([p.index for p in batch], dtype=torch.int64),
    }


def collate_sequences(batch: list[TokenizedSequence], pad_token_id: int) -> dict[str, Tensor]:
    """Stack B sequences (SFT): input_ids, attention_mask, response_mask, each [B, T] int64, right-padded."""
    if not batch:
        raise ValueError("collate_sequences needs at least one sequence")
    ids = [s.input_ids for s in batch]
    return {
        "input_ids": _pad_right(ids, pad_token_id),
        "attention_mask": _pad_right([[1] * len(r) for r in ids], 0),
        "response_mask": _pad_right([s.response_mask for s in batch], 0),
    }


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, seed: int, mega_batches: int = 50
) -> list[int]:
    """A random order of ``range(len(lengths))`` whose consecutive batches have similar lengths.

    1. shuffle all indices (seeded);
    2. cut them into mega-chunks of ``mega_batches * batch_size`` and sort each chunk
       by length (longest first);
    3. cut each chunk into batches of ``batch_size`` and shuffle the order of all batches.

    So each batch holds neighbours in length (little padding) while which examples meet
    and the order of batches stay random. Deterministic in ``seed``; the result is a
    permutation, and taking it ``batch_size`` at a time gives the batches (only the last
    batch may be short).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mega_batches < 1:
        raise ValueError(f"mega_batches must be >= 1, got {mega_batches}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = mega_batches * batch_size
    batches: list[list[int]] = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s : s + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    # keep the one short batch (if any) last, so every other batch is full
    short = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    return [i for b in full + short for i in b]
