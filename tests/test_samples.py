"""dpo.samples: batched greedy answers equal one-at-a-time answers, stop ids end them, and
the written files show empty and whitespace-only answers."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import pytest
import torch

from dpo.samples import (Sample, describe_blank, format_sample, generate_samples, last_user_turn,
                         write_samples)
from smollm import generate, load_tokenizer
from tests.model_utils import random_model, small_config


@pytest.fixture(scope="module")
def tok(tokenizer_json):
    return load_tokenizer(tokenizer_json)


@pytest.fixture(scope="module")
def models():
    policy = random_model(small_config(), seed=1)
    reference = random_model(small_config(), seed=2)
    return policy, reference


PROMPTS = [[5, 17, 300, 41, 9], [8, 9], [1000, 2000, 3000, 4000, 5000, 6, 7], [77, 78, 79]]


def test_batched_left_padded_answers_equal_one_prompt_at_a_time(models, tok):
    policy, reference = models
    batched = generate_samples(policy, reference, tok, PROMPTS, max_new_tokens=7, stop_ids=[], batch_size=3)
    single = generate_samples(policy, reference, tok, PROMPTS, max_new_tokens=7, stop_ids=[], batch_size=1)
    assert [s.policy_ids for s in batched] == [s.policy_ids for s in single]
    assert [s.reference_ids for s in batched] == [s.reference_ids for s in single]
    for p, s in zip(PROMPTS, batched):  # and equal plain greedy generation, in the caller's order
        assert s.prompt_ids == p
        assert s.policy_ids == generate(policy, torch.tensor([p]), 7)[0, len(p):].tolist()
        assert len(s.reference_ids) == 7 and not s.reference_stopped and not s.policy_stopped
        assert s.policy == tok.decode(s.policy_ids, skip_special_tokens=True)
    assert batched[0].policy_ids != batched[0].reference_ids  # two different models answered


def test_answers_end_at_a_stop_id_which_is_left_out(models, tok):
    policy, reference = models
    free = generate_samples(policy, reference, tok, PROMPTS[:2], max_new_tokens=8, stop_ids=[], batch_size=2)
    stop = free[0].policy_ids[3]  # the policy's 4th token for prompt 0 becomes a stop id
    first = free[0].policy_ids.index(stop)
    cut = generate_samples(policy, reference, tok, PROMPTS[:2], max_new_tokens=8, stop_ids=[49151, stop],
                           batch_size=2)
    assert cut[0].policy_ids == free[0].policy_ids[:first] and cut[0].policy_stopped
    for s, f in zip(cut, free):  # every answer: cut just before its first stop id, or unchanged
        for ids, full, stopped in ((s.policy_ids, f.policy_ids, s.policy_stopped),
                                   (s.reference_ids, f.reference_ids, s.reference_stopped)):
            assert stop not in ids
            assert stopped == (stop in full)
            assert ids == (full[:full.index(stop)] if stop in full else full)


def test_generation_restores_modes_and_takes_no_grad(models, tok):
    policy, reference = models
    policy.train()
    try:
        samples = generate_samples(policy, reference, tok, PROMPTS[:1], max_new_tokens=2, stop_ids=[0])
        assert policy.training and not reference.training
        assert len(samples) == 1
    finally:
        policy.eval()


def test_empty_prompt_is_an_error(models, tok):
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate_samples(*models, tok, [[1], []], stop_ids=[0])


# --------------------------------------------------------------------------- rendering

CHATML = ("<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
          "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
          "<|im_start|>assistant\n")


def _samples() -> list[Sample]:
    return [
        Sample(prompt=CHATML, reference="An apple.", policy=" " * 128, prompt_ids=[1, 2, 3],
               reference_ids=[10, 11, 12], policy_ids=[216] * 128, reference_stopped=True, policy_stopped=False),
        Sample(prompt="\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Tell me a joke\n\nAssistant:",
               reference="Why did the ```chicken``` cross the road?", policy="", prompt_ids=[4, 5],
               reference_ids=[20, 21], policy_ids=[], reference_stopped=True, policy_stopped=True),
    ]


def test_last_user_turn_of_chatml_hh_and_plain_prompts():
    assert last_user_turn(CHATML) == "Name a fruit."
    hh = "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Tell me\na joke\n\nAssistant:"
    assert last_user_turn(hh) == "Tell me\na joke"
    assert last_user_turn("  just text ") == "just text"


def test_describe_blank():
    assert describe_blank("") == "(empty)"
    assert describe_blank(" " * 128) == '(only whitespace: 128 × " ")'
    assert describe_blank("\n \n\n") == '(only whitespace: 3 × "\\n", 1 × " ")'
    assert describe_blank(" a ") is None


def test_write_samples_writes_readable_md_and_round_tripping_jsonl(tmp_path):
    samples = _samples()
    md, jsonl = write_samples(samples, tmp_path / "run", header="step 125: **collapsed**")
    assert (md.name, jsonl.name) == ("samples.md", "samples.jsonl")
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert rows == [asdict(s) for s in samples]
    assert [Sample(**r) for r in rows] == samples
    text = md.read_text(encoding="utf-8")
    assert "step 125: **collapsed**" in text
    assert '(only whitespace: 128 × " ")' in text and "(empty)" in text
    assert "> Name a fruit." in text and "> Tell me a joke" in text
    assert "An apple." in text and "128 tokens, hit the token limit" in text
    assert "````text\nWhy did the ```chicken``` cross the road?\n````" in text  # a fence the text cannot close
    assert sorted(p.name for p in md.parent.iterdir()) == ["samples.jsonl", "samples.md"]  # no temporary files


def test_format_sample_fits_the_width_and_shows_whitespace():
    collapsed, empty = _samples()
    short = format_sample(collapsed, width=60)
    assert short.splitlines() == ["prompt:    Name a fruit.",
                                  "reference: An apple. [3 tok, stop]",
                                  'policy:    (only whitespace: 128 × " ") [128 tok, limit]']
    long = dataclasses.replace(empty, reference="word " * 100)
    lines = format_sample(long, width=50).splitlines()
    assert all(len(line) <= 50 for line in lines)
    assert lines[1].endswith("… [2 tok, stop]") and lines[2] == "policy:    (empty) [0 tok, stop]"
