"""Greedy answers of the policy and the reference to held-out prompts, side by side.

Accuracy on preference pairs says nothing about what the policy now writes; these samples
do. `generate_samples` answers each prompt with both models (greedy, batched with left
padding), `write_samples` writes them as `samples.md` (to read) and `samples.jsonl` (to
process), and `format_sample` is the few-line form a run prints.

An answer that is empty or only whitespace is invisible in print, and is exactly what a
collapsed policy produces, so every rendering here spells it out: `(empty)`, or
`(only whitespace: 128 × " ")`.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from smollm import SmolLM
from smollm.checkpoint import atomic_path

from .answers import Answer, eval_mode, greedy_answers

SAMPLES_MD = "samples.md"
SAMPLES_JSONL = "samples.jsonl"


@dataclass
class Sample:
    """One held-out prompt answered by both models.

    prompt: the prompt's text, special tokens kept (so ChatML turns stay visible).
    reference / policy: the answers' text, decoded with special tokens skipped.
    prompt_ids, reference_ids, policy_ids: the tokens; an answer's ids are what was
        generated, without the stop token that ended it.
    reference_stopped / policy_stopped: the answer ended at a stop id (True) or ran into
        the token limit (False).
    """

    prompt: str
    reference: str
    policy: str
    prompt_ids: list[int]
    reference_ids: list[int]
    policy_ids: list[int]
    reference_stopped: bool
    policy_stopped: bool


# --------------------------------------------------------------------------- generation


def generate_samples(policy: SmolLM, reference: SmolLM, tokenizer, prompt_ids: Sequence[Sequence[int]], *,
                     max_new_tokens: int = 128, stop_ids: Sequence[int], batch_size: int = 8,
                     device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
                     reference_answers: list[Answer] | None = None, same_weights: bool = False) -> list[Sample]:
    """Answer every prompt greedily with both models; returns one `Sample` per prompt, in order.

    prompt_ids: token lists, already in the run's format (a held-out pair's
        `chosen_ids[:prompt_len]`, rendered with the chat template when the run uses one).
    stop_ids: ids that end an answer, e.g. `tokenizer.stop_token_ids` plus EOS; an answer
        that never produces one stops at `max_new_tokens` (fewer when the model's context
        runs out) and has `stopped` False.
    Both models run in eval mode without gradients, and get their own modes back.

    Two shortcuts, for a caller that knows (`dpo.health.HealthProbe` does):
    reference_answers: the reference's answers to these prompts with these settings, from an
        earlier call (the reference never changes during a run), so only the policy runs.
    same_weights: the policy's weights equal the reference's (before the first step), so its
        greedy answers are the reference's and are not generated a second time.
    """
    kwargs = dict(max_new_tokens=max_new_tokens, stop_ids=stop_ids, batch_size=batch_size, device=device,
                  autocast_dtype=autocast_dtype)
    if reference_answers is not None and len(reference_answers) != len(prompt_ids):
        raise ValueError(f"reference_answers has {len(reference_answers)} answers for {len(prompt_ids)} prompts")
    with eval_mode(policy, reference):
        ref = reference_answers if reference_answers is not None else greedy_answers(reference, prompt_ids, **kwargs)
        pol = ref if same_weights else greedy_answers(policy, prompt_ids, **kwargs)
    return make_samples(tokenizer, prompt_ids, ref, pol)


def make_samples(tokenizer, prompt_ids: Sequence[Sequence[int]], reference_answers: Sequence[Answer],
                 policy_answers: Sequence[Answer]) -> list[Sample]:
    """One `Sample` per prompt from both models' answers (`dpo.answers.Answer`), texts decoded."""
    return [Sample(prompt=tokenizer.decode(list(p), skip_special_tokens=False),
                   reference=tokenizer.decode(r_ids, skip_special_tokens=True),
                   policy=tokenizer.decode(p_ids, skip_special_tokens=True),
                   prompt_ids=list(p), reference_ids=r_ids, policy_ids=p_ids,
                   reference_stopped=r_stop, policy_stopped=p_stop)
            for p, (r_ids, r_stop), (p_ids, p_stop) in zip(prompt_ids, reference_answers, policy_answers, strict=True)]


# --------------------------------------------------------------------------- rendering

_CHATML_USER = "<|im_start|>user\n"
_HH_HUMAN = re.compile(r"(?:^|\n\n)Human:")


