"""Tests for dpo.chat: HH transcripts to messages, chat-template rendering of pairs (checked
against transformers' apply_chat_template), the response mask after tokenization, and the
report on every shipped HH-RLHF pair."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from dpo.chat import CHAT_SKIP_REASONS, ChatReport, apply_chat_format, hh_to_messages, pair_messages
from dpo.data import DataError, PreferencePair, load_preferences, load_preferences_with_report
from dpo.tokenization import tokenize_pairs
from smollm.tokenizer import SmolTokenizer

# SmolLM2-135M-Instruct's chat template (tokenizer_config.json), ChatML with a default system turn
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

HH_PROMPT = ("\n\nHuman: What are some good vegetables to grow in a small garden?"
             "\n\nAssistant: Tomatoes, lettuce and herbs do well in small spaces. "
             "\n\nHuman:   What about in the shade?\n\nAssistant:")
PAIR = PreferencePair(HH_PROMPT, " Leafy greens like spinach and kale tolerate shade.", " I don't know.",
                      source="garden.jsonl:3")


def smol(tokenizer_json, template=CHATML, special=SPECIAL) -> SmolTokenizer:
    return SmolTokenizer(Tokenizer.from_file(str(tokenizer_json)), dict(special), chat_template=template)


@pytest.fixture(scope="module")
def tok(tokenizer_json) -> SmolTokenizer:
    return smol(tokenizer_json)


@pytest.fixture(scope="module")
def hh_pairs_and_report(hh_files):
    return load_preferences_with_report(hh_files)


# ---------------------------------------------------------------------------- hh_to_messages

def test_hh_to_messages_multi_turn():
    assert hh_to_messages(HH_PROMPT) == [
        {"role": "user", "content": "What are some good vegetables to grow in a small garden?"},
        {"role": "assistant", "content": "Tomatoes, lettuce and herbs do well in small spaces."},
        {"role": "user", "content": "What about in the shade?"},  # stripped; the empty final turn is gone
    ]


def test_hh_to_messages_keeps_turns_as_they_are():
    text = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nAssistant: \n\nAssistant: Anything else?\n\nAssistant:"
    assert [(m["role"], m["content"]) for m in hh_to_messages(text)] == [
        ("user", "Hi"), ("assistant", "Hello."), ("assistant", ""), ("assistant", "Anything else?")]
    assert hh_to_messages("\n\nHuman: \n\nAssistant:") == [{"role": "user", "content": ""}]


@pytest.mark.parametrize("text, message", [
    ("\n\nHuman: Hi\n\nAssistant: Hello.", "must end with '\\\\n\\\\nAssistant:'"),
    ("Hi\n\nHuman: Hi\n\nAssistant:", "must start with '\\\\n\\\\nHuman:'"),
    ("\n\nAssistant: Hi\n\nHuman: Yo\n\nAssistant:", "must start with '\\\\n\\\\nHuman:'"),
    ("\n\nAssistant:", "must start with '\\\\n\\\\nHuman:'"),
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "must end with"),
])
def test_hh_to_messages_errors_name_the_source(text, message):
    with pytest.raises(DataError, match=message) as e:
        hh_to_messages(text, source="helpful-base/test.jsonl.gz:17")
    assert str(e.value).startswith("helpful-base/test.jsonl.gz:17: not an HH prompt: ")
    assert e.value.reason == "unparsable"


def test_pair_messages_of_hh_and_conversational_pairs():
    prompt, chosen, rejected = pair_messages(PAIR)
    assert prompt == hh_to_messages(HH_PROMPT)
    assert chosen == [{"role": "assistant", "content": "Leafy greens like spinach and kale tolerate shade."}]
    assert rejected == [{"role": "assistant", "content": "I don't know."}]


# ---------------------------------------------------------------------------- rendering

def test_multi_turn_hh_renders_to_chatml_exactly(tok):
    (pair,), report = apply_chat_format([PAIR], tok)
    assert pair.prompt == (
        SYSTEM
        + "<|im_start|>user\nWhat are some good vegetables to grow in a small garden?<|im_end|>\n"
        + "<|im_start|>assistant\nTomatoes, lettuce and herbs do well in small spaces.<|im_end|>\n"
        + "<|im_start|>user\nWhat about in the shade?<|im_end|>\n"
        + "<|im_start|>assistant\n")
    # the answer without the end of turn: tokenization appends EOS (<|im_end|>) itself
    assert pair.chosen == "Leafy greens like spinach and kale tolerate shade."
    assert pair.rejected == "I don't know."
    assert pair.source == PAIR.source
    assert (report.total, report.rendered, report.total_skipped, report.end_of_turn_kept) == (1, 1, 0, 0)
    assert str(report) == "rendered 1 of 1 pairs, skipped 0"
    # rendering the result again changes nothing: it keeps the messages it was made from
    assert apply_chat_format([pair], tok)[0] == [pair]


def test_conversational_pairs_render_their_own_messages(tok, tmp_path):
    import json

    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fruit?"}],
           "chosen": [{"role": "assistant", "content": "An apple."}, {"role": "assistant", "content": "Or a pear."}],
           "rejected": [{"role": "assistant", "content": "A car."}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(row) + "\n")
    (pair,) = load_preferences(tmp_path / "c.jsonl")
    (out,), _ = apply_chat_format([pair], tok)
    # the row's own system message replaces the template's default one
    assert out.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nFruit?<|im_end|>\n"
                          "<|im_start|>assistant\n")
    assert out.chosen == "An apple.<|im_end|>\n<|im_start|>assistant\nOr a pear."
    assert out.rejected == "A car."


def test_no_chat_template_is_an_error(tokenizer_json):
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_format([PAIR], smol(tokenizer_json, template=None))
    with pytest.raises(ValueError, match="has no chat template"):
        apply_chat_format([PAIR], Tokenizer.from_file(str(tokenizer_json)))


def test_unrenderable_pairs_are_skipped_and_counted_or_raise(tokenizer_json, tok):
    # a template that marks the last message: the prompt renders differently once an answer follows
    marks_last = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}<|im_start|>{{ m['role'] }}\n"
                  "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% endif %}")
    bad_prompt = PreferencePair("Human: hi\nAssistant:", " a", " b", source="odd.jsonl:2")
    empty_answer = PreferencePair("\n\nHuman: hi\n\nAssistant:", " ", " b", source="odd.jsonl:3")
    pairs = [PAIR, bad_prompt, empty_answer]
    out, report = apply_chat_format(pairs, tok)
    assert out[0] == apply_chat_format([PAIR], tok)[0][0] and len(out) == 1
    assert report.skipped == {"unparsable": 1, "empty": 1} and report.total == 3 and report.rendered == 1
    assert report.examples == [
        "unparsable: odd.jsonl:2: not an HH prompt: it must end with '\\n\\nAssistant:', the turn to be "
        "answered; it ends with 'Human: hi\\nAssistant:'",
        "empty: odd.jsonl:3: field 'chosen': the answer renders to nothing"]
    assert set(report.skipped) <= set(CHAT_SKIP_REASONS)
    with pytest.raises(DataError, match=r"^odd.jsonl:2: not an HH prompt"):
        apply_chat_format(pairs, tok, strict=True)

    out, report = apply_chat_format(pairs, smol(tokenizer_json, template=marks_last))
    assert out == [] and report.skipped == {"boundary": 2, "unparsable": 1}
    with pytest.raises(DataError, match=r"^garden.jsonl:3: field 'chosen': the chat template renders the "
                                        r"prompt differently once the answer follows") as e:
        apply_chat_format(pairs, smol(tokenizer_json, template=marks_last), strict=True)
    assert e.value.reason == "boundary"


def test_a_template_that_refuses_is_counted(tokenizer_json):
    """Templates like Mistral's raise on two turns of one role in a row; HH-RLHF has some."""
    alternate = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                 "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    twice = PreferencePair("\n\nHuman: Hi\n\nAssistant: Hello.\n\nAssistant: Hm?\n\nAssistant:", " a", " b",
                           source="helpful-base/test.jsonl.gz:356")
    out, report = apply_chat_format([PAIR, twice], smol(tokenizer_json, template=alternate))
    assert len(out) == 1 and report.skipped == {"template_error": 1}
    assert report.examples == ["template_error: helpful-base/test.jsonl.gz:356: the chat template failed: "
                               "chat template: Conversation roles must alternate user/assistant/user/assistant/..."]
    with pytest.raises(DataError, match="roles must alternate"):
        apply_chat_format([twice], smol(tokenizer_json, template=alternate), strict=True)


