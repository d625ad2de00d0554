"""Preference data: load (prompt, chosen, rejected) triples from files and hub datasets.

Anthropic's HH-RLHF rows are two whole transcripts that share every turn but the last::

    {"chosen":   "\\n\\nHuman: Hi?\\n\\nAssistant: Hello! How can I help?",
     "rejected": "\\n\\nHuman: Hi?\\n\\nAssistant: Go away."}

DPO needs them as one prompt and two responses. ``split_hh_transcript`` cuts both at the
last ``"\\n\\nAssistant:"``; the prompt keeps the marker and the response keeps its leading
space, so ``prompt + chosen`` is the original transcript byte for byte (the tokenizer sees
the same text either way).

What is accepted (``load_preferences``):

* files ``.jsonl``, ``.jsonl.gz``, ``.json`` (one JSON list, or JSON Lines), ``.parquet``
  (needs pyarrow, an optional dependency), a directory of such files (laid out like a hub
  dataset, it gives one split: see below), or a list of any of these;
* TRL's standard rows, strings: ``{"prompt", "chosen", "rejected"}`` (an explicit prompt;
  chosen/rejected are the responses; extra keys such as ``response`` or scores are ignored),
  or ``{"chosen", "rejected"}`` with the prompt implicit: HH-RLHF transcripts are cut at the
  last ``"\n\nAssistant:"`` (``split_hh_transcript``), other texts at the end of their
  common beginning, as trl.extract_prompt cuts them (``split_implicit_prompt``);
* TRL's conversational rows, where the fields are lists of ``{"role", "content"}``
  messages: ``{"prompt": [user, ...], "chosen": [assistant], "rejected": [assistant]}``,
  or, without ``prompt``, two whole conversations that share every message before the
  answers (the shared messages become the prompt; trl-lib/ultrafeedback_binarized). Such a
  pair keeps its messages (``prompt_messages``, ``chosen_messages``, ``rejected_messages``,
  for ``dpo.chat.apply_chat_format``) and also gets HH-style text fields, so that plain-text
  consumers (the NLTK filter, training without a chat template) see
  ``"\n\nHuman: ...\n\nAssistant:"`` and ``" answer"`` as for HH rows;
* hub dataset ids ``"<owner>/<name>"`` (``@<revision>`` after it pins a branch, tag or commit),
  such as ``"trl-lib/ultrafeedback_binarized"``: the files of ``split`` (and ``subset``), as
  its dataset card or its file names say (``dpo.hub_data``), downloaded with huggingface_hub
  into its cache (``smollm.sources.snapshot``; HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN apply);
  ``"<owner>/<name>/<subset>"`` and ``"<owner>/<name>/<path/to/one/file>"`` too.
  ``"Anthropic/hh-rlhf"`` alone is its helpful-base + harmless-base subsets. A name is a hub
  id only when no local path of that name exists. When it is neither cached nor
  downloadable, ``"Anthropic/hh-rlhf"`` falls back to the HH-RLHF test splits bundled with
  this package (``bundled_hh_files``), and the ``LoadReport`` says so
  (``offline_fallback=False`` turns this off).

A file whose first record has neither ``chosen`` nor ``rejected`` (a parquet file: whose
columns lack either) is in none of these formats: one ``DataError`` names the columns it has
and the ones it needs.

Two kinds of bad rows:

* **unusable** rows are well formed but carry no preference (UNUSABLE_REASONS: an empty
  answer, transcripts that differ before the last answer, chosen == rejected). Real
  HH-RLHF has some, so they are skipped and counted in the ``LoadReport`` by default;
  ``skip_unusable=False`` makes them errors.
* **malformed** rows (bad JSON or UTF-8, a missing field, a bad chat message, ...) raise
  ``DataError`` naming the file, line (``item`` for JSON lists, ``row`` for parquet) and
  field. With ``skip_bad_records=True`` they are skipped and counted too.

The reasons are the keys of ``SKIP_REASONS``. Problems with a whole input (a missing
path, an unsupported suffix, a corrupt gzip stream, a ``.json`` file that does not
parse) are always errors.

HH-RLHF edge cases, as found in the test splits (4,666 rows):

* 14 rows (helpful 9, harmless 5) whose transcripts diverge before the last Assistant
  turn: the two "prompts" differ, so the row is not one prompt with two answers.
  -> ``prompt_mismatch``.
* 8 rows (4 + 4) whose chosen or rejected final answer is empty (just ``" "``): there is
  nothing to prefer or to push down. -> ``empty``.
* 2 rows (helpful) whose chosen and rejected transcripts are identical: no preference.
  -> ``identical``.

So the real test splits load as 2,354 + 2,312 - 24 = 4,642 pairs, with the 24 skipped
rows counted in the report; with ``skip_unusable=False`` loading stops at the first one
(helpful-base line 121, an empty answer).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import random
import re
import warnings
import zlib
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

from . import hub_data

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
MAX_LINE_BYTES = 1_000_000  # default cap on one JSONL line (the longest real HH line is ~8 kB)
HH_REPO = "Anthropic/hh-rlhf"
HH_DEFAULT_SUBSETS = ("helpful-base", "harmless-base")
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")

# The HH-RLHF test splits ship inside the package (dpo/bundled/hh-rlhf, see its
# PROVENANCE.md): the tests read them, and "Anthropic/hh-rlhf" falls back to them offline.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_HH_DIR = BUNDLED_DIR / "hh-rlhf"
BUNDLED_HH = {  # path under BUNDLED_HH_DIR -> (size in bytes, sha256), from the upstream repos
    "helpful-base/test.jsonl.gz": (875_191, "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b"),
    "harmless-base/test.jsonl.gz": (742_801, "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"),
}
BUNDLED_HH_ROWS = 2354 + 2312  # rows in the two files; 4,642 of them are usable pairs
OFFLINE_FALLBACK_MESSAGE = (  # {reason}: "HF_HUB_OFFLINE=1", or "the hub (URL) cannot be reached (...)"
    "{reason}: using the HH-RLHF test splits bundled with dpo "
    "(helpful-base + harmless-base, {rows:,} pairs) instead of {repo} {split}")

CHAT_ROLES = ("system", "user", "assistant")  # roles accepted in conversational rows
HH_ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}  # HH-style text

# Why a record can be rejected; the keys of LoadReport.skipped, in this order.
SKIP_REASONS = (
    "line_too_long",      # a JSONL line above max_line_bytes (read in bounded chunks, never whole)
    "bad_utf8",           # the line is not valid UTF-8
    "bad_json",           # the line is not valid JSON
    "bad_shape",          # not an object, or a required field is missing
    "not_string",         # a field is neither a string nor a list of chat messages
    "bad_messages",       # a list of chat messages with a bad role or content, or mixed with strings
    "empty",              # prompt, chosen or rejected (response) is empty or whitespace only
    "no_assistant_turn",  # an HH transcript without "\n\nAssistant:"
    "prompt_mismatch",    # chosen and rejected transcripts differ before the last Assistant turn
    "identical",          # chosen == rejected: no preference to learn
)

# Well-formed rows that carry no usable preference. Real HH-RLHF has some (see above), so they
# are skipped and reported by default (skip_unusable=True) while malformed rows still raise.
UNUSABLE_REASONS = ("empty", "prompt_mismatch", "identical")

PathLike = Union[str, os.PathLike]


Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class PreferencePair:
    prompt: str  # "\n\nHuman: ...\n\nAssistant:" (HH style), shared by both responses
    chosen: str  # the preferred response, e.g. " Sure! ..." (leading space kept)
    rejected: str  # the dispreferred response
    source: str = ""  # where it came from, "helpful-base/test.jsonl.gz:17" (file + 1-based line)
    # Only for pairs from TRL's conversational rows (None otherwise): the messages that the
    # text fields above were rendered from, for dpo.chat.apply_chat_format. The prompt's
    # messages end where the answer starts; chosen/rejected hold assistant messages only.
    # Left out of the hash (dicts are unhashable), kept in ==.
    prompt_messages: tuple[Message, ...] | None = field(default=None, hash=False)
    chosen_messages: tuple[Message, ...] | None = field(default=None, hash=False)
    rejected_messages: tuple[Message, ...] | None = field(default=None, hash=False)


class DataError(ValueError):
    """Bad input data. The message names the file, the line (or item/row) and the field.

    ``reason`` is one of SKIP_REASONS for a bad record (skippable with
    skip_bad_records=True), or None for a problem with the input as a whole.
    """

    def __init__(self, detail: str, *, reason: str | None = None, path: str | None = None,
                 line: int | None = None, unit: str = "line", field: str | None = None):
        self.detail, self.reason, self.path, self.line, self.unit, self.field = (
            detail, reason, path, line, unit, field)
        parts = [str(path)] if path is not None else []
        if line is not None:
            parts.append(f"{unit} {line}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(": ".join(parts + [detail]))

    def located(self, path: str, line: int, unit: str = "line") -> "DataError":
        """The same error with the file and line filled in."""
        return DataError(self.detail, reason=self.reason, path=path, line=line, unit=unit,
                         field=self.field)


@dataclass
class SkipCounts:
    """Records skipped for a reason: how many per reason, and the first few messages."""

    skipped: Counter = field(default_factory=Counter)  # DataError.reason -> count
    examples: list[str] = field(default_factory=list)  # the first few "where: reason" messages
    max_examples: int = 10

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_skip(self, err: DataError) -> None:
        self.skipped[err.reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{err.reason}: {err}")


@dataclass
class LoadReport(SkipCounts):
    """What load_preferences_with_report read, and what it skipped (reasons: SKIP_REASONS) and why."""

    files: list[str] = field(default_factory=list)  # the files read, in order
    # set when "Anthropic/hh-rlhf" could not be downloaded and the bundled test splits were
    # read instead: the one-line message to show the user (OFFLINE_FALLBACK_MESSAGE)
    fallback: str | None = None
    loaded: int = 0  # pairs returned

    def __str__(self) -> str:
        # (the fallback line is not part of it: callers print report.fallback on its own)
        lines = [f"loaded {self.loaded} pairs from {len(self.files)} file(s), "
                 f"skipped {self.total_skipped}"]
        for reason in SKIP_REASONS:
            if self.skipped.get(reason):
                lines.append(f"  {reason:<18} {self.skipped[reason]:>6}")
        if self.examples:
            lines.append("  first skipped:")
            lines += [f"    {e[:200]}" for e in self.examples]
        return "\n".join(lines)


# ---------------------------------------------------------------------------- HH transcripts

def split_hh_transcript(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH transcripts into (prompt, chosen_response, rejected_response).

    The prompt is everything up to and including the last "\\n\\nAssistant:"; both
    transcripts must share it exactly. ``prompt + chosen_response == chosen``.
    Raises DataError (reason ``no_assistant_turn`` or ``prompt_mismatch``, no location).
    """
    prompts = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(f"no {ASSISTANT!r} turn in the transcript", reason="no_assistant_turn",
                            field=name)
        prompts.append(text[: cut + len(ASSISTANT)])
    prompt = prompts[0]
    if prompts[1] != prompt:
        at = len(os.path.commonprefix(prompts))
        raise DataError(
            f"chosen and rejected transcripts differ before the last Assistant turn "
            f"(at character {at}: {chosen[at:at + 40]!r} vs {rejected[at:at + 40]!r})",
            reason="prompt_mismatch")
    chosen_response, rejected_response = chosen[len(prompt):], rejected[len(prompt):]
    assert prompt + chosen_response == chosen and prompt + rejected_response == rejected
    return prompt, chosen_response, rejected_response


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit prompt of two plain texts: (prompt, chosen_response, rejected_response).

    The prompt is the longest common prefix of the two, less a final space, which goes to the
    answers (as in trl.extract_prompt): "The sky is blue." / "The sky is green." ->
    ("The sky is", " blue.", " green."). Raises DataError (reason ``prompt_mismatch``) when
    they share no prefix, or ``empty`` when one text is all prompt.
    """
    cut = len(os.path.commonprefix([chosen, rejected]))
    if 0 < cut < min(len(chosen), len(rejected)) and chosen[cut - 1] == " ":
        cut -= 1
    if not chosen[:cut].strip():
        raise DataError("chosen and rejected share no prompt (no common beginning): TRL's implicit-prompt "
                        "format needs both to start with the same prompt", reason="prompt_mismatch")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[cut:].strip():
            raise DataError("no answer after the prompt it shares with the other side", reason="empty", field=name)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _pair_from_row(row: object, source: str) -> PreferencePair:
    """One JSON object -> PreferencePair, or DataError (with reason and field, no location)."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", reason="bad_shape")
    needed = ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected")
    missing = [k for k in needed if k not in row]
    if missing:
        raise DataError(
            f"missing field(s) {', '.join(map(repr, missing))}; expected {{chosen, rejected}} "
            f"HH transcripts or {{prompt, chosen, rejected}}, got keys {sorted(row)[:10]}",
            reason="bad_shape", field=missing[0])
    for k in needed:
        if not isinstance(row[k], (str, list)):
            raise DataError(f"expected a string (or a list of chat messages), got "
                            f"{type(row[k]).__name__}", reason="not_string", field=k)
    if any(isinstance(row[k], list) for k in needed):
        return _pair_from_messages(row, needed, source)
    for k in needed:
        if not _is_valid_text(row[k]):  # e.g. "\\ud800" in JSON: a lone UTF-16 surrogate
            raise DataError("holds a lone UTF-16 surrogate (an escape like \\ud800), not valid "
                            "Unicode text", reason="bad_utf8", field=k)
    for k in needed:
        if not row[k].strip():
            raise DataError("empty or whitespace only", reason="empty", field=k)
    if "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    elif any(marker in row[k] for marker in (HUMAN, ASSISTANT) for k in needed):
        prompt, chosen, rejected = split_hh_transcript(row["chosen"], row["rejected"])
        for k, response in (("chosen", chosen), ("rejected", rejected)):
            if not response.strip():
                raise DataError("the final Assistant answer is empty", reason="empty", field=k)
    else:
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
    if chosen == rejected:
        raise DataError("chosen and rejected are identical", reason="identical", field="chosen")
    return PreferencePair(prompt, chosen, rejected, source)


