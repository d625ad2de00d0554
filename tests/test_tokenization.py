"""Tokenization with the real SmolLM tokenizer: exact response masks, truncation, batching."""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpo.tokenization import (
    TokenizedPair,
    TokenizeStats,
    collate_pairs,
    collate_sequences,
    length_grouped_order,
    tokenize_pair,
    tokenize_pairs,
    tokenize_prompt_response,
)

try:
    from dpo.data import PreferencePair
except ImportError:  # dpo/data.py not written yet: a stand-in with the same fields

    @dataclass(frozen=True)
    class PreferencePair:  # type: ignore[no-redef]
        prompt: str
        chosen: str
        rejected: str
        source: str = ""


EOS = 0  # <|endoftext|>

HH_PROMPT = (
    "\n\nHuman: What are some good vegetables to grow in a small garden?"
    "\n\nAssistant: Tomatoes, lettuce and herbs do well in small spaces."
    "\n\nHuman: What about in the shade?"
    "\n\nAssistant:"
)
HH_CHOSEN = (
    " Leafy greens like spinach, kale and lettuce tolerate partial shade."
    " Herbs such as mint and parsley do too."
)
HH_REJECTED = " I don't know."


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def response_part(ids, mask):
    return [i for i, m in zip(ids, mask) if m]


def prompt_part(ids, mask):
    return [i for i, m in zip(ids, mask) if not m]


def check_mask_layout(ids, mask, prompt_len):
    """mask is exactly [0] * prompt_len + [1] * (rest)."""
    assert len(ids) == len(mask)
    assert mask == [0] * prompt_len + [1] * (len(ids) - prompt_len)


# --- single sequences ------------------------------------------------------------------------


def test_prefix_property_on_hh_text(tok):
    joint = enc(tok, HH_PROMPT + HH_CHOSEN)
    p = enc(tok, HH_PROMPT)
    assert joint[: len(p)] == p  # the usual case: no merge across "Assistant:" | " Leafy"
    s = tokenize_prompt_response(tok, HH_PROMPT, HH_CHOSEN, max_length=512, eos_token_id=EOS)
    assert not s.boundary_fallback and not s.prompt_truncated and not s.response_truncated
    assert s.input_ids[: s.prompt_len] == p
    assert s.input_ids[:-1] == joint  # prompt + response tokens are exactly the joint encoding


def test_eos_appended_and_mask_exactly_on_response(tok):
    s = tokenize_prompt_response(tok, HH_PROMPT, HH_CHOSEN, max_length=512, eos_token_id=EOS)
    assert s.input_ids[-1] == EOS and s.response_mask[-1] == 1
    check_mask_layout(s.input_ids, s.response_mask, s.prompt_len)
    resp = response_part(s.input_ids, s.response_mask)
    assert tok.decode(resp[:-1], skip_special_tokens=False) == HH_CHOSEN
    assert tok.decode(prompt_part(s.input_ids, s.response_mask), skip_special_tokens=False) == HH_PROMPT