def test_end_of_turn_other_than_eos_is_kept_and_counted(tokenizer_json):
    """A template that does not end turns with the EOS text: nothing is removed, and it is counted."""
    base = smol(tokenizer_json, special={"eos_token": "<|endoftext|>"})
    (pair,), report = apply_chat_format([PAIR], base)
    assert pair.chosen == "Leafy greens like spinach and kale tolerate shade.<|im_end|>\n"
    assert report.end_of_turn_kept == 2 and "did not end with the EOS text" in str(report)


def test_report_str_lists_reasons_and_examples():
    report = ChatReport(total=3, rendered=1)
    report.add_skip(DataError("bad", reason="boundary", path="x:1"))
    report.add_skip(DataError("bad", reason="unparsable", path="x:2"))
    text = str(report)
    assert text.startswith("rendered 1 of 3 pairs, skipped 2")
    assert "unparsable" in text and "boundary" in text and "boundary: x:1: bad" in text


# ---------------------------------------------------------------------------- real data

def test_every_shipped_pair_renders_or_is_counted(tok, hh_pairs_and_report):
    pairs, load_report = hh_pairs_and_report
    rendered, report = apply_chat_format(pairs, tok)
    # 4,666 rows: the loader counts the unusable ones, the chat report every pair it could not render
    assert load_report.loaded + load_report.total_skipped == 4666
    assert report.total == load_report.loaded == 4642
    assert report.rendered + report.total_skipped == report.total
    assert report.rendered == len(rendered) == 4642 and report.end_of_turn_kept == 0  # ChatML: all of them
    assert [p.source for p in rendered] == [p.source for p in pairs]
    for before, after in zip(pairs, rendered):
        assert after.prompt.startswith(SYSTEM + "<|im_start|>user\n")
        assert after.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert (after.chosen, after.rejected) == (before.chosen.strip(), before.rejected.strip())