# ---------------------------------------------------------------------------- chat messages

def _messages(value: object, name: str) -> tuple[Message, ...]:
    """Check one field of a conversational row: a non-empty list of {role, content} objects
    with a known role and string content. Returns fresh {"role", "content"} dicts (any
    other keys, such as "name", are dropped)."""
    def bad(detail: str, reason: str = "bad_messages") -> DataError:
        return DataError(detail, reason=reason, field=name)

    if not isinstance(value, list):
        raise bad(f"expected a list of chat messages like the other fields, got {type(value).__name__} "
                  f"(TRL's conversational format: prompt, chosen and rejected are all message lists)")
    if not value:
        raise bad("an empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = f"keys {sorted(m)[:5]}" if isinstance(m, dict) else type(m).__name__
            raise bad(f"message {i}: expected an object with 'role' and 'content', got {got}")
        role, content = m["role"], m["content"]
        if role not in CHAT_ROLES:
            raise bad(f"message {i}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise bad(f"message {i}: content must be a string, got {type(content).__name__}"
                      + (" (multimodal content parts are not supported)" if isinstance(content, list) else ""))
        if not _is_valid_text(content):
            raise bad(f"message {i}: content holds a lone UTF-16 surrogate, not valid Unicode text",
                      reason="bad_utf8")
        if role == "system" and i > 0:
            raise bad(f"message {i}: a system message may only come first")
        out.append({"role": role, "content": content})
    return tuple(out)


def _answer(messages: tuple[Message, ...], name: str) -> tuple[Message, ...]:
    """Check an answer: assistant messages only, not all empty."""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise DataError(f"message {i}: an answer holds assistant messages only, got role {m['role']!r}",
                            reason="bad_messages", field=name)
    if not any(m["content"].strip() for m in messages):
        raise DataError("the assistant answer is empty", reason="empty", field=name)
    return messages


def hh_prompt_text(messages: Sequence[Message]) -> str:
    """Messages -> HH-style prompt text, ending with the Assistant turn to be answered.

    [{"role": "user", "content": "Hi"}] -> "\\n\\nHuman: Hi\\n\\nAssistant:" (a system message
    becomes a "System:" turn, which HH-RLHF itself never has).
    """
    return "".join(f"\n\n{HH_ROLE_NAMES[m['role']]}: {m['content']}" for m in messages) + ASSISTANT


def hh_answer_text(messages: Sequence[Message]) -> str:
    """Assistant messages -> HH-style answer text: " content", and any further assistant
    message as another "\\n\\nAssistant: content" turn."""
    return " " + f"{ASSISTANT} ".join(m["content"] for m in messages)


def _pair_from_messages(row: dict, needed: tuple[str, ...], source: str) -> PreferencePair:
    """A TRL conversational row -> PreferencePair with messages and HH-style text fields.

    With "prompt": prompt, chosen and rejected are message lists; the answers hold
    assistant messages. Without it, chosen and rejected are whole conversations: the
    messages they share from the start are the prompt, and what follows in each must be
    assistant messages (else the two differ earlier: prompt_mismatch).
    """
    fields = {k: _messages(row[k], k) for k in needed}
    if "prompt" in row:
        prompt = fields["prompt"]
        chosen, rejected = _answer(fields["chosen"], "chosen"), _answer(fields["rejected"], "rejected")
    else:
        whole_c, whole_r = fields["chosen"], fields["rejected"]
        if whole_c == whole_r:
            raise DataError("chosen and rejected are identical", reason="identical", field="chosen")
        shared = 0
        while shared < min(len(whole_c), len(whole_r)) and whole_c[shared] == whole_r[shared]:
            shared += 1
        prompt, chosen, rejected = whole_c[:shared], whole_c[shared:], whole_r[shared:]
        later = [k for k, rest in (("chosen", chosen), ("rejected", rejected))
                 if any(m["role"] != "assistant" for m in rest)]
        if not prompt or later:
            raise DataError(
                f"chosen and rejected conversations differ at message {shared}, not only in the "
                f"final assistant answer, so they share no prompt", reason="prompt_mismatch")
        for k, rest in (("chosen", chosen), ("rejected", rejected)):
            if not rest:
                raise DataError(f"no assistant answer after the {shared} shared messages",
                                reason="empty", field=k)
            _answer(rest, k)
    chosen_text, rejected_text = hh_answer_text(chosen), hh_answer_text(rejected)
    if chosen == rejected or chosen_text == rejected_text:  # the text must differ too, for text consumers
        raise DataError("chosen and rejected are identical", reason="identical", field="chosen")
    return PreferencePair(hh_prompt_text(prompt), chosen_text, rejected_text, source,
                          prompt_messages=prompt, chosen_messages=chosen, rejected_messages=rejected)


def _is_valid_text(text: str) -> bool:
    """False for strings that cannot be UTF-8 encoded (lone surrogates); the tokenizer rejects them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_json(text: str) -> object:
    """json.loads, with every way it can fail turned into a DataError (reason bad_json).

    Besides JSONDecodeError, json.loads raises ValueError for integers of more than 4,300
    digits and RecursionError for arrays or objects nested thousands deep.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} at column {e.colno}", reason="bad_json") from None
    except ValueError as e:
        raise DataError(f"malformed JSON: {e}", reason="bad_json") from None
    except RecursionError:
        raise DataError("malformed JSON: nested too deeply", reason="bad_json") from None


