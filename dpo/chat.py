"""Chat formatting: HH-RLHF transcripts and TRL message lists rendered with a chat template.

HH-RLHF writes a conversation as plain text, one turn after another::

    "\\n\\nHuman: Hi!\\n\\nAssistant: Hello.\\n\\nHuman: Name a fruit.\\n\\nAssistant:"

An Instruct model was tuned on its own chat template instead. SmolLM-Instruct's is ChatML::

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant
    Hello.<|im_end|>
    <|im_start|>user
    Name a fruit.<|im_end|>
    <|im_start|>assistant

Training it on HH text teaches it a format it never answers in. So before tokenizing,
``apply_chat_format`` turns each pair into messages (``hh_to_messages``, or the messages a
TRL conversational row came with) and renders them with the tokenizer's template:

* prompt   = template(prompt messages, add_generation_prompt=True): everything up to
  and including the opening of the assistant's turn;
* response = template(prompt messages + [the answer]) minus the prompt, minus the
  template's end-of-turn at the end (the EOS token's text, ``<|im_end|>``, and the
  newline after it): ``dpo.tokenization`` appends the EOS id itself, so the model still
  learns to end its turn, with the same token the template uses.

The whole rendering must *start with* the prompt rendering, or there is no clean
prompt/response boundary (a template that rewrites earlier turns depending on what
follows, for example). Such pairs are skipped and counted in a ``ChatReport``, or raise
``DataError`` with ``strict=True``.

Everything here is a pure function of its inputs; nothing is cached or downloaded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from dpo.data import ASSISTANT, DataError, Message, PreferencePair, SkipCounts

# Why apply_chat_format can skip a pair; the keys of ChatReport.skipped, in this order.
CHAT_SKIP_REASONS = (
    "unparsable",  # the HH prompt is not a "\n\nHuman: ...\n\nAssistant:" transcript
    "template_error",  # the template refused the messages (e.g. "roles must alternate")
    "boundary",    # the rendering with the answer does not start with the prompt's rendering
    "empty",       # the answer renders to nothing once the end-of-turn is removed
)

_TURN_RE = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def hh_to_messages(prompt_text: str, source: str = "") -> list[Message]:
    """Split an HH prompt into chat messages.

    "\\n\\nHuman: Hi\\n\\nAssistant: Hello.\\n\\nHuman: Bye?\\n\\nAssistant:" ->
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Bye?"}]

    Every turn's text is stripped. The final, empty Assistant turn is the one to be
    answered, so it is not a message: a chat template's generation prompt opens it.
    Turns are kept as they are, so two Assistant turns in a row (HH-RLHF has a few)
    stay two assistant messages.

    source: where the prompt came from (a PreferencePair's ``source``, "file:line"); the
    error message starts with it.
    Raises DataError (reason "unparsable") when the text does not start with a Human
    turn or does not end with an empty Assistant turn.
    """
    where = source or None
    if not prompt_text.endswith(ASSISTANT):
        raise DataError(f"not an HH prompt: it must end with {ASSISTANT!r}, the turn to be answered; "
                        f"it ends with {prompt_text[-40:]!r}", reason="unparsable", path=where)
    parts = _TURN_RE.split(prompt_text[: -len(ASSISTANT)])
    # parts = [text before the first marker, role, text, role, text, ...]
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise DataError(f"not an HH prompt: it must start with '\\n\\nHuman:'; it starts with "
                        f"{prompt_text[:40]!r}", reason="unparsable", path=where)
    return [{"role": _ROLE[role], "content": text.strip()}
            for role, text in zip(parts[1::2], parts[2::2])]


@dataclass
class ChatReport(SkipCounts):
    """What apply_chat_format did: how many pairs rendered, which were skipped (reasons:
    CHAT_SKIP_REASONS) and why."""

    total: int = 0  # pairs given
    rendered: int = 0  # pairs returned
    # answers whose rendering did not end with the EOS text, so nothing was removed
    # (a template that ends turns with another token): counted, not skipped
    end_of_turn_kept: int = 0

    def __str__(self) -> str:
        lines = [f"rendered {self.rendered} of {self.total} pairs, skipped {self.total_skipped}"]
        lines += [f"  {r:<12}{self.skipped[r]:>6}" for r in CHAT_SKIP_REASONS if self.skipped.get(r)]
        if self.end_of_turn_kept:
            lines.append(f"  {self.end_of_turn_kept} answers did not end with the EOS text; kept as rendered")
        if self.examples:
            lines.append("  first skipped:")
            lines += [f"    {e[:200]}" for e in self.examples]
        return "\n".join(lines)


def pair_messages(pair: PreferencePair) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt messages, chosen messages, rejected messages) of a pair.

    A pair from a TRL conversational row carries its messages. An HH-text pair is parsed:
    the prompt with hh_to_messages, each answer as one assistant message, stripped.
    """
    if pair.prompt_messages is not None:
        return (list(pair.prompt_messages), list(pair.chosen_messages or ()),
                list(pair.rejected_messages or ()))
    return (hh_to_messages(pair.prompt, pair.source),
            [{"role": "assistant", "content": pair.chosen.strip()}],
            [{"role": "assistant", "content": pair.rejected.strip()}])


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool, source: str) -> str:
    """tokenizer.apply_chat_template, with the template's own refusals (raise_exception, as
    in templates that require user/assistant turns to alternate) and Jinja errors turned
    into a DataError for this pair."""
    from smollm.tokenizer import TokenizerError

    errors: tuple[type[Exception], ...] = (TokenizerError,)
    try:
        from jinja2 import TemplateError

        errors += (TemplateError,)
    except ImportError:
        pass
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except errors as e:
        raise DataError(f"the chat template failed: {e}", reason="template_error", path=source or None) from None


