"""Property-based fuzzing (hypothesis) of the data loaders, tokenization, masking and batching.

Properties:
* loaders: any file (random bytes, random JSON values, dicts with random keys and types, HH
  transcripts with random turns, valid rows) gives valid pairs or a `DataError`, never any
  other exception, with skip_bad_records on or off;
* tokenization: any (prompt, chosen, rejected) and max_length gives None or a pair whose
  response masks never cover a prompt token, with at least one counted response token per side
  and both sides within max_length; None exactly when a response has no token at all;
* batching: `collate_pairs` never yields an empty batch or a row without a response token, and
  the trainer's length-grouped order is a permutation cut into non-empty batches.

Each test prints how many cases it tried (visible in pytest's output) and checks that it
reached its target. No example database is written (database=None).
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo.data import ASSISTANT, HUMAN, SKIP_REASONS, DataError, PreferencePair, load_preferences_with_report
from dpo.tokenization import collate_pairs, length_grouped_order, tokenize_pair, tokenize_pairs
from smollm import load_tokenizer

LOADER_CASES, TOKENIZE_CASES, BATCH_CASES = 300, 400, 150
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    return load_tokenizer(tokenizer_json)


def report(capsys, name: str, counts: dict) -> None:
    with capsys.disabled():
        print(f"\n[fuzz] {name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


# ------------------------------------------------------------------ strategies
words = st.text(alphabet=string.ascii_letters + " .,!?'\n", max_size=30)
any_text = st.text(max_size=60)  # any Unicode (hypothesis leaves out lone surrogates by default)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | any_text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
field_values = st.one_of(words, any_text, json_values, st.just(""), st.just("   "))


@st.composite
def hh_transcript(draw) -> str:
    turns = draw(st.lists(st.tuples(st.sampled_from([HUMAN, ASSISTANT, "\n\nAssistant", "Human:"]), words),
                          max_size=5))
    return "".join(marker + text for marker, text in turns)


@st.composite
def hh_row(draw) -> dict:
    if draw(st.booleans()):  # two transcripts that share the prompt: mostly valid
        prompt = draw(hh_transcript()) + ASSISTANT
        return {"chosen": prompt + draw(words), "rejected": prompt + draw(words)}
    return {"chosen": draw(hh_transcript()), "rejected": draw(hh_transcript())}


keys = st.sampled_from(["prompt", "chosen", "rejected", "response", "x", ""])
rows = st.one_of(
    st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, words, words, words),
    hh_row(),
    st.dictionaries(keys, field_values, max_size=4),
    json_values,
)


def encode_line(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


lines = st.one_of(
    rows.map(encode_line),
    st.binary(max_size=80),  # random bytes: bad UTF-8, bad JSON, stray newlines
    st.sampled_from([b"", b"   ", b"\xef\xbb\xbf{}", b"[" * 3000, b"1" * 5000, b'"\\ud800"',
                     b'{"prompt": "a\\udfff", "chosen": " b", "rejected": " c"}', b"NaN", b'{"chosen": 1e999}']),
)


def check_pair(p: PreferencePair) -> None:
    assert all(isinstance(x, str) and x.strip() for x in (p.prompt, p.chosen, p.rejected))
    assert p.chosen != p.rejected
    for x in (p.prompt, p.chosen, p.rejected):
        x.encode("utf-8")  # valid text: no lone surrogates


# ------------------------------------------------------------------ loaders
def test_loaders_return_valid_pairs_or_data_error(capsys):
    counts = {"cases": 0, "loaded": 0, "data_errors": 0, "pairs": 0, "skipped": 0}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        as_json = Path(tmp) / "fuzz.json"

        @settings(max_examples=LOADER_CASES, **FUZZ)
        @given(content=st.lists(lines, max_size=8), skip_bad=st.booleans(), skip_unusable=st.booleans(),
               max_line_bytes=st.sampled_from([40, 1000, 1_000_000]), items=st.lists(rows, max_size=4))
        def check(content, skip_bad, skip_unusable, max_line_bytes, items):
            counts["cases"] += 1
            path.write_bytes(b"\n".join(content))
            as_json.write_bytes(encode_line(items) if items else b"[]")
            for target in (path, as_json):
                try:
                    pairs, rep = load_preferences_with_report(target, skip_bad_records=skip_bad,
                                                              skip_unusable=skip_unusable,
                                                              max_line_bytes=max_line_bytes)
                except DataError as e:
                    counts["data_errors"] += 1
                    assert str(e) and (e.reason is None or e.reason in SKIP_REASONS)
                    continue
                counts["loaded"] += 1
                counts["pairs"] += len(pairs)
                counts["skipped"] += rep.total_skipped
                assert pairs and rep.loaded == len(pairs)
                assert set(rep.skipped) <= set(SKIP_REASONS)
                for p in pairs:
                    check_pair(p)

        check()
    report(capsys, "loaders", counts)
    assert counts["cases"] >= LOADER_CASES
    assert counts["loaded"] and counts["data_errors"] and counts["skipped"]  # all three outcomes were reached


# ------------------------------------------------------------------ tokenization
def check_tokenized(tokenizer, tp, prompt: str, chosen: str, rejected: str, max_length: int) -> None:
    n = tp.prompt_len
    prompt_ids = tokenizer.encode_ids(prompt)
    assert n <= len(prompt_ids)
    for ids, mask, response in ((tp.chosen_ids, tp.chosen_mask, chosen),
                                (tp.rejected_ids, tp.rejected_mask, rejected)):
        assert len(ids) == len(mask) <= max_length
        assert mask == [0] * n + [1] * (len(ids) - n)  # the mask never covers a prompt token
        assert ids[:n] == (prompt_ids[len(prompt_ids) - n:] if n else [])  # the prompt's latest tokens
        assert sum(mask[1:]) >= 1  # a counted response token (position >= 1)
        joint = tokenizer.encode_ids(prompt + response)
        candidates = [joint[len(prompt_ids):], tokenizer.encode_ids(response)]  # joint, or the fallback
        got = ids[n:]  # the response's tokens + our EOS, cut from the right to fit
        assert any(got == (c + [tokenizer.eos_token_id])[:len(got)] for c in candidates)
    assert tp.chosen_ids[:n] == tp.rejected_ids[:n]


@settings(max_examples=TOKENIZE_CASES, **FUZZ)
@given(prompt=any_text | hh_transcript(), chosen=any_text, rejected=any_text,
       max_length=st.integers(2, 48), prompt_cap=st.none() | st.integers(1, 47))
def _tokenize_case(tokenizer, counts, prompt, chosen, rejected, max_length, prompt_cap):
    counts["cases"] += 1
    max_prompt_length = prompt_cap if prompt_cap is not None and prompt_cap < max_length else None
    pair = PreferencePair(prompt, chosen, rejected, "fuzz:1")
    kw = dict(max_length=max_length, eos_token_id=tokenizer.eos_token_id, max_prompt_length=max_prompt_length)
    tp = tokenize_pair(tokenizer, pair, **kw)
    batched, stats = tokenize_pairs(tokenizer, [pair], **kw)
    assert batched == ([tp] if tp is not None else [])  # the fast path agrees
    has_tokens = bool(tokenizer.encode_ids(chosen)) and bool(tokenizer.encode_ids(rejected))
    assert (tp is not None) == has_tokens  # dropped only when a response has no token at all
    if tp is None:
        counts["dropped"] += 1
        return
    counts["kept"] += 1
    counts["prompt_cut"] += tp.prompt_truncated
    check_tokenized(tokenizer, tp, prompt, chosen, rejected, max_length)


def test_tokenization_masks_and_lengths(tokenizer, capsys):
    counts = {"cases": 0, "kept": 0, "dropped": 0, "prompt_cut": 0}
    _tokenize_case(tokenizer, counts)
    report(capsys, "tokenization", counts)
    assert counts["cases"] >= TOKENIZE_CASES and counts["kept"] and counts["dropped"] and counts["prompt_cut"]


# ------------------------------------------------------------------ batching
@settings(max_examples=BATCH_CASES, **FUZZ)
@given(texts=st.lists(st.tuples(any_text, any_text, any_text), min_size=1, max_size=7),
       max_length=st.integers(2, 40), batch_size=st.integers(1, 5), seed=st.integers(0, 2**31))
def _batch_case(tokenizer, counts, texts, max_length, batch_size, seed):
    counts["cases"] += 1
    pairs, _ = tokenize_pairs(tokenizer, [PreferencePair(*t) for t in texts], max_length=max_length,
                              eos_token_id=tokenizer.eos_token_id)
    if not pairs:
        with pytest.raises(ValueError):
            collate_pairs(pairs, tokenizer.pad_token_id)  # an empty batch is an error, never a batch
        return
    order = length_grouped_order([p.length for p in pairs], batch_size, seed)
    assert sorted(order) == list(range(len(pairs)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for b in batches:
        counts["batches"] += 1
        batch = collate_pairs([pairs[i] for i in b], tokenizer.pad_token_id)
        B = len(b)
        assert B >= 1 and batch["input_ids"].shape[0] == 2 * B
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["response_mask"].shape
        assert batch["input_ids"].shape[1] <= max_length
        assert (batch["response_mask"][:, 1:].sum(1) >= 1).all()  # every row has a counted token
        assert (batch["response_mask"] <= batch["attention_mask"]).all()  # never on padding
        assert batch["attention_mask"].sum(1).tolist() == [len(pairs[i].chosen_ids) for i in b] + [
            len(pairs[i].rejected_ids) for i in b]


def test_batches_are_never_empty(tokenizer, capsys):
    counts = {"cases": 0, "batches": 0}
    _batch_case(tokenizer, counts)
    report(capsys, "batching", counts)
    assert counts["cases"] >= BATCH_CASES and counts["batches"]