# ---------------------------------------------------------------------------- file readers

def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def _iter_jsonl(path: Path, max_line_bytes: int) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed JSON or DataError) per non-blank line, in bounded memory."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            while True:
                raw = f.readline(max_line_bytes + 1)
                if not raw:
                    return
                lineno += 1
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    size = len(raw)
                    while raw and not raw.endswith(b"\n"):  # drain the rest, chunk by chunk
                        raw = f.readline(1 << 20)
                        size += len(raw)
                    size -= raw.endswith(b"\n")  # the newline does not count
                    yield lineno, DataError(
                        f"line is {size:,} bytes, above the cap max_line_bytes={max_line_bytes:,}",
                        reason="line_too_long")
                    continue
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, DataError(f"invalid UTF-8 at byte {e.start}: {e.reason}",
                                            reason="bad_utf8")
                    continue
                if not text.strip():
                    continue
                try:
                    row = _parse_json(text)
                except DataError as e:
                    row = e
                yield lineno, row
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read the file after line {lineno}: {e}", path=str(path)) from e


def _iter_json_list(path: Path) -> Iterator[tuple[int, object]]:
    """A .json file holding one list of rows (read whole: use .jsonl for big data)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"invalid UTF-8 at byte {e.start}: {e.reason}", reason="bad_utf8",
                        path=str(path), line=line) from e
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} at column {e.colno}", reason="bad_json",
                        path=str(path), line=e.lineno) from e
    except (ValueError, RecursionError):
        try:
            _parse_json(text)
        except DataError as e:
            raise DataError(e.detail, reason="bad_json", path=str(path)) from None
        raise
    if not isinstance(rows, list):
        raise DataError(f"expected a JSON list of rows, got {type(rows).__name__}", path=str(path))
    yield from enumerate(rows, 1)


def _iter_parquet(path: Path) -> Iterator[tuple[int, object]]:
    """The rows of a parquet file as dicts (a column of chat messages: a list of {role, content})."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow: pip install pyarrow (an optional dependency, "
                        "the extra smollm-dpo[parquet])", path=str(path)) from None
    import pyarrow as pa

    n = 0
    try:
        parquet = pq.ParquetFile(path)
        _check_columns(parquet.schema_arrow.names, path, whole_file=True)
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"cannot read the parquet file after row {n}: {e}", path=str(path)) from None


