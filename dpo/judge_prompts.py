"""Which prompts a judge compares the models on: single-turn, and never trained on.

A judged win rate means something only on prompts the policy never saw in training, and it can
guide a choice of settings only if the prompts that settle the choice are not the prompts that
are reported ("never tune on the prompts you report"). So:

* the pool is every single-turn prompt of the run's data (one user message, as a reader would
  ask it), minus every prompt whose text appears as a user turn of any pair the run trained on
  (`trained_user_turns` replays the run's own load -> filter -> split to know them exactly);
* it is split for good into two halves by a hash of the text: **dev**, for choosing settings,
  and **test**, for the figures that are reported. A prompt is always in the same half, in
  every run and on every machine;
* within a half, prompts are taken in the order of the same hash, which is as good as a
  shuffle with a fixed seed and needs none.

A prompt file given by hand (`load_prompt_file`) is checked against a run the same way: a
training prompt in it is an error that names it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from .chat import hh_to_messages, pair_messages
from .data import DataError, PreferencePair

PROMPT_SETS = ("dev", "test")


def normalize(text: str) -> str:
    """The form in which two prompts count as the same: whitespace collapsed, case kept."""
    return " ".join(text.split())


def _digest(text: str) -> bytes:
    return hashlib.sha256(normalize(text).encode()).digest()


def prompt_set_of(text: str) -> str:
    """"dev" or "test": the half of the judge's prompts this text belongs to, fixed by its hash."""
    return PROMPT_SETS[_digest(text)[0] & 1]


def user_turns_of(pair: PreferencePair) -> list[str]:
    """The user messages of a pair's prompt (HH text or TRL messages), stripped."""
    try:
        messages = pair_messages(pair)[0]
    except DataError:  # not a parsable HH transcript: its whole prompt is the one "turn"
        return [pair.prompt.strip()]
    return [m["content"].strip() for m in messages if m.get("role") == "user"]


def single_turn_prompt(pair: PreferencePair) -> str | None:
    """The user's message when the pair's prompt is exactly one user message, else None."""
    if pair.prompt_messages is not None:
        messages = list(pair.prompt_messages)
    else:
        try:
            messages = hh_to_messages(pair.prompt, pair.source)
        except DataError:
            return None
    users = [m for m in messages if m.get("role") == "user"]
    if len(users) != 1 or any(m.get("role") == "assistant" for m in messages):
        return None
    return users[0]["content"].strip() or None


def select_prompts(pairs: Iterable[PreferencePair], exclude: set[str], prompt_set: str, n: int
                   ) -> tuple[list[str], dict[str, int]]:
    """Up to n single-turn prompts of `prompt_set` from `pairs`, none of whose normalized text is
    in `exclude`; returns (prompts, counts of the pool: single_turn, excluded, in_set)."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"prompt_set must be one of {PROMPT_SETS}, got {prompt_set!r}")
    seen: dict[str, str] = {}
    excluded = 0
    for pair in pairs:
        text = single_turn_prompt(pair)
        if text is None or normalize(text) in seen:
            continue
        if normalize(text) in exclude:
            excluded += 1
            continue
        seen[normalize(text)] = text
    in_set = [t for t in seen.values() if prompt_set_of(t) == prompt_set]
    in_set.sort(key=_digest)
    return in_set[:n], {"single_turn": len(seen) + excluded, "excluded": excluded, "in_set": len(in_set)}


def trained_user_turns(train_pairs: Sequence[PreferencePair]) -> set[str]:
    """The normalized text of every user turn of the pairs a run trained on."""
    return {normalize(t) for pair in train_pairs for t in user_turns_of(pair)}


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a file: .jsonl rows with "prompt" (a string, or a list of messages whose one
    user message is taken), or a .txt file with one prompt per line. Errors name the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read the prompt file: {e}", path=str(path)) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"not JSON: {e}", path=str(path), line=number) from None
        value = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(value, list):
            users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
            value = users[0] if len(users) == 1 else None
        if not isinstance(value, str) or not value.strip():
            raise DataError('expected {"prompt": "..."} (a non-empty string, or one user message)',
                            path=str(path), line=number, field="prompt")
        prompts.append(value.strip())
    if not prompts:
        raise DataError("the prompt file holds no prompt", path=str(path))
    return prompts


def write_prompt_file(prompts: Sequence[str], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts),
                          encoding="utf-8")