def test_real_hh_pairs_have_no_boundary_merge(tok, hh_files):
    """On the first 200 helpful-base test pairs, "...Assistant:" | " response" never merges."""
    pairs = []
    with gzip.open(hh_files[0], "rt") as f:
        for _, line in zip(range(200), f):
            d = json.loads(line)
            k = d["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            prompt = d["chosen"][:k]
            if d["rejected"].startswith(prompt):
                pairs.append(PreferencePair(prompt, d["chosen"][k:], d["rejected"][k:]))
    out, stats = tokenize_pairs(tok, pairs, max_length=100_000, eos_token_id=EOS)
    assert stats.boundary_fallbacks == 0 and stats.kept == len(pairs) > 150
    for tp in out[:50]:
        pair = pairs[tp.index]
        assert tok.decode(response_part(tp.chosen_ids, tp.chosen_mask)[:-1]) == pair.chosen
        assert tok.decode(response_part(tp.rejected_ids, tp.rejected_mask)[:-1]) == pair.rejected


@pytest.mark.parametrize("prompt, response", [("Hello wor", "ld"), ("Hello ", "world"), ("ab", "c")])
def test_boundary_merge_falls_back_and_mask_stays_exact(tok, prompt, response):
    joint = enc(tok, prompt + response)
    p = enc(tok, prompt)
    assert joint[: len(p)] != p  # the BPE merge crosses the boundary: the crafted case is real
    stats = TokenizeStats()
    s = tokenize_prompt_response(tok, prompt, response, max_length=64, eos_token_id=EOS, stats=stats)
    assert s.boundary_fallback and stats.boundary_fallbacks == 1
    assert s.input_ids == p + enc(tok, response) + [EOS]
    check_mask_layout(s.input_ids, s.response_mask, len(p))
    assert tok.decode(response_part(s.input_ids, s.response_mask)[:-1]) == response
    assert tok.decode(prompt_part(s.input_ids, s.response_mask)) == prompt


def test_long_prompt_cut_from_left_keeps_latest_text(tok):
    turns = "".join(f"\n\nHuman: question number {i}?\n\nAssistant: answer {i}." for i in range(30))
    prompt = turns + "\n\nHuman: last?\n\nAssistant:"
    response = " Sure."
    r = enc(tok, response)
    stats = TokenizeStats()
    s = tokenize_prompt_response(tok, prompt, response, max_length=40, eos_token_id=EOS, stats=stats)
    assert len(s.input_ids) == 40 and s.prompt_truncated and not s.response_truncated
    assert s.prompt_len == 40 - len(r) - 1
    assert s.input_ids[: s.prompt_len] == enc(tok, prompt)[-s.prompt_len :]
    kept_text = tok.decode(s.input_ids[: s.prompt_len])
    assert prompt.endswith(kept_text) and kept_text.endswith("\n\nHuman: last?\n\nAssistant:")
    assert response_part(s.input_ids, s.response_mask) == r + [EOS]
    assert stats.prompt_truncated == 1 and stats.kept == 1


def test_max_prompt_length_cuts_first(tok):
    p = enc(tok, HH_PROMPT)
    s = tokenize_prompt_response(tok, HH_PROMPT, HH_CHOSEN, max_length=512, eos_token_id=EOS, max_prompt_length=5)
    assert s.prompt_len == 5 and s.input_ids[:5] == p[-5:] and s.prompt_truncated


def test_prompt_longer_than_max_length(tok):
    prompt = "word " * 200
    s = tokenize_prompt_response(tok, prompt, " ok", max_length=16, eos_token_id=EOS)
    assert len(s.input_ids) == 16
    assert response_part(s.input_ids, s.response_mask) == enc(tok, " ok") + [EOS]
    assert s.prompt_len == 16 - len(enc(tok, " ok")) - 1


def test_long_response_prompt_cut_just_enough(tok):
    """prompt + response overflow by a little: the prompt loses only the overflow, the response is whole."""
    prompt, response = HH_PROMPT, HH_CHOSEN
    p, r = enc(tok, prompt), enc(tok, response)
    max_length = len(r) + 1 + 4
    s = tokenize_prompt_response(tok, prompt, response, max_length=max_length, eos_token_id=EOS)
    assert s.prompt_len == 4 and s.input_ids[:4] == p[-4:]
    assert response_part(s.input_ids, s.response_mask) == r + [EOS]


def test_response_longer_than_max_length_cut_from_right(tok):
    """A response that alone exceeds max_length: the prompt goes entirely, the response is cut
    from the right (losing its EOS); its first token sits at position 0 and is not counted."""
    response = " " + " ".join(f"step {i}" for i in range(100))
    r = enc(tok, response)
    stats = TokenizeStats()
    s = tokenize_prompt_response(tok, HH_PROMPT, response, max_length=20, eos_token_id=EOS, stats=stats)
    assert s.prompt_len == 0 and s.input_ids == r[:20] and s.response_mask == [1] * 20
    assert s.response_truncated and s.prompt_truncated
    assert response.startswith(tok.decode(s.input_ids))
    assert stats.response_truncated == 1 and stats.prompt_truncated == 1


def test_empty_response_dropped_and_counted(tok):
    stats = TokenizeStats()
    assert tokenize_prompt_response(tok, HH_PROMPT, "", max_length=64, eos_token_id=EOS, stats=stats) is None
    assert stats.dropped_no_response == 1 and stats.kept == 0 and stats.total == 1
    pairs = [
        PreferencePair(HH_PROMPT, HH_CHOSEN, HH_REJECTED, "a"),
        PreferencePair(HH_PROMPT, HH_CHOSEN, "", "b"),  # empty rejected
        PreferencePair("", "", " x", "c"),  # empty prompt and empty chosen
        PreferencePair(HH_PROMPT, " Fine.", HH_REJECTED, "d"),
    ]
    out, stats = tokenize_pairs(tok, pairs, max_length=128, eos_token_id=EOS)
    assert [tp.index for tp in out] == [0, 3] and [tp.source for tp in out] == ["a", "d"]
    assert (stats.total, stats.kept, stats.dropped_no_response) == (4, 2, 2)
    assert tokenize_pair(tok, pairs[1], max_length=128, eos_token_id=EOS) is None


def test_empty_prompt_first_response_token_not_counted(tok):
    """With no prompt the first response token sits at t = 0; a one-token response still
    has its EOS counted (t = 1), so it is kept."""
    s = tokenize_prompt_response(tok, "", " hi", max_length=8, eos_token_id=EOS)
    assert s.prompt_len == 0 and s.input_ids == enc(tok, " hi") + [EOS]


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="max_length"):
        tokenize_prompt_response(tok, "a", "b", max_length=1, eos_token_id=EOS)
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_prompt_response(tok, "a", "b", max_length=8, eos_token_id=EOS, max_prompt_length=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_pairs(tok, [], max_length=8, eos_token_id=-1)


# --- pairs -----------------------------------------------------------------------------------


def test_pair_shares_prompt_tokens(tok):
    pair = PreferencePair(HH_PROMPT, HH_CHOSEN, HH_REJECTED, "src")
    tp = tokenize_pair(tok, pair, max_length=512, eos_token_id=EOS, index=7)
    assert tp.index == 7 and tp.source == "src"
    n = tp.prompt_len
    assert n == len(enc(tok, HH_PROMPT))
    assert tp.chosen_ids[:n] == tp.rejected_ids[:n] == enc(tok, HH_PROMPT)
    check_mask_layout(tp.chosen_ids, tp.chosen_mask, n)
    check_mask_layout(tp.rejected_ids, tp.rejected_mask, n)
    assert tp.chosen_ids[-1] == tp.rejected_ids[-1] == EOS
    assert tp.length == len(tp.chosen_ids)


def test_pair_truncation_shares_prompt_and_fits_longer_response(tok):
    """Truncated for the longer (chosen) response: both sides keep the same, shorter prompt."""
    pair = PreferencePair(HH_PROMPT, HH_CHOSEN, HH_REJECTED)
    c = enc(tok, HH_CHOSEN)
    tp = tokenize_pair(tok, pair, max_length=len(c) + 1 + 6, eos_token_id=EOS)
    assert tp.prompt_len == 6 and tp.prompt_truncated and not tp.response_truncated
    assert tp.chosen_ids[:6] == tp.rejected_ids[:6] == enc(tok, HH_PROMPT)[-6:]
    assert len(tp.chosen_ids) == len(c) + 7 and len(tp.rejected_ids) < len(tp.chosen_ids)


def test_pair_fallback_on_one_side(tok):
    pair = PreferencePair("Hello wor", "ld", " there")
    stats = TokenizeStats()
    tp = tokenize_pair(tok, pair, max_length=32, eos_token_id=EOS, stats=stats)
    assert tp.boundary_fallbacks == 1 and stats.boundary_fallbacks == 1
    assert tok.decode(response_part(tp.chosen_ids, tp.chosen_mask)[:-1]) == "ld"
    assert tok.decode(response_part(tp.rejected_ids, tp.rejected_mask)[:-1]) == " there"
    assert tp.chosen_ids[: tp.prompt_len] == tp.rejected_ids[: tp.prompt_len] == enc(tok, "Hello wor")


def test_tokenize_pairs_matches_tokenize_pair(tok):
    pairs = [
        PreferencePair(HH_PROMPT, HH_CHOSEN, HH_REJECTED, "0"),
        PreferencePair("Hello wor", "ld", " there", "1"),
        PreferencePair(HH_PROMPT * 3, " A long " * 10, " B", "2"),
        PreferencePair(HH_PROMPT, "", " x", "3"),
        PreferencePair("Q: 12", "34", " 5", "4"),
    ]
    kw = dict(max_length=48, eos_token_id=EOS, max_prompt_length=30)
    out, stats = tokenize_pairs(tok, pairs, chunk_size=2, **kw)
    one_stats = TokenizeStats()
    one = [tokenize_pair(tok, p, index=i, stats=one_stats, **kw) for i, p in enumerate(pairs)]
    assert out == [tp for tp in one if tp is not None]
    assert stats == one_stats
    assert stats.total == 5 and stats.kept == 4 and stats.boundary_fallbacks == 1


def test_tokenize_pairs_progress_flag(tok):
    out, stats = tokenize_pairs(tok, [PreferencePair("a", " b", " c")], max_length=8, eos_token_id=EOS, progress=True)
    assert stats.kept == 1 and len(out) == 1


# --- property test ---------------------------------------------------------------------------

PROPERTY_EXAMPLES = 300
_tried = {"n": 0}


def _check_sequence(tok, prompt, response, s, max_length):
    if s is None:
        return
    ids, mask, n = s.input_ids, s.response_mask, s.prompt_len
    assert len(ids) <= max_length
    check_mask_layout(ids, mask, n)
    # the prompt part is the end of the prompt's own encoding: no response token in it
    p = enc(tok, prompt)
    assert ids[:n] == p[len(p) - n :]
    # the response part is the start of the response's tokens (+ EOS): no prompt token in it
    full = enc(tok, prompt + response)
    resp = full[len(p) :] if full[: len(p)] == p else enc(tok, response)
    assert s.boundary_fallback == (full[: len(p)] != p)
    assert ids[n:] == (resp + [EOS])[: len(ids) - n]
    counted = sum(mask[1:])
    assert counted >= 1
    # SmolLM's vocab lacks 21 of the 256 byte symbols (some control bytes, lead bytes of rare
    # 4-byte UTF-8 characters): such bytes are silently dropped by the tokenizer itself, so
    # compare decoded text only when the texts survive a round trip on their own
    def round_trips(text):
        return tok.decode(enc(tok, text)) == text

    if not s.prompt_truncated and not s.response_truncated and round_trips(prompt) and round_trips(response):
        assert tok.decode(ids[:n]) == prompt
        assert tok.decode(ids[n:-1]) == response


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.text(max_size=40),
    chosen=st.text(max_size=40),
    rejected=st.text(max_size=40),
    max_length=st.integers(min_value=2, max_value=40),
    max_prompt_length=st.none() | st.integers(min_value=1, max_value=40),
)
def _property(tok, prompt, chosen, rejected, max_length, max_prompt_length):
    _tried["n"] += 1
    kw = dict(max_length=max_length, eos_token_id=EOS, max_prompt_length=max_prompt_length)
    for response in (chosen, rejected):
        _check_sequence(tok, prompt, response, tokenize_prompt_response(tok, prompt, response, **kw), max_length)
    tp = tokenize_pair(tok, PreferencePair(prompt, chosen, rejected), **kw)
    if tp is None:
        return
    n = tp.prompt_len
    assert tp.chosen_ids[:n] == tp.rejected_ids[:n]
    for ids, mask in ((tp.chosen_ids, tp.chosen_mask), (tp.rejected_ids, tp.rejected_mask)):
        assert len(ids) <= max_length
        check_mask_layout(ids, mask, n)
        assert sum(mask[1:]) >= 1