def last_user_turn(prompt: str) -> str:
    """The last thing the user said: the last ChatML user message, or the last HH
    `Human:` turn; the whole prompt (stripped) when it is neither."""
    at = prompt.rfind(_CHATML_USER)
    if at >= 0:
        return prompt[at + len(_CHATML_USER):].split("<|im_end|>", 1)[0].strip()
    turns = list(_HH_HUMAN.finditer(prompt))
    if turns:
        return prompt[turns[-1].end():].split("\n\nAssistant:", 1)[0].strip()
    return prompt.strip()


def user_turns(prompt: str) -> int:
    """How many times the user speaks in a prompt: ChatML user messages, or else HH `Human:` turns."""
    chatml = prompt.count(_CHATML_USER)
    return chatml if chatml else len(_HH_HUMAN.findall(prompt))


def describe_blank(text: str) -> str | None:
    """`(empty)`, `(only whitespace: 128 × " ")` (characters by count, JSON-quoted), or None
    for text with something visible in it."""
    if text == "":
        return "(empty)"
    if text.strip() == "":
        counts = ", ".join(f"{n} × {json.dumps(ch)}" for ch, n in Counter(text).most_common())
        return f"(only whitespace: {counts})"
    return None


def _length_note(ids: list[int], stopped: bool) -> str:
    return f"{len(ids)} tokens, {'ended at a stop token' if stopped else 'hit the token limit'}"


def _fenced(text: str) -> str:
    """A fenced block that no run of backticks inside `text` can close."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _answer_md(name: str, text: str, ids: list[int], stopped: bool) -> str:
    head = f"**{name}** ({_length_note(ids, stopped)})"
    blank = describe_blank(text)
    if blank is not None:
        return f"{head}\n\n{blank}"
    body = _fenced(text)
    trailing = len(text) - len(text.rstrip())
    if trailing > 10:  # a long whitespace tail is invisible in the block
        body += f"\n\n(followed by {trailing} whitespace characters)"
    return f"{head}\n\n{body}"


def samples_markdown(samples: Sequence[Sample], header: str = "") -> str:
    """The side-by-side of `samples.md`: per prompt, its last user turn, then both answers."""
    parts = ["# Greedy answers to held-out prompts: reference vs policy"]
    if header:
        parts.append(header.strip())
    for k, s in enumerate(samples, 1):
        quoted = "\n".join(f"> {line}".rstrip() for line in (last_user_turn(s.prompt) or "(empty)").splitlines())
        parts += [f"## {k}", f"**Prompt** (last user turn, {len(s.prompt_ids)} prompt tokens)\n\n{quoted}",
                  _answer_md("Reference", s.reference, s.reference_ids, s.reference_stopped),
                  _answer_md("Policy", s.policy, s.policy_ids, s.policy_stopped)]
    return "\n\n".join(parts) + "\n"


def write_samples(samples: Sequence[Sample], out_dir: str | Path, *, header: str = "") -> tuple[Path, Path]:
    """Write `samples.md` (to read) and `samples.jsonl` (one `Sample` as JSON per line) into
    `out_dir`, each atomically. `header` (markdown) goes under the title, e.g. the run's
    step and health problems. Returns (md path, jsonl path)."""
    out = Path(out_dir)
    md, jsonl = out / SAMPLES_MD, out / SAMPLES_JSONL
    with atomic_path(md) as tmp:
        tmp.write_text(samples_markdown(samples, header), encoding="utf-8")
    with atomic_path(jsonl) as tmp:
        tmp.write_text("".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return md, jsonl


def _one_line(text: str, room: int) -> str:
    """Text on one line (whitespace runs collapsed), cut to `room` characters with "…"."""
    line = describe_blank(text) or " ".join(text.split())
    return line if len(line) <= room else line[:max(room - 1, 0)] + "…"


def format_sample(sample: Sample, width: int = 100) -> str:
    """Three lines of at most `width` characters: the last user turn and both answers, e.g.

        prompt:    How do I bake bread?
        reference: Mix flour, water, salt and yeast, knead, let it rise … [57 tok, stop]
        policy:    (only whitespace: 128 × " ") [128 tok, limit]
    """
    lines = [f"prompt:    {_one_line(last_user_turn(sample.prompt), width - 11)}"]
    for name, text, ids, stopped in (("reference", sample.reference, sample.reference_ids, sample.reference_stopped),
                                     ("policy", sample.policy, sample.policy_ids, sample.policy_stopped)):
        label = f"{name + ':':<11}"
        note = f" [{len(ids)} tok, {'stop' if stopped else 'limit'}]"
        lines.append(label + _one_line(text, width - len(label) - len(note)) + note)
    return "\n".join(lines)