def _response(tokenizer: Any, prompt_text: str, messages: list[Message], answer: list[Message],
              end_of_turn: str, name: str, source: str) -> tuple[str, bool]:
    """(the answer's text as the template renders it after the prompt, without the
    end-of-turn; whether an end-of-turn was found and removed)."""
    full = _render(tokenizer, messages + answer, False, source)
    if not full.startswith(prompt_text):
        at = next((i for i, (a, b) in enumerate(zip(full, prompt_text)) if a != b), len(full))
        raise DataError(f"the chat template renders the prompt differently once the answer follows "
                        f"(from character {at}: {prompt_text[at:at + 40]!r} vs {full[at:at + 40]!r}), "
                        f"so there is no prompt/response boundary", reason="boundary",
                        path=source or None, field=name)
    response = full[len(prompt_text):]
    removed = False
    for suffix in (end_of_turn + "\n", end_of_turn):  # ChatML: "<|im_end|>" + "\n"
        if end_of_turn and response.endswith(suffix):
            response, removed = response[: -len(suffix)], True
            break
    if not response.strip():
        raise DataError("the answer renders to nothing", reason="empty", path=source or None, field=name)
    return response, removed


def apply_chat_format(pairs: Sequence[PreferencePair], tokenizer: Any, *, strict: bool = False
                      ) -> tuple[list[PreferencePair], ChatReport]:
    """Render each pair's prompt and answers with ``tokenizer``'s chat template.

    tokenizer: a ``smollm.tokenizer.SmolTokenizer`` (or anything with ``chat_template``,
        ``apply_chat_template(messages, add_generation_prompt=...) -> str`` and
        ``special_tokens["eos_token"]``) whose ``chat_template`` is not None.
    strict: raise DataError at the first pair that cannot be rendered, instead of
        skipping it and counting it in the report.

    Returns new PreferencePairs, in input order, whose prompt is the rendered prompt
    (ending with the opening of the assistant's turn) and whose chosen/rejected are the
    rendered answers without the end-of-turn (see the module docstring); ``source`` is
    kept, and so are the messages used, so rendering the result again changes nothing.
    """
    template = getattr(tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(f"{getattr(tokenizer, 'source', None) or 'this tokenizer'} has no chat template; "
                         f"train on the plain HH text instead")
    end_of_turn = (getattr(tokenizer, "special_tokens", None) or {}).get("eos_token") or ""
    report = ChatReport(total=len(pairs))
    out: list[PreferencePair] = []
    for pair in pairs:
        try:
            messages, chosen, rejected = pair_messages(pair)
            prompt_text = _render(tokenizer, messages, True, pair.source)
            chosen_text, removed_c = _response(tokenizer, prompt_text, messages, chosen, end_of_turn,
                                               "chosen", pair.source)
            rejected_text, removed_r = _response(tokenizer, prompt_text, messages, rejected, end_of_turn,
                                                 "rejected", pair.source)
        except DataError as e:
            if strict:
                raise
            report.add_skip(e)
            continue
        report.end_of_turn_kept += (not removed_c) + (not removed_r)
        out.append(PreferencePair(prompt_text, chosen_text, rejected_text, pair.source,
                                  prompt_messages=tuple(messages), chosen_messages=tuple(chosen),
                                  rejected_messages=tuple(rejected)))
    report.rendered = len(out)
    return out, report