def test_property_300_random_texts_mask_never_covers_prompt(tok):
    """Hypothesis: 300 arbitrary (prompt, chosen, rejected, max_length >= 2, max_prompt_length):
    the result is None, or lengths <= max_length, the mask is exactly the response tokens
    (never a prompt token), and at least one response token is counted."""
    _tried["n"] = 0
    _property(tok)
    print(f"hypothesis tried {_tried['n']} examples")
    assert _tried["n"] >= PROPERTY_EXAMPLES


# --- batching --------------------------------------------------------------------------------


def _pair(index, prompt, chosen, rejected):
    return TokenizedPair(
        index=index,
        source="",
        chosen_ids=prompt + chosen,
        chosen_mask=[0] * len(prompt) + [1] * len(chosen),
        rejected_ids=prompt + rejected,
        rejected_mask=[0] * len(prompt) + [1] * len(rejected),
        prompt_len=len(prompt),
    )


def test_collate_pairs():
    batch = [_pair(10, [5, 6], [7, 0], [8, 9, 9, 0]), _pair(3, [5], [7, 7, 7, 7, 7, 0], [4, 0])]
    out = collate_pairs(batch, pad_token_id=0)
    assert set(out) == {"input_ids", "attention_mask", "response_mask", "pair_index"}
    for k in ("input_ids", "attention_mask", "response_mask"):
        assert out[k].shape == (4, 7) and out[k].dtype == torch.int64  # longest: 1 + 6
    assert out["pair_index"].tolist() == [10, 3] and out["pair_index"].dtype == torch.int64
    assert out["input_ids"].tolist() == [
        [5, 6, 7, 0, 0, 0, 0],  # chosen of pair 0
        [5, 7, 7, 7, 7, 7, 0],  # chosen of pair 1
        [5, 6, 8, 9, 9, 0, 0],  # rejected of pair 0
        [5, 4, 0, 0, 0, 0, 0],  # rejected of pair 1
    ]
    assert out["attention_mask"].tolist() == [
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0, 0],
    ]
    assert out["response_mask"].tolist() == [
        [0, 0, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 0, 0],
    ]
    # a distinct pad id shows where padding went
    assert collate_pairs(batch, pad_token_id=99)["input_ids"][3].tolist() == [5, 4, 0, 99, 99, 99, 99]