def _unusual_turns(messages) -> bool:
    return (any(a["role"] == b["role"] for a, b in zip(messages, messages[1:]))
            or not all(m["content"] for m in messages))


def test_rendering_equals_transformers(tok, tokenizer_json, hh_pairs_and_report):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **SPECIAL)
    hf.chat_template = CHATML
    all_pairs = hh_pairs_and_report[0]
    # 300 at random, and every prompt with two turns of one role in a row or an empty turn
    odd = [p for p in all_pairs if _unusual_turns(hh_to_messages(p.prompt))]
    pairs = random.Random(0).sample(all_pairs, 300) + odd
    assert len(odd) >= 10
    rendered, report = apply_chat_format(pairs, tok)
    assert report.rendered == len(pairs)
    for pair, out in zip(pairs, rendered):
        messages = hh_to_messages(pair.prompt)
        assert out.prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for answer, text in ((pair.chosen, out.chosen), (pair.rejected, out.rejected)):
            full = hf.apply_chat_template(messages + [{"role": "assistant", "content": answer.strip()}],
                                          tokenize=False)
            assert out.prompt + text + "<|im_end|>\n" == full


def test_response_mask_covers_the_answer_and_eos(tok, hh_pairs_and_report):
    pairs = random.Random(1).sample(hh_pairs_and_report[0], 200)
    rendered, _ = apply_chat_format(pairs, tok)
    tokenized, stats = tokenize_pairs(tok, rendered, max_length=100_000, eos_token_id=tok.eos_token_id)
    assert stats.kept == 200 and stats.boundary_fallbacks == 0
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>") == 2
    for tp in tokenized:
        out = rendered[tp.index]
        for ids, mask, answer in ((tp.chosen_ids, tp.chosen_mask, out.chosen),
                                  (tp.rejected_ids, tp.rejected_mask, out.rejected)):
            response = [i for i, m in zip(ids, mask) if m]
            prompt = [i for i, m in zip(ids, mask) if not m]
            assert tok.decode(response, skip_special_tokens=False) == answer + "<|im_end|>"
            assert tok.decode(prompt, skip_special_tokens=False) == out.prompt
            assert prompt[-4:] == tok.encode_ids("<|im_start|>assistant\n")  # the turn opens the prompt