def _holds_json_lines(path: Path) -> bool:
    """True for a .json file that holds JSON Lines (one object per line, as many hub datasets
    have), False for one JSON document: JSON Lines start with an object that a line break and
    another object follow."""
    with open(path, "rb") as f:
        head = f.read(1 << 20).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1] == b"{" and re.search(rb"}[ \t\r]*\n\s*{", head) is not None


def _check_columns(columns: Sequence[str], path: Path, whole_file: bool) -> None:
    """One error for a file in none of the preference formats, naming the columns it has and the
    ones it needs. `whole_file`: the columns are the file's own (a parquet schema), so either
    missing is fatal; else they are the first record's, and only a record without both is taken
    for a file in another format (one without one of them is a bad record)."""
    missing = [k for k in ("chosen", "rejected") if k not in columns]
    if len(missing) == 2 or (missing and whole_file):
        raise DataError(
            f"not preference data in a format dpo reads: its records have the columns {sorted(columns)[:20]}, "
            f"without {' and '.join(map(repr, missing))}; needed: 'chosen' and 'rejected', with or without "
            "'prompt' (TRL's standard format: strings; conversational: lists of {role, content} messages)",
            path=str(path))


def _read_file(path: Path, display: str, report: LoadReport, skip_bad_records: bool,
               max_line_bytes: int, limit: int | None, out: list[PreferencePair],
               skip_unusable: bool = True) -> None:
    suffix = _suffix(path)
    if suffix == ".json" and _holds_json_lines(path):
        rows, unit = _iter_jsonl(path, max_line_bytes), "line"
    elif suffix == ".json":
        rows, unit = _iter_json_list(path), "item"
    elif suffix == ".parquet":
        rows, unit = _iter_parquet(path), "row"
    else:
        rows, unit = _iter_jsonl(path, max_line_bytes), "line"
    report.files.append(str(path))
    checked = False
    with closing(rows):  # closes the file when we stop early (limit) or raise
        for n, row in rows:
            if not checked and isinstance(row, dict):  # the first record says what format the file is in
                _check_columns(list(row), path, whole_file=False)
                checked = True
            try:
                if isinstance(row, DataError):
                    raise row
                out.append(_pair_from_row(row, f"{display}:{n}"))
            except DataError as e:
                e = e.located(str(path), n, unit)
                if not (skip_bad_records or (skip_unusable and e.reason in UNUSABLE_REASONS)):
                    raise e from None
                report.add_skip(e)
                continue
            if limit is not None and len(out) >= limit:
                return


