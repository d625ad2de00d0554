"""A model's own answers: generating them greedily in batches, and the statistics a reader sees in them.

Accuracy on preference pairs says nothing about what a policy now writes. Three things a reader
notices first, and that a DPO run can break while its accuracy rises:

* **does it end its turn?** An Instruct model ends an answer with its stop token
  (`<|im_end|>` for SmolLM2). A policy that never ends runs on to the token limit: on
  SmolLM2-135M-Instruct the old default went from 38% of answers ended to 0%.
* **does it loop?** `loops`: one word 4-gram occurs 3 or more times in the answer ("the game is
  played on a court ... the game is played on a court ..."). Words, not tokens, so the figure
  means the same for every tokenizer; lower-cased, punctuation dropped.
* **how long is it**, and is it empty or whitespace only (a collapsed policy's answer).

`greedy_answers` is the one generation path for health samples (`dpo.samples`) and for the judge
(`dpo.judge`): both models decode the same prompts the same way, so their figures compare.

Shapes: B prompts in a batch, T the longest prompt (left padding), N new tokens.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from typing import Iterator, Sequence

import torch

from smollm import SmolLM, generate
from smollm.generation import PromptPrefixes, StreamRecorder

from .precision import autocast_context

Answer = tuple[list[int], bool]  # (the answer's token ids without its stop token, ended at a stop token)

LOOP_NGRAM = 4  # words per n-gram in `loops`
LOOP_TIMES = 3  # occurrences of one n-gram that make an answer a loop


# --------------------------------------------------------------------------- generating


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put the models in eval mode without gradients; give each back its own mode afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def greedy_answers(model: SmolLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   stop_ids: Sequence[int], batch_size: int = 8, device: torch.device | str = "cpu",
                   autocast_dtype: torch.dtype | None = None, progress=None,
                   prefixes: PromptPrefixes | None = None) -> list[Answer]:
    """Greedy answers (ids without the stop token, ended?) for each prompt, in order.

    Prompts are batched longest first (little padding), left-padded, with an attention mask:
    every row's new tokens then sit in the same columns, and positions count from each row's
    first real token, so a row's answer equals the answer it gets alone. An answer that never
    produces a stop id ends at `max_new_tokens` (fewer when the model's context runs out) with
    ended False. `progress(n)` is called with the number of prompts each batch finished.
    prefixes: the prompt batches' first blocks, kept from an earlier call on the same prompts
    (`smollm.generation.PromptPrefixes`), or kept now for the next one.
    """
    return _greedy(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, batch_size=batch_size,
                   device=device, autocast_dtype=autocast_dtype, progress=progress, prefixes=prefixes)[0]


# What a model computed while answering, per layer K: the residual stream entering block K
# (`smollm.generation.StreamRecorder`) at every position of each prompt + answer[:-1], the positions
# whose next-token distributions score the answer: streams[K][i] is [len(prompt_i) + len(answer_i) - 1, C]
# (the prompt's length for an empty answer). Blocks [K, L) give those distributions again without
# blocks [0, K): `dpo.health` scores a model's own answers so, instead of running it over them again.
Streams = dict[int, list[torch.Tensor]]


def answers_with_streams(model: SmolLM, prompts: Sequence[Sequence[int]], layers: Sequence[int], *,
                         max_new_tokens: int, stop_ids: Sequence[int], batch_size: int = 8,
                         device: torch.device | str = "cpu",
                         autocast_dtype: torch.dtype | None = None,
                         prefixes: PromptPrefixes | None = None) -> tuple[list[Answer], Streams]:
    """`greedy_answers`, and the residual stream entering each block of `layers` (`Streams`) as
    the answers were computed."""
    return _greedy(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, batch_size=batch_size,
                   device=device, autocast_dtype=autocast_dtype, layers=layers, prefixes=prefixes)


def _greedy(model: SmolLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_ids: Sequence[int],
            batch_size: int, device: torch.device | str, autocast_dtype: torch.dtype | None, progress=None,
            layers: Sequence[int] = (), prefixes: PromptPrefixes | None = None) -> tuple[list[Answer], Streams | None]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens: nothing to answer")
    device = torch.device(device)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    stops = set(stop_ids)
    answers: list[Answer] = [([], False)] * len(prompts)
    streams: Streams | None = {k: [None] * len(prompts) for k in layers} if layers else None
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            T = max(len(prompts[i]) for i in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)  # [B, T]; the pad id is never attended to
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, i in enumerate(chunk):
                ids[b, T - len(prompts[i]):] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[b, T - len(prompts[i]):] = 1
            record = StreamRecorder(layers) if layers else None
            with autocast_context(device, autocast_dtype):
                out = generate(model, ids.to(device), max_new_tokens, eos_token_id=list(stop_ids),
                               attention_mask=mask.to(device), record=record, prefixes=prefixes)  # [B, T + N]
            for b, i in enumerate(chunk):
                new = out[b, T:].tolist()
                end = next((k for k, t in enumerate(new) if t in stops), None)
                answers[i] = (new, False) if end is None else (new[:end], True)
                if record is not None:  # row b's prompt sits in columns [T - len, T), its answer from T on
                    fed = T + max(len(answers[i][0]) - 1, 0)
                    for k in layers:
                        streams[k][i] = record.states[k][b, T - len(prompts[i]):fed].clone()  # [P + A - 1, C]
            if progress is not None:
                progress(len(chunk))
    return answers, streams


# --------------------------------------------------------------------------- measuring


def _is_blank(text: str) -> bool:
    return text.strip() == ""


_WORD = re.compile(r"\w+(?:'\w+)*")


def words(text: str) -> list[str]:
    """The answer's words, lower-cased, punctuation dropped ("I'm" stays one word)."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def loops(text: str, n: int = LOOP_NGRAM, times: int = LOOP_TIMES) -> bool:
    """Whether one word n-gram occurs at least `times` times in the text (overlaps count).

    "I'm a wizard, I'm a wizard, I'm a wizard, I'm a wizard" loops: the 4-gram
    ("i'm", "a", "wizard", "i'm") starts at words 0, 3 and 6. Three "I'm a wizard" do not (that
    4-gram occurs twice), and neither does a phrase said twice. A list whose items all start
    "you can use the ..." loops by this rule too: that is what a reader sees as formulaic.
    """
    w = words(text)
    if len(w) < n + times - 1:  # too few words for `times` occurrences of an n-gram
        return False
    counts = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    return counts.most_common(1)[0][1] >= times


def distinct_n(answers_ids: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct token n-grams / all token n-grams, pooled over the answers.

    n-grams never cross from one answer into the next. An answer shorter than n tokens has
    no n-gram and adds nothing to either count. When no answer has n tokens (all empty, or
    all single tokens for n = 2) the set has no variety to measure and the result is 0.0.
    """
    grams: list[tuple[int, ...]] = []
    for ids in answers_ids:
        ids = list(ids)
        grams += [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_stats(answers_ids: Sequence[Sequence[int]], answers_text: Sequence[str],
               ended: Sequence[bool] | None = None) -> dict[str, float]:
    """Statistics of a set of generated answers (one model's samples).

    answers_ids: per answer its generated token ids, without the stop token.
    answers_text: the same answers decoded (special tokens skipped).
    ended: per answer, whether it ended at a stop token (None: not known, no ended_share).
    Returns
        mean_length: mean number of tokens per answer;
        ended_share: share of answers that ended their turn (a stop token before the limit);
        loop_share: share of answers that loop (`loops`: a word 4-gram 3 or more times);
        empty_share: share of answers whose text is empty or whitespace only;
        distinct_2: distinct token bigrams / all token bigrams over the set (`distinct_n`).
    An empty set gives nan for each.
    """
    n = len(answers_ids)
    if len(answers_text) != n or (ended is not None and len(ended) != n):
        raise ValueError(f"{n} token lists but {len(answers_text)} texts"
                         + ("" if ended is None else f" and {len(ended)} ended flags"))
    keys = ["mean_length"] + (["ended_share"] if ended is not None else []) + [
        "loop_share", "empty_share", "distinct_2"]
    if n == 0:
        return {k: math.nan for k in keys}
    stats = {"mean_length": sum(len(a) for a in answers_ids) / n}
    if ended is not None:
        stats["ended_share"] = sum(map(bool, ended)) / n
    stats.update(loop_share=sum(map(loops, answers_text)) / n,
                 empty_share=sum(map(_is_blank, answers_text)) / n,
                 distinct_2=distinct_n(answers_ids, 2))
    return stats
