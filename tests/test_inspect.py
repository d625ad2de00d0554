"""`python -m dpo.inspect`: pairs shown as dpo.train tokenizes them, with the real SmolLM tokenizer.

A hand-made pair's prompt/answer boundary and mask are checked against the tokenizer itself; an
over-long pair is reported as truncated, a pair without an answer as dropped; the usual mistakes
(a chat template applied twice, a doubled BOS or EOS) are visible as warnings and counted; every
data format and both chat-template settings go through the same path as dpo.train.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpo.config import TrainConfig
from dpo.data import PreferencePair
from dpo.inspect import TokenView, inspect_split, main, pair_report, report, summary_lines
from dpo.train import tokenize_settings
from dpo.tokenization import tokenize_pairs
from smollm import load_tokenizer

from test_chat import CHATML, SPECIAL, SYSTEM

PROMPT = "\n\nHuman: What is 2+2?\n\nAssistant:"
PAIR = {"prompt": PROMPT, "chosen": " It is 4.", "rejected": " Five."}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory, tokenizer_json) -> Path:
    """The real tokenizer with SmolLM2-Instruct's ChatML template and special tokens."""
    d = tmp_path_factory.mktemp("chatml")
    shutil.copyfile(tokenizer_json, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, **SPECIAL}), encoding="utf-8")
    return d