# ---------------------------------------------------------------------------- resolving inputs

def _data_suffix(name: str) -> str | None:
    return _suffix(Path(name))


def _dataset_card(readme: Path) -> dict | None:
    """The YAML header of a dataset card (README.md), or None without one."""
    if not readme.is_file():
        return None
    from huggingface_hub.repocard import metadata_load  # lazy: only dataset folders and hub names need it

    try:
        return metadata_load(readme) or None
    except Exception as e:  # yaml raises its own errors for a malformed header
        raise DataError(f"the YAML header of the dataset card is malformed ({str(e).splitlines()[0]})",
                        path=str(readme)) from None


def _files_in_dir(directory: Path, split: str, subset: str | None = None) -> list[Path]:
    """Supported files under a directory (recursively, sorted).

    A folder laid out like a hub dataset (a README.md with configs, or files named after splits:
    train.jsonl.gz, data/test-00000-of-00001.parquet, as in a clone of Anthropic/hh-rlhf or of
    trl-lib/ultrafeedback_binarized) gives only the files of ``split`` (and ``subset``), read as
    dpo.hub_data reads a hub repo, so train and test never mix. Otherwise every file is read.
    """
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and _suffix(p))
    card = _dataset_card(directory / "README.md")
    if (card or {}).get("configs") or subset is not None:
        try:
            files = hub_data.split_files(str(directory), files, card, split, subset, _data_suffix)
        except hub_data.LayoutError as e:
            raise DataError(str(e)) from None
    else:
        splits = {f: hub_data.split_of(f, _data_suffix) for f in files}
        named = {s for s in splits.values() if s in SPLIT_NAMES}
        if named:
            if split not in named:
                raise DataError(f"no {split!r} split here; the directory has splits {sorted(named)} "
                                f"(pass split=...)", path=str(directory))
            files = [f for f in files if splits[f] == split]
    if not files:
        raise DataError(f"no {', '.join(SUFFIXES)} files in the directory", path=str(directory))
    return [directory / f for f in files]


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return (len(parts) >= 2 and all(parts) and not name.startswith((".", "~"))
            and "\\" not in name)