def test_collate_real_pairs(tok):
    pairs = [PreferencePair(HH_PROMPT, HH_CHOSEN, HH_REJECTED), PreferencePair("Hi", " there", " you")]
    out, _ = tokenize_pairs(tok, pairs, max_length=512, eos_token_id=EOS)
    b = collate_pairs(out, pad_token_id=EOS)
    assert b["input_ids"].shape == (4, out[0].length)
    lengths = [len(tp.chosen_ids) for tp in out] + [len(tp.rejected_ids) for tp in out]
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert bool((b["response_mask"] <= b["attention_mask"]).all())


def test_collate_sequences(tok):
    seqs = [
        tokenize_prompt_response(tok, HH_PROMPT, HH_CHOSEN, max_length=512, eos_token_id=EOS),
        tokenize_prompt_response(tok, "Hi", " there", max_length=512, eos_token_id=EOS),
    ]
    b = collate_sequences(seqs, pad_token_id=EOS)
    assert set(b) == {"input_ids", "attention_mask", "response_mask"}
    T = len(seqs[0])
    assert all(v.shape == (2, T) and v.dtype == torch.int64 for v in b.values())
    assert b["input_ids"][1, : len(seqs[1])].tolist() == seqs[1].input_ids
    assert b["attention_mask"][1].tolist() == [1] * len(seqs[1]) + [0] * (T - len(seqs[1]))
    assert b["response_mask"][1].tolist() == seqs[1].response_mask + [0] * (T - len(seqs[1]))


