"""`python -m dpo.inspect`: preference pairs as the trainer sees them, token by token.

Most DPO bugs are in the data, and they are invisible in the text: a chat template applied twice,
a doubled BOS or EOS, a prompt taken from the wrong turn, truncation that empties a side. This
command takes the same flags as `python -m dpo.train` (paste a training command and change
`dpo.train` into `dpo.inspect`) and goes through the very same path:

    load --data -> shuffle by --seed -> NLTK filter -> hold out --eval-pairs -> chat template
    (dpo.cli.load_and_split)  ->  tokenize and truncate (dpo.tokenization.tokenize_pairs with
    dpo.train.tokenize_settings)

then shows, for --num pairs from --start of the training or the held-out pairs (--split):

* the rendered prompt (what the chat template made of it);
* the prompt's tokens and each answer's tokens, one at a time as `id piece`, each piece decoded
  alone (byte-level pieces as their bytes: half a UTF-8 character shows as \\xe2), with special
  tokens in brackets (⟨|im_start|⟩) and whitespace made visible (· space, ↵ newline, → tab);
* where the prompt ends and the answer starts, which positions the loss counts (response
  tokens; position 0 never) and which it masks (the prompt);
* what happened to the pair: truncated prompt or answer, a dropped pair (a side with no counted
  token left), the boundary fallback (dpo.tokenization), and warnings for the usual mistakes
  (two BOS in a row, EOS inside an answer or twice at its end, special tokens in the data that the
  template renders again, a turn opening repeated in the prompt, special tokens inside an answer);

and at the end the counts over every pair of the split: truncated prompts and answers, pairs that
lost a side, fallbacks, and each warning. Nothing is trained and no model weights are read: only
the tokenizer (--tokenizer, or --model's own).
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

from .config import ConfigError, TrainConfig, build_parser, config_from_args

VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}
WARNINGS = ("two BOS in a row", "EOS twice at the end of an answer", "EOS inside an answer",
            "special tokens inside an answer", "special tokens in the data, rendered again by the template",
            "the prompt's first turn repeated")
SEPARATOR = " │ "


# ----------------------------------------------------------------------- tokens made visible
@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token is written
    with -> the byte it stands for (printable bytes stand for themselves, the rest are shifted
    to 256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = list(printable), 0
    byte_values = list(printable)
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(byte_values, chars)}


def special_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's special tokens (added tokens marked special, BOS, EOS, pad)."""
    ids = {i for i, t in (getattr(tokenizer, "get_added_tokens_decoder", dict)() or {}).items()
           if getattr(t, "special", False)}
    ids |= {getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    return ids


def visible(text: str) -> str:
    """Whitespace and control characters as visible marks (· ↵ → ␍, other controls as \\uXXXX)."""
    out = []
    for ch in text:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def bracketed(content: str) -> str:
    """A special token's text in brackets that no ordinary text uses: <|im_start|> -> ⟨|im_start|⟩."""
    inner = content[1:-1] if content.startswith("<") and content.endswith(">") else content
    return f"⟨{inner}⟩"


class TokenView:
    """How one tokenizer's tokens look one at a time: `piece(id)`."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        decoder = getattr(tokenizer, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"

    def piece(self, token_id: int) -> str:
        token = self.tokenizer.id_to_token(token_id)
        if token_id in self.special:
            return bracketed(token or f"<{token_id}>")
        if token is None:
            return f"⟨unknown {token_id}⟩"
        if self.byte_level and all(c in _byte_decoder() for c in token):
            raw = bytes(_byte_decoder()[c] for c in token)
            text = raw.decode("utf-8", errors="backslashreplace")  # half a character: \xe2
        else:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return visible(text)

    def cells(self, ids: Sequence[int]) -> list[str]:
        return [f"{i} {self.piece(i)}" for i in ids]

    def text(self, text: str) -> str:
        """A text with its special tokens bracketed and its line ends marked (kept as line breaks)."""
        for token_id in sorted(self.special):
            content = self.tokenizer.id_to_token(token_id)
            if content:
                text = text.replace(content, bracketed(content))
        lines = text.split("\n")
        return "\n".join(visible(line) + ("↵" if k < len(lines) - 1 else "") for k, line in enumerate(lines))


def wrap_cells(cells: list[str], start: int, width: int, indent: int = 7) -> list[str]:
    """Token cells laid out in lines of at most `width` characters, each line led by the position
    of its first token."""
    lines, line, first = [], [], start
    room = max(width - indent, 20)
    used = 0
    for k, cell in enumerate(cells):
        extra = len(cell) + (len(SEPARATOR) if line else 0)
        if line and used + extra > room:
            lines.append(f"{first:>{indent - 2}}  " + SEPARATOR.join(line))
            line, used, first = [], 0, start + k
            extra = len(cell)
        line.append(cell)
        used += extra
    if line:
        lines.append(f"{first:>{indent - 2}}  " + SEPARATOR.join(line))
    return lines


# ----------------------------------------------------------------------- what is wrong with a pair
def check_pair(pair: Any, tokenized: Any, tokenizer: Any, view: TokenView, templated: bool
               ) -> list[tuple[str, str]]:
    """(kind, message) of each usual data mistake found in what the trainer sees (`tokenized`: a
    TokenizedPair, or the untruncated one of a dropped pair). The kinds are WARNINGS."""
    found: list[tuple[str, str]] = []
    bos, eos = getattr(tokenizer, "bos_token_id", None), tokenizer.eos_token_id
    n = tokenized.prompt_len
    prompt = tokenized.chosen_ids[:n]
    for name, ids in (("chosen", tokenized.chosen_ids), ("rejected", tokenized.rejected_ids)):
        if bos is not None and any(a == b == bos for a, b in zip(ids, ids[1:])):
            found.append((WARNINGS[0], f"two BOS tokens {view.piece(bos)} in a row ({name})"))
        response = ids[n:]
        if len(response) >= 2 and response[-1] == response[-2] == eos:
            found.append((WARNINGS[1], f"the {name} answer ends with EOS {view.piece(eos)} twice: the data already "
                                       "ends with it, and tokenization appends another"))
        elif eos in response[:-1]:
            found.append((WARNINGS[2], f"EOS {view.piece(eos)} inside the {name} answer, before its end"))
        inner = sorted({t for t in response[:-1] if t in view.special and t != eos})
        if inner:
            found.append((WARNINGS[3], f"special tokens inside the {name} answer "
                                       f"({', '.join(view.piece(t) for t in inner)}): a later turn in the answer?"))
    if templated:
        texts = [m.get("content", "") for k in ("prompt_messages", "chosen_messages", "rejected_messages")
                 for m in getattr(pair, k, None) or ()]
        inside = sorted({view.piece(t) for t in view.special for text in texts
                         if (c := tokenizer.id_to_token(t)) and c in text})
        if inside:
            found.append((WARNINGS[4], f"the data already holds special tokens ({', '.join(inside)}) and the chat "
                                       "template renders it again: a template applied twice? (--chat-template none "
                                       "takes rendered text as it is)"))
    if not tokenized.prompt_truncated and prompt and prompt[0] in view.special:
        # the first turn: from the first token to the next special token (ChatML: the system turn)
        end = next((k for k in range(1, len(prompt)) if prompt[k] in view.special), len(prompt))
        turn = prompt[:end + 1]
        times = sum(prompt[k:k + len(turn)] == turn for k in range(len(prompt)))
        if len(turn) >= 3 and times > 1:
            found.append((WARNINGS[5], f"the prompt's first turn ({''.join(view.piece(t) for t in turn[:8])}"
                                       f"{'…' if len(turn) > 8 else ''}) appears {times} times: a template "
                                       "applied twice?"))
    return found


@dataclass
class Inspected:
    """One pair of the split: its rendered text, what the trainer gets (None: dropped), and notes."""

    position: int  # in the split's list (the `index` of its TokenizedPair)
    pair: Any  # the PreferencePair after the chat template
    tokenized: Any  # TokenizedPair, or None when dropped
    full: Any  # the same pair tokenized without truncation (its original lengths)
    used: bool  # trained on (train: among the first --num-pairs kept) / evaluated on
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (kind, message), from check_pair

    @property
    def problems(self) -> bool:
        t = self.tokenized
        return (t is None or t.prompt_truncated or t.response_truncated or t.boundary_fallbacks > 0
                or bool(self.warnings))


@dataclass
class Split:
    name: str  # "train" or "held-out"
    pairs: list[Inspected]
    stats: Any  # TokenizeStats of the split, as dpo.train logs it
    used: int


def inspect_split(config: TrainConfig, tokenizer, raw: list, name: str, templated: bool) -> Split:
    """Tokenize `raw` (one split from dpo.cli.load_and_split) as dpo.train does, and look at every pair."""
    from .tokenization import tokenize_pairs
    from .train import as_trained, tokenize_settings

    settings = tokenize_settings(config, tokenizer)
    kept, stats = tokenize_pairs(tokenizer, raw, **settings)
    # the masks the loss reads (by default each rejected end-of-turn is masked; --rejected-end-of-turn counts it)
    if name == "train":
        kept = as_trained(config, kept, tokenizer.eos_token_id)
    untruncated, _ = tokenize_pairs(tokenizer, raw, **{**settings, "max_length": 2**62, "max_prompt_length": None})
    by_index = {p.index: p for p in kept}
    full = {p.index: p for p in untruncated}
    used = {p.index for p in (kept[:config.num_pairs] if name == "train" else kept)}
    view = TokenView(tokenizer)
    pairs = []
    for k, pair in enumerate(raw):
        shown = by_index.get(k) or full.get(k)
        warnings = check_pair(pair, shown, tokenizer, view, templated) if shown is not None else []
        pairs.append(Inspected(k, pair, by_index.get(k), full.get(k), k in used, warnings))
    return Split(name, pairs, stats, len(used))


# ----------------------------------------------------------------------- the report
def side_lines(view: TokenView, name: str, ids: list[int], mask: list[int], prompt_len: int, full_len: int | None,
               eos: int, truncated: bool, width: int) -> list[str]:
    response = ids[prompt_len:]
    counted = [t for t in range(max(prompt_len, 1), len(ids)) if mask[t]]
    wrong = [t for t in range(len(ids)) if mask[t] != (t >= prompt_len)]
    if not response:
        head = f"{name}: no answer token left"
    else:
        span = f"positions {prompt_len}-{len(ids) - 1}"
        ending = ("cut by --max-length: no EOS, the answer stops mid-way" if truncated
                  else f"ends with EOS {view.piece(eos)}, appended by tokenization")
        head = (f"{name}: {len(response)} answer tokens ({span}); the loss counts {len(counted)} of them"
                f"{' (position 0 is predicted by nothing)' if prompt_len == 0 else ''}; {ending}")
        if full_len is not None and full_len > len(response):
            head += f" (was {full_len} tokens)"
    lines = [head]
    if wrong:
        lines.append(f"  !! the response mask disagrees with the boundary at positions {wrong[:10]}")
    return lines + wrap_cells(view.cells(response), prompt_len, width)


def pair_report(item: Inspected, split: str, view: TokenView, config: TrainConfig, tokenizer, width: int) -> list[str]:
    t, p = item.tokenized, item.pair
    source = getattr(p, "source", "") or "?"
    status = ("dropped: a side kept no counted answer token" if t is None else
              "trained on" if item.used and split == "train" else
              "evaluated on" if item.used else "not used (beyond --num-pairs)")
    title = f"━━ {split} pair {item.position} · {source} · {status} "
    lines = [title + "━" * max(0, width - len(title))]
    lines.append("rendered prompt:")
    lines += ["  " + line for line in view.text(p.prompt).splitlines() or [""]]
    shown = t if t is not None else item.full
    if shown is None:  # not even untruncated: an empty answer text
        lines.append("  (an answer is empty: nothing to tokenize)")
        return lines
    n = shown.prompt_len
    full_prompt = item.full.prompt_len if item.full is not None else n
    cut = f"; cut from the left to fit --max-length {config.max_length} (was {full_prompt})" if n < full_prompt else ""
    lines.append(f"prompt: {n} tokens (positions 0-{n - 1}), masked: the loss does not count them{cut}"
                 if n else f"prompt: no token left{cut}")
    lines += wrap_cells(view.cells(shown.chosen_ids[:n]), 0, width)
    eos = tokenizer.eos_token_id
    for name in ("chosen", "rejected"):
        ids, mask = getattr(shown, f"{name}_ids"), getattr(shown, f"{name}_mask")
        full_len = len(getattr(item.full, f"{name}_ids")) - item.full.prompt_len if item.full is not None else None
        truncated = ids[-1] != eos or (full_len is not None and len(ids) - n < full_len)
        lines += side_lines(view, name, ids, mask, n, full_len, eos, truncated, width)
    if t is None:
        lines.append(f"note: shown untruncated; cut to --max-length {config.max_length}, a side keeps no counted "
                     "answer token, so the pair is dropped")
    if shown.boundary_fallbacks:
        lines.append(f"note: {shown.boundary_fallbacks} side(s) did not tokenize with the prompt's tokens as a "
                     "prefix; prompt and answer were encoded apart and joined (the mask stays exact; dpo.tokenization)")
    return lines + [f"warning: {message}" for _, message in item.warnings]


def summary_lines(split: Split, config: TrainConfig, templated: bool) -> list[str]:
    s = split.stats
    counts = {kind: sum(any(k == kind for k, _ in i.warnings) for i in split.pairs) for kind in WARNINGS}
    kept = [i.tokenized for i in split.pairs if i.tokenized is not None]
    lines = [f"{split.name}: {s.total} pairs rendered, {s.kept} kept, {split.used} "
             f"{'trained on (--num-pairs ' + str(config.num_pairs) + ')' if split.name == 'train' else 'evaluated on'}",
             f"  truncated prompts: {s.prompt_truncated}; pairs with a truncated answer: {s.response_truncated} "
             f"(--max-length {config.max_length}"
             + (f", --max-prompt-length {config.max_prompt_length}" if config.max_prompt_length else "") + ")",
             f"  pairs that lost a side (no counted answer token left, dropped): {s.dropped_no_response}",
             f"  boundary fallbacks (sides): {s.boundary_fallbacks}"]
    if kept:
        lengths = [p.length for p in kept]
        lines.append(f"  tokens per pair (longer side): mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}; "
                     f"prompts: mean {sum(p.prompt_len for p in kept) / len(kept):.0f}")
    lines.append("  pairs with a warning: " + (", ".join(f"{kind} {n}" for kind, n in counts.items() if n) or "none"))
    return lines


def markdown(lines: list[str]) -> list[str]:
    """The text report as Markdown: each pair's title a heading, its body a code block."""
    out, in_block = [], False
    for line in lines:
        if line.startswith("━━ ") or line.startswith("## "):
            if in_block:
                out.append("```")
                in_block = False
            out += ["", "## " + line.strip("━ ").replace(" ━", "") if line.startswith("━━ ") else line, ""]
            continue
        if not in_block:
            out.append("```text")
            in_block = True
        out.append(line)
    if in_block:
        out.append("```")
    return out


# ----------------------------------------------------------------------- the command
def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to show (dpo.inspect's own flags; the others are dpo.train's)")
    group.add_argument("--num", type=int, default=3, help="how many pairs to show (default: 3)")
    group.add_argument("--start", type=int, default=0, help="the first pair to show, by position (default: 0)")
    group.add_argument("--split", choices=["train", "held-out"], default="train",
                       help="the training pairs or the held-out (--eval-pairs) ones (default: train)")
    group.add_argument("--problems", action="store_true",
                       help="show only pairs that were truncated, dropped, fell back at the boundary or got a warning")
    group.add_argument("--format", choices=["text", "md"], default="text", help="plain text or Markdown (default: text)")
    group.add_argument("--width", type=int, default=None, help="line width (default: the terminal's)")


def report(config: TrainConfig, tokenizer, *, num: int = 3, start: int = 0, split: str = "train",
           problems: bool = False, width: int = 100) -> str:
    """The text report of dpo.inspect: `num` pairs of `split` from `start`, then the counts."""
    from . import cli

    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer defines no EOS token (set eos_token in tokenizer_config.json)")
    train_raw, eval_raw, _ = cli.load_and_split(config, tokenizer)
    templated = config.chat_template != "none" and getattr(tokenizer, "chat_template", None) is not None
    splits = {"train": inspect_split(config, tokenizer, train_raw, "train", templated),
              "held-out": inspect_split(config, tokenizer, eval_raw, "held-out", templated)}
    chosen = splits[split]
    items = [i for i in chosen.pairs[start:] if i.problems or not problems][:num]
    view = TokenView(tokenizer)
    template = ("the tokenizer's chat template" if templated else
                "none (--chat-template none)" if config.chat_template == "none" else
                "none (the tokenizer has no chat template)")
    lines = [f"{len(chosen.pairs)} {split} pairs; chat template: {template}",
             "legend: each token is `id piece`; ⟨…⟩ a special token, · space, ↵ newline, → tab, \\xNN a byte of a "
             "character split over tokens"]
    if not items:
        lines.append(f"(no {'problem ' if problems else ''}pair to show from position {start})")
    for item in items:
        lines += [""] + pair_report(item, split, view, config, tokenizer, width)
    lines += ["", "━━ counts " + "━" * max(0, width - 10)]
    for s in splits.values():
        lines += summary_lines(s, config, templated)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 with one line `error: ...` for a problem the user can fix."""
    from smollm import load_tokenizer

    from . import cli
    from .filtering import MissingNLTKDataError

    parser = build_parser("python -m dpo.inspect", __doc__, cls=TrainConfig)
    add_inspect_arguments(parser)
    args = parser.parse_args(argv)
    width = args.width or shutil.get_terminal_size((100, 24)).columns
    try:
        if args.num < 1 or args.start < 0 or width < 40:
            raise ConfigError("--num must be at least 1, --start at least 0 and --width at least 40")
        config = config_from_args(args, TrainConfig).check()
        tokenizer = load_tokenizer(config.tokenizer or config.model)
        text = report(config, tokenizer, num=args.num, start=args.start, split=args.split, problems=args.problems,
                      width=width)
    except cli.USER_ERRORS + (MissingNLTKDataError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = text.splitlines()
    print("\n".join(markdown(lines) if args.format == "md" else lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