def _display(path: Path) -> str:
    """How a local file is named in sources and messages: its folder and name."""
    return f"{path.parent.name}/{path.name}"


def _hub_files(name: str, split: str, subset: str | None, report: LoadReport, offline_fallback: bool
               ) -> list[tuple[Path, str]]:
    """Download the files of a hub dataset name and return [(local path, display name)].

    The name is ``owner/name`` (optionally ``owner/name@revision``), then optionally ``/<subset>``
    or ``/<path of one file in the repo>``. The repo's file list and its dataset card say which
    files hold ``split`` (dpo.hub_data); only those are downloaded, with huggingface_hub
    (smollm.sources.snapshot: its cache, HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN apply).

    When the name is exactly "Anthropic/hh-rlhf", its files are neither cached nor downloadable
    (smollm.sources.HubOfflineError) and offline_fallback is on, the bundled test splits are
    returned instead and report.fallback says so.
    """
    sources = importlib.import_module("smollm.sources")  # lazy: only hub names need it (and huggingface_hub)
    owner, _, rest = name.partition("/")
    repo_name, _, rest = rest.partition("/")
    repo = sources.parse_repo_id(f"{owner}/{repo_name}")
    if repo is None:
        raise DataError(f"{name!r} is not a local path, and not a hub dataset id like "
                        f"'trl-lib/ultrafeedback_binarized' or {HH_REPO!r}")
    repo_id, revision = repo
    one_file = rest if rest and _suffix(Path(rest)) else None
    if rest and one_file is None:
        subset = rest  # "owner/name/<subset>" names the subset itself
    try:
        if one_file is not None:
            wanted = [one_file]
        else:
            listing, folder = sources.repo_files(repo_id, repo_type="dataset", revision=revision)
            try:
                wanted = hub_data.split_files(
                    repo_id, listing, _dataset_card(folder / "README.md"), split, subset, _data_suffix,
                    default_subsets=HH_DEFAULT_SUBSETS if repo_id == HH_REPO else ())
            except hub_data.LayoutError as e:
                raise DataError(str(e)) from None
        folder = sources.snapshot(repo_id, repo_type="dataset", revision=revision, allow_patterns=wanted)
    except sources.HubOfflineError as e:
        if not (offline_fallback and repo_id == HH_REPO and revision is None and not rest and subset is None):
            raise
        # All or nothing: never mix a cached train file with the bundled test files.
        report.fallback = OFFLINE_FALLBACK_MESSAGE.format(reason=e.reason, rows=BUNDLED_HH_ROWS, repo=HH_REPO,
                                                          split=split)
        return [(path, _display(path)) for path in bundled_hh_files()]
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing:
        raise DataError(f"the hub dataset {repo_id} has no file {missing[0]!r}")
    return [(folder / f, f"{repo_id}/{f}") for f in wanted]


def _resolve(item: PathLike, split: str, subset: str | None, report: LoadReport, offline_fallback: bool
             ) -> list[tuple[Path, str]]:
    path = Path(item)
    if path.is_dir():
        return [(p, _display(p)) for p in _files_in_dir(path, split, subset)]
    if path.exists():
        if not _suffix(path):
            raise DataError(f"unsupported file type (expected one of {', '.join(SUFFIXES)})",
                            path=str(path))
        return [(path, _display(path))]
    if isinstance(item, str) and _looks_like_hub_name(item):
        return _hub_files(item, split, subset, report, offline_fallback)
    raise DataError("no such file or directory", path=str(path))