def test_collate_empty_batch_raises():
    with pytest.raises(ValueError):
        collate_pairs([], pad_token_id=0)


# --- length-grouped order ----------------------------------------------------------------


def test_length_grouped_order_is_deterministic_permutation():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1003)]
    order = length_grouped_order(lengths, batch_size=8, seed=1)
    assert sorted(order) == list(range(1003))
    assert order == length_grouped_order(lengths, batch_size=8, seed=1)
    assert order != length_grouped_order(lengths, batch_size=8, seed=2)
    # only the last batch is short
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 1003 % 8

    def padding(o):
        batches = (o[i : i + 8] for i in range(0, len(o), 8))
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = list(range(1003))
    random.Random(1).shuffle(shuffled)
    assert padding(order) < 0.2 * padding(shuffled)
    # still random: the batch order is not sorted by length
    first_lengths = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert first_lengths != sorted(first_lengths) and first_lengths != sorted(first_lengths, reverse=True)


def test_length_grouped_order_edge_cases():
    assert length_grouped_order([], batch_size=4, seed=0) == []
    assert sorted(length_grouped_order([3, 1, 2], batch_size=8, seed=0)) == [0, 1, 2]
    with pytest.raises(ValueError):
        length_grouped_order([1, 2], batch_size=0, seed=0)


def test_without_end_of_turn_masks_only_a_closing_eos():
    from dpo.tokenization import TokenizedPair, without_end_of_turn

    pair = TokenizedPair(index=0, source="t", chosen_ids=[5, 6, 7, 2], chosen_mask=[0, 0, 1, 1],
                         rejected_ids=[5, 6, 9, 2], rejected_mask=[0, 0, 1, 1], prompt_len=2)
    masked = without_end_of_turn(pair, eos_token_id=2)
    assert masked.rejected_mask == [0, 0, 1, 0] and masked.rejected_ids == pair.rejected_ids
    assert masked.chosen_mask == pair.chosen_mask  # the chosen side keeps its end of turn
    assert without_end_of_turn(pair, 2, side="chosen").chosen_mask == [0, 0, 1, 0]
    cut = TokenizedPair(index=0, source="t", chosen_ids=[5, 6, 7, 8], chosen_mask=[0, 0, 1, 1],
                        rejected_ids=[5, 6, 9, 8], rejected_mask=[0, 0, 1, 1], prompt_len=2)
    assert without_end_of_turn(cut, 2) is cut  # truncated: no end of turn to mask
    alone = TokenizedPair(index=0, source="t", chosen_ids=[5, 7, 2], chosen_mask=[0, 1, 1],
                          rejected_ids=[5, 2], rejected_mask=[0, 1], prompt_len=1)
    assert without_end_of_turn(alone, 2) is alone  # the EOS is its only counted token: kept
    with pytest.raises(ValueError, match="side must be"):
        without_end_of_turn(pair, 2, side="both")