def run_main(capsys, data: Path, tokenizer: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["--data", str(data), "--tokenizer", str(tokenizer), "--model", "unused", "--no-filter",
                 "--num-pairs", "4", "--eval-pairs", "0", "--no-progress", "--width", "100", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_hand_made_pair_boundary_and_mask(tmp_path, capsys, tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    data = write_jsonl(tmp_path / "one.jsonl", [PAIR])
    code, out, err = run_main(capsys, data, tokenizer_json, "--num", "1")
    assert code == 0, err
    n = len(tok.encode_ids(PROMPT))  # the prompt alone: the boundary
    chosen = tok.encode_ids(PROMPT + PAIR["chosen"])[n:] + [tok.eos_token_id]
    assert f"prompt: {n} tokens (positions 0-{n - 1}), masked: the loss does not count them" in out
    assert (f"chosen: {len(chosen)} answer tokens (positions {n}-{n + len(chosen) - 1}); the loss counts "
            f"{len(chosen)} of them; ends with EOS ⟨|endoftext|⟩, appended by tokenization") in out
    lines = out.splitlines()
    prompt_row = lines[lines.index(next(l for l in lines if l.startswith("prompt: "))) + 1]
    human = tok.token_to_id("Human")
    assert prompt_row.startswith(f"    0  198 ↵ │ 198 ↵ │ {human} Human │ ")  # "\n\nHuman:": newlines visible
    chosen_row = lines[lines.index(next(l for l in lines if l.startswith("chosen: "))) + 1]
    view = TokenView(tok)
    assert chosen_row == f"{n:>5}  " + " │ ".join(f"{i} {view.piece(i)}" for i in chosen)
    assert "·It" in chosen_row and chosen_row.endswith("0 ⟨|endoftext|⟩")
    # the masked positions are exactly the prompt, as dpo.train gets them
    config = TrainConfig(data=[str(data)], num_pairs=1, eval_pairs=0, filter=False)
    (pair,), _ = tokenize_pairs(tok, [PreferencePair(**PAIR)], **tokenize_settings(config, tok))
    assert pair.prompt_len == n and pair.chosen_mask == [0] * n + [1] * len(chosen)
    assert pair.chosen_ids == tok.encode_ids(PROMPT) + chosen
    assert "pairs that lost a side (no counted answer token left, dropped): 0" in out


def test_chat_template_rendering_is_visible(tmp_path, capsys, chatml_dir):
    data = write_jsonl(tmp_path / "one.jsonl", [PAIR])
    code, out, err = run_main(capsys, data, chatml_dir, "--num", "1")
    assert code == 0, err
    assert "chat template: the tokenizer's chat template" in out
    assert "  ⟨|im_start|⟩system↵\n  You·are·a·helpful·AI" in out  # the rendered prompt
    assert "  ⟨|im_start|⟩user↵\n  What·is·2+2?⟨|im_end|⟩↵\n  ⟨|im_start|⟩assistant↵\n" in out
    assert "1 ⟨|im_start|⟩ │ 9690 system │ 198 ↵" in out  # token by token, specials bracketed
    assert "ends with EOS ⟨|im_end|⟩, appended by tokenization" in out
    assert "pairs with a warning: none" in out


def test_an_over_long_pair_is_reported_truncated(tmp_path, capsys, tokenizer_json):
    long_prompt = "\n\nHuman: " + "Tell me about gardens. " * 20 + "\n\nAssistant:"
    rows = [{"prompt": long_prompt, "chosen": " Gardens " + "grow plants and flowers. " * 12, "rejected": " No."}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    code, out, err = run_main(capsys, data, tokenizer_json, "--max-length", "32")
    assert code == 0, err
    tok = load_tokenizer(tokenizer_json)
    full_prompt = len(tok.encode_ids(long_prompt))
    assert f"prompt: no token left; cut from the left to fit --max-length 32 (was {full_prompt})" in out
    assert "chosen: 32 answer tokens (positions 0-31); the loss counts 31 of them (position 0 is predicted by " \
           "nothing); cut by --max-length: no EOS, the answer stops mid-way (was " in out
    assert "truncated prompts: 1; pairs with a truncated answer: 1 (--max-length 32)" in out
    # a prompt cut from the left, the answer kept whole
    data = write_jsonl(tmp_path / "long2.jsonl", [{**rows[0], "chosen": " Gardens grow."}])
    code, out, _ = run_main(capsys, data, tokenizer_json, "--max-length", "32")
    assert code == 0 and f"cut from the left to fit --max-length 32 (was {full_prompt})" in out
    assert "truncated prompts: 1; pairs with a truncated answer: 0" in out


def test_a_pair_that_loses_a_side_is_reported_dropped(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    config = TrainConfig(num_pairs=2, eval_pairs=0, filter=False, max_length=64)
    raw = [PreferencePair(**PAIR, source="a.jsonl:1"), PreferencePair(PROMPT, "", " Five.", source="a.jsonl:2")]
    split = inspect_split(config, tok, raw, "train", templated=False)
    assert [i.tokenized is None for i in split.pairs] == [False, True]
    lines = pair_report(split.pairs[1], "train", TokenView(tok), config, tok, 100)
    assert lines[0].startswith("━━ train pair 1 · a.jsonl:2 · dropped: a side kept no counted answer token")
    assert "pairs that lost a side (no counted answer token left, dropped): 1" in "\n".join(
        summary_lines(split, config, templated=False))


def test_doubled_bos_and_eos_and_a_template_twice_are_visible(tmp_path, capsys, chatml_dir):
    chatml_prompt = SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    rows = [
        {"prompt": SYSTEM + chatml_prompt, "chosen": "4", "rejected": "5"},  # the template's system turn twice
        {"prompt": "<|im_start|>" + chatml_prompt, "chosen": "4", "rejected": "5"},  # BOS (<|im_start|>) doubled
        {"prompt": chatml_prompt, "chosen": "It is 4.<|im_end|>", "rejected": "5"},  # EOS in the data, and appended
        {"prompt": chatml_prompt, "chosen": "4", "rejected": "5"},  # right
    ]
    data = write_jsonl(tmp_path / "rendered.jsonl", rows)
    code, out, err = run_main(capsys, data, chatml_dir, "--chat-template", "none", "--num", "4")
    assert code == 0, err
    blocks = out.split("━━ train pair ")[1:]
    assert len(blocks) == 4
    warnings = {}
    for block in blocks:
        source_line = int(block.split(" · ")[1].split(":")[-1])
        warnings[source_line] = [l for l in block.splitlines() if l.startswith("warning: ")]
    assert warnings[1] == ["warning: the prompt's first turn (⟨|im_start|⟩system↵You·are·a·helpful·AI…) appears 2 "
                           "times: a template applied twice?"]
    assert warnings[2] == ["warning: two BOS tokens ⟨|im_start|⟩ in a row (chosen)",
                           "warning: two BOS tokens ⟨|im_start|⟩ in a row (rejected)"]
    assert warnings[3] == ["warning: the chosen answer ends with EOS ⟨|im_end|⟩ twice: the data already ends with "
                           "it, and tokenization appends another"]
    assert warnings[4] == []
    assert ("pairs with a warning: two BOS in a row 1, EOS twice at the end of an answer 1, the prompt's first turn "
            "repeated 1") in out


def test_data_rendered_then_templated_again_is_a_warning(tmp_path, capsys, chatml_dir):
    rows = [{"prompt": [{"role": "user", "content": "<|im_start|>user\nHi<|im_end|>"}],  # already ChatML text
             "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    data = write_jsonl(tmp_path / "conversational.jsonl", rows)
    code, out, err = run_main(capsys, data, chatml_dir, "--num", "1")
    assert code == 0, err
    assert ("warning: the data already holds special tokens (⟨|im_end|⟩, ⟨|im_start|⟩) and the chat template "
            "renders it again: a template applied twice?") in out
    assert "special tokens in the data, rendered again by the template 1" in out


@pytest.mark.parametrize("template", ["auto", "none"])
@pytest.mark.parametrize("layout", ["hh", "prompt-chosen-rejected", "conversational", "implicit-prompt"])
def test_every_data_format_and_template_setting(tmp_path, capsys, chatml_dir, layout, template):
    question, answer, other = "What is 2+2?", "It is 4.", "Five."
    row = {"hh": {"chosen": f"\n\nHuman: {question}\n\nAssistant: {answer}",
                  "rejected": f"\n\nHuman: {question}\n\nAssistant: {other}"},
           "prompt-chosen-rejected": {"prompt": f"\n\nHuman: {question}\n\nAssistant:", "chosen": f" {answer}",
                                      "rejected": f" {other}"},
           "conversational": {"prompt": [{"role": "user", "content": question}],
                              "chosen": [{"role": "assistant", "content": answer}],
                              "rejected": [{"role": "assistant", "content": other}]},
           "implicit-prompt": {"chosen": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}],
                               "rejected": [{"role": "user", "content": question},
                                            {"role": "assistant", "content": other}]}}[layout]
    data = write_jsonl(tmp_path / "data.jsonl", [row])
    code, out, err = run_main(capsys, data, chatml_dir, "--chat-template", template, "--num", "1")
    assert code == 0, err
    if template == "auto":
        assert "⟨|im_start|⟩assistant↵" in out and "What·is·2+2?⟨|im_end|⟩↵" in out
    else:
        assert "Human:·What·is·2+2?↵" in out and "⟨|im_start|⟩" not in out
    assert "It" in out and "pairs with a warning: none" in out and "1 pairs rendered, 1 kept, 1 trained on" in out


def test_held_out_split_problems_only_and_markdown(tmp_path, capsys, tokenizer_json):
    rows = [{**PAIR, "chosen": f" It is {k}."} for k in range(10)]
    rows[7]["prompt"] = "\n\nHuman: " + "a long question " * 30 + "\n\nAssistant:"
    data = write_jsonl(tmp_path / "ten.jsonl", rows)

    def run(*extra: str) -> str:
        code = main(["--data", str(data), "--tokenizer", str(tokenizer_json), "--no-filter", "--max-length", "40",
                     *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    out = run("--num-pairs", "6", "--eval-pairs", "4", "--split", "held-out", "--num", "9", "--width", "60")
    assert out.count("━━ held-out pair ") == 4 and out.count(" · evaluated on ") == 4
    token_rows = [line for line in out.splitlines() if line[:7].strip().isdigit()]
    assert token_rows and all(len(line) <= 60 for line in token_rows)  # laid out to the width
    out = run("--num-pairs", "10", "--eval-pairs", "0", "--problems", "--num", "5")
    assert out.count("━━ train pair ") == 1 and "ten.jsonl:8 · trained on" in out and "cut from the left" in out
    out = run("--num-pairs", "10", "--eval-pairs", "0", "--num", "1", "--format", "md")
    assert "\n## train pair 0 · " in out and "\n## counts\n" in out and out.count("```text") >= 2


def test_a_character_split_over_tokens_shows_its_bytes(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    view = TokenView(tok)
    ids = tok.encode_ids("🤗 ok")
    pieces = [view.piece(i) for i in ids]
    assert pieces[-1] == "·ok" and all("\\x" in p for p in pieces[:-1])
    assert "".join(pieces[:-1]) == "\\xf0\\x9f\\xa4\\x97"  # U+1F917's four bytes, over three tokens


def test_user_errors_are_one_line(tmp_path, capsys, tokenizer_json):
    data = write_jsonl(tmp_path / "one.jsonl", [PAIR])
    code, _, err = run_main(capsys, data, tokenizer_json, "--num", "0")
    assert code == 2 and err.strip() == "error: --num must be at least 1, --start at least 0 and --width at least 40"
    code, _, err = run_main(capsys, data, tmp_path / "missing", "--num", "1")
    assert code == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
    code, _, err = run_main(capsys, tmp_path / "nope.jsonl", tokenizer_json)
    assert code == 2 and "nope.jsonl" in err.strip().splitlines()[-1]


def test_report_is_the_function_behind_the_command(tmp_path, tokenizer_json):
    data = write_jsonl(tmp_path / "one.jsonl", [PAIR])
    config = TrainConfig(data=[str(data)], num_pairs=1, eval_pairs=0, filter=False, progress=False)
    text = report(config, load_tokenizer(tokenizer_json), num=1, width=80)
    assert text.startswith("1 train pairs; chat template: none (the tokenizer has no chat template)")