# ---------------------------------------------------------------------------- public API

def bundled_hh_files(*, verify: bool = False) -> list[Path]:
    """The HH-RLHF test splits shipped inside the package: [helpful-base, harmless-base].

    They live in ``dpo/bundled/hh-rlhf/<subset>/test.jsonl.gz`` (byte-identical copies of
    Anthropic's files; ``dpo/bundled/PROVENANCE.md`` says where from) and load with
    ``load_preferences(bundled_hh_files())`` from any working directory and after
    ``pip install``. ``verify=True`` also checks each file's size and sha256 against
    BUNDLED_HH (reading 1.6 MB, so it is left to the tests rather than every load).

    Raises DataError when a file is missing or, with verify=True, differs.
    """
    paths = []
    for rel, (size, sha256) in BUNDLED_HH.items():
        path = BUNDLED_HH_DIR / rel
        if not path.is_file():
            raise DataError("missing from this installation of dpo (the package data was not "
                            "installed?)", path=str(path))
        if verify:
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if (len(data), digest) != (size, sha256):
                raise DataError(f"{len(data):,} bytes with sha256 {digest}, expected {size:,} bytes "
                                f"with sha256 {sha256}", path=str(path))
        paths.append(path)
    return paths


def load_preferences_with_report(path_or_name: PathLike | Sequence[PathLike], **options: Any
                                 ) -> tuple[list[PreferencePair], LoadReport]:
    """Load preference pairs and report what was skipped, and any offline fallback.

    The arguments are load_preferences'. The LoadReport counts the skipped rows by reason
    (with the first few as examples) and sets ``fallback`` to a one-line message when
    "Anthropic/hh-rlhf" was replaced by the bundled test splits; print it.
    """
    return _load(path_or_name, **options)


def _load(path_or_name: PathLike | Sequence[PathLike], *, split: str = "train", subset: str | None = None,
          skip_bad_records: bool = False, limit: int | None = None, max_line_bytes: int = MAX_LINE_BYTES,
          skip_unusable: bool = True, offline_fallback: bool = True) -> tuple[list[PreferencePair], LoadReport]:
    items = [path_or_name] if isinstance(path_or_name, (str, os.PathLike)) else list(path_or_name)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    pairs: list[PreferencePair] = []
    report = LoadReport()
    for item in items:
        for path, display in _resolve(item, split, subset, report, offline_fallback):
            _read_file(path, display, report, skip_bad_records, max_line_bytes, limit, pairs, skip_unusable)
            if limit is not None and len(pairs) >= limit:
                break
        if limit is not None and len(pairs) >= limit:
            break
    report.loaded = len(pairs)
    if not pairs:
        where = ", ".join(str(i) for i in items)
        if not report.total_skipped:
            raise DataError(f"no preference pairs loaded from {where}: the input holds no records")
        counts = ", ".join(f"{r} {n}" for r, n in report.skipped.items())
        raise DataError(f"no preference pairs loaded from {where}: every one of its {report.total_skipped} "
                        f"records was skipped ({counts}); the first: {report.examples[0][:300]}")
    return pairs, report


def load_preferences(
    path_or_name: PathLike | Sequence[PathLike],
    *,
    split: str = "train",
    subset: str | None = None,
    skip_bad_records: bool = False,
    limit: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    skip_unusable: bool = True,
    offline_fallback: bool = True,
) -> list[PreferencePair]:
    """Load (prompt, chosen, rejected) pairs from files, directories or hub names.

    path_or_name: one path/name or a list. Files: .jsonl, .jsonl.gz, .json (a list, or
        JSON Lines), .parquet. A directory: its supported files, recursively, sorted (only
        those of ``split`` when it is laid out like a hub dataset, see dpo.hub_data). Hub
        dataset ids (used only when no local path of that name exists), downloaded with
        huggingface_hub: "<owner>/<name>" (its ``split``, from its dataset card or its file
        names: "trl-lib/ultrafeedback_binarized"), "<owner>/<name>@<revision>",
        "<owner>/<name>/<subset>", "<owner>/<name>/<path of one file>". "Anthropic/hh-rlhf"
        alone is helpful-base + harmless-base. ``split`` does not apply to explicit files.
    split: the split of directories and hub datasets ("train", "test", "train_prefs", ...).
    subset: the subset (the `datasets` library's config name) of directories and hub
        datasets, e.g. "helpful-base" for Anthropic/hh-rlhf; default: the card's default.
    skip_unusable: skip (and count, see load_preferences_with_report) well-formed rows
        without a usable preference (UNUSABLE_REASONS: an empty answer, transcripts that
        differ before the last answer, chosen == rejected). On by default, because real
        HH-RLHF has such rows; False raises DataError at the first one.
    skip_bad_records: also skip and count malformed rows (every reason in SKIP_REASONS:
        bad JSON, a missing field, a bad chat message, ...) instead of raising.
    limit: stop after this many pairs.
    max_line_bytes: a longer JSONL line is a bad record (it is never held in memory whole).
    offline_fallback: when "Anthropic/hh-rlhf" is neither cached nor downloadable (the hub
        is unreachable, or HF_HUB_OFFLINE=1), read the HH-RLHF test splits bundled with dpo
        instead (bundled_hh_files), with a warning. False lets
        smollm.sources.HubOfflineError through.

    Raises DataError naming the file, line and field; also when nothing was loaded.
    """
    pairs, report = _load(path_or_name, split=split, subset=subset, skip_bad_records=skip_bad_records, limit=limit,
                          max_line_bytes=max_line_bytes, skip_unusable=skip_unusable,
                          offline_fallback=offline_fallback)
    if report.fallback:  # the report is not returned here, so say it as a warning
        warnings.warn(report.fallback, RuntimeWarning, stacklevel=2)
    return pairs


def train_eval_split(pairs: Sequence[PreferencePair], eval_size: int | float, seed: int = 0
                     ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Shuffle with random.Random(seed) and split off ``eval_size`` pairs for evaluation.

    eval_size: a count, or a fraction in (0, 1). Pairs with identical (prompt, chosen,
    rejected) are kept together on one side, so no pair is in both; when the data has
    such duplicates the eval side can exceed eval_size by the duplicates of its last pair.
    """
    if isinstance(eval_size, float) and 0 < eval_size < 1:
        eval_size = round(eval_size * len(pairs))
    if not isinstance(eval_size, int) or not 0 <= eval_size <= len(pairs):
        raise ValueError(f"eval_size must be a count in [0, {len(pairs)}] or a fraction in "
                         f"(0, 1), got {eval_size!r}")
    groups: dict[tuple[str, str, str], list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault((p.prompt, p.chosen, p.rejected), []).append(p)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    train: list[PreferencePair] = []
    evals: list[PreferencePair] = []
    for k in keys:
        (evals if len(evals) < eval_size else train).extend(groups[k])
    return train, evals


# ---------------------------------------------------------------------------- synthetic data

_TOPICS = ("bake bread", "fix a bike", "plant tomatoes", "learn chess", "write a poem",
           "clean a window", "train a puppy", "save money", "paint a fence", "brew tea",
           "fold a shirt", "cook rice", "tune a guitar", "read faster", "sleep better",
           "start running", "draw a cat", "pack a bag", "wash a car", "learn french")
_QUESTIONS = ("How do I {t}?", "Can you help me {t}?", "What is the best way to {t}?",
              "Any tips to {t}?", "I want to {t}. Where do I start?")
_STEPS = ("make a simple plan", "gather the right tools", "practice a little every day",
          "watch a short video guide", "ask a friend for feedback", "start with small steps",
          "keep notes on your progress", "take your time with each step")


# Each pool mixes "!" and "." equally, so punctuation carries no preference by itself.
_GOOD_OPENERS = ("Sure!", "Of course.", "Gladly!", "Certainly.", "Absolutely!", "Happy to help.",
                 "Great question!", "Yes.", "With pleasure!", "Good idea.", "Definitely!", "Wonderful.")
_BAD_OPENERS = ("No.", "Nope!", "Never.", "Whatever!", "Ugh.", "Meh!", "Nah.", "Forget it!",
                "Boring.", "Pointless!", "Hopeless.", "Stop asking!")
_GOOD_CLOSERS = ("Good luck!", "Have fun.", "You can do it!", "Enjoy.", "Best wishes!", "Keep going.")
_BAD_CLOSERS = ("Do not bother!", "Waste of time.", "Give up!", "Why even try.", "So dull!", "Too bad.")


def make_synthetic_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """A preference set that a tiny randomly initialised LM learns in a few dozen DPO steps.

    Design:
      * prompt: HH style "\\n\\nHuman: <question about a topic>\\n\\nAssistant:", from 5
        question templates x 20 topics;
      * chosen:   " <friendly opener> To <topic>, <step> and then <step>. <friendly closer>"
      * rejected: " <dismissive opener> To <topic>, <step> and then <step>. <dismissive closer>"
        (openers and closers from pools of 12 and 6 per side; two steps of 8 per side).
    Both sides have the same shape and length, and the markers are drawn from pools, so an
    untrained model's arbitrary token preferences average out: it prefers chosen for about
    half of the pairs. What separates the sides is consistent (friendly vs dismissive
    vocabulary), which a few DPO steps learn; topics and steps keep pairs distinct.
    Deterministic in ``seed``.
    """
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        question = rng.choice(_QUESTIONS).format(t=topic)
        a, b = rng.sample(_STEPS, 2)
        c, d = rng.sample(_STEPS, 2)
        prompt = f"{HUMAN} {question}{ASSISTANT}"
        chosen = f" {rng.choice(_GOOD_OPENERS)} To {topic}, {a} and then {b}. {rng.choice(_GOOD_CLOSERS)}"
        rejected = f" {rng.choice(_BAD_OPENERS)} To {topic}, {c} and then {d}. {rng.choice(_BAD_CLOSERS)}"
        pairs.append(PreferencePair(prompt, chosen, rejected, source=f"synthetic:{i + 1}"))
    return pairs
