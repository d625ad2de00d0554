"""dpo.answers: the statistics a reader sees in answers (end of turn, loops, length, emptiness,
distinct-2), on hand-made answers, and batched greedy answers against one prompt at a time."""
from __future__ import annotations

import math

import pytest
import torch

from dpo.answers import answers_with_streams, distinct_n, greedy_answers, loops, text_stats, words
from smollm import generate, load_tokenizer
from tests.model_utils import random_model, small_config

# --------------------------------------------------------------------------- loops


def test_words_are_lower_cased_without_punctuation_and_keep_contractions():
    assert words("I'm sorry, but I can’t HELP.") == ["i'm", "sorry", "but", "i", "can't", "help"]


def test_a_phrase_that_comes_back_three_times_loops():
    assert loops("I'm a wizard, I'm a wizard, I'm a wizard, I'm a wizard")  # ("i'm","a","wizard","i'm") x3
    assert not loops("I'm a wizard, I'm a wizard, I'm a wizard")  # that 4-gram only twice
    assert loops("the the the the the the")  # 6 words: the 4-gram of "the" starts at 0, 1 and 2
    assert not loops("the the the the the")  # 5 words: only twice


def test_the_old_defaults_rambling_answer_loops_and_a_plain_answer_does_not():
    ramble = ("The Guggenheim Foundation is a non-profit corporation that supports the arts. The Guggenheim "
              "Foundation is a non-profit corporation that is a non-profit corporation that supports the "
              "Guggenheim Foundation is a non-profit corporation.")
    assert loops(ramble)
    assert not loops("Paris is the capital of France. It has been the capital since the 10th century, "
                     "and it is the largest city of the country.")
    assert not loops("")  # no words: empty, not a loop
    assert not loops(" " * 128)


def test_loops_counts_whole_words_not_tokens():
    assert not loops("tracktracktracktracktracktracktracktrack")  # one word (distinct-2 sees this one)


# --------------------------------------------------------------------------- text_stats


def test_ended_and_loop_shares_of_a_policy_that_never_ends():
    texts = ["Sure, here it is.", "It is a thing. It is a thing. It is a thing. It is a thing.", "Fine."]
    stats = text_stats([[1, 2], [3, 4, 5], [6]], texts, ended=[True, False, True])
    assert stats["ended_share"] == pytest.approx(2 / 3)
    assert stats["loop_share"] == pytest.approx(1 / 3)
    assert stats["mean_length"] == pytest.approx(2.0)
    never = text_stats([[1] * 4] * 4, ["word " * 40] * 4, ended=[False] * 4)
    assert never["ended_share"] == 0.0 and never["loop_share"] == 1.0


def test_whitespace_only_answers_are_all_empty():
    stats = text_stats([[216] * 128, [], [198, 198]], [" " * 128, "", "\n\n"])
    assert stats["empty_share"] == 1.0 and stats["loop_share"] == 0.0
    assert stats["mean_length"] == pytest.approx((128 + 0 + 2) / 3)
    assert "ended_share" not in stats  # not known without the ended flags


def test_repeated_word_has_low_distinct_2_and_loops(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    text = "the" + " the" * 39
    ids = tok.encode_ids(text)
    assert len(ids) == 40  # "the", then " the" 39 times
    stats = text_stats([ids], [text])
    assert stats["distinct_2"] == pytest.approx(2 / 39)  # ("the"," the") and (" the"," the") of 39 bigrams
    assert stats["loop_share"] == 1.0 and stats["empty_share"] == 0.0


def test_varied_answers_have_distinct_2_of_one(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    texts = ["Bake the bread at two hundred degrees.", "Paris is the capital of France.", "Use a ladder."]
    ids = [tok.encode_ids(t) for t in texts]
    stats = text_stats(ids, texts, ended=[True, True, True])
    assert stats["distinct_2"] == 1.0 and stats["loop_share"] == 0.0 and stats["ended_share"] == 1.0
    assert stats["mean_length"] == pytest.approx(sum(map(len, ids)) / 3)


def test_distinct_2_pools_bigrams_and_never_crosses_answers():
    # bigrams: (1,2) (2,3) | (1,2) | none | none  -> 2 distinct of 3; (3,1) across answers is not one
    assert distinct_n([[1, 2, 3], [1, 2], [5], []], 2) == pytest.approx(2 / 3)
    assert distinct_n([[5], [], [7]], 2) == 0.0  # no bigram at all: defined as 0
    assert all(math.isnan(v) for v in text_stats([], [], ended=[]).values())  # nan for no answers


def test_text_stats_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 token lists but 1 texts"):
        text_stats([[1], [2]], ["x"])
    with pytest.raises(ValueError, match="and 1 ended flags"):
        text_stats([[1], [2]], ["x", "y"], ended=[True])


# --------------------------------------------------------------------------- greedy_answers


def test_batched_greedy_answers_equal_one_prompt_at_a_time():
    model = random_model(small_config(), seed=3)
    prompts = [[5, 17, 300, 41], [8, 9], [1000, 2000, 3000, 4000, 5000, 6], [77]]
    got = greedy_answers(model, prompts, max_new_tokens=7, stop_ids=[2], batch_size=3)
    for prompt, (ids, ended) in zip(prompts, got):
        alone = generate(model, torch.tensor([prompt]), 7, eos_token_id=[2])[0, len(prompt):].tolist()
        stop = alone.index(2) if 2 in alone else None
        assert (ids, ended) == ((alone, False) if stop is None else (alone[:stop], True))


def test_a_stop_token_ends_the_answer_and_is_not_part_of_it():
    model = random_model(small_config(), seed=3)
    first = greedy_answers(model, [[5, 6, 7]], max_new_tokens=5, stop_ids=[2])[0][0]
    stop = first[-1]
    ids, ended = greedy_answers(model, [[5, 6, 7]], max_new_tokens=5, stop_ids=[stop])[0]
    assert ended and ids == first[:first.index(stop)]


def test_an_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        greedy_answers(random_model(small_config()), [[1], []], max_new_tokens=2, stop_ids=[2])


@pytest.mark.parametrize("batch_size", [4, 2])
def test_streams_kept_while_answering_are_a_whole_forwards_streams(batch_size):
    """The stream entering block K at every position of prompt + answer[:-1], as the batched, left-padded
    decoding computed it (finished rows leaving the batch), equals one forward of that sequence alone,
    up to the rounding of another summation order; blocks [K, L) continue from it. Prompts that begin
    alike share the computation of their common tokens."""
    model = random_model(small_config(), seed=3)
    L = model.config.num_hidden_layers
    prompts = [[5, 17, 300, 41], [8, 9], [1000, 2000, 3000, 4000, 5000, 6], [77], [5, 17, 300, 8, 8]]  # 0, 4 share 3
    free = greedy_answers(model, prompts, max_new_tokens=9, stop_ids=[], batch_size=batch_size)
    stop = free[1][0][3]  # prompt 1 ends after at most 3 tokens, the others may run on: rows leave the batch
    answers, streams = answers_with_streams(model, prompts, [1, L], max_new_tokens=9, stop_ids=[stop],
                                            batch_size=batch_size)
    assert answers == greedy_answers(model, prompts, max_new_tokens=9, stop_ids=[stop], batch_size=batch_size)
    assert answers[1][1] and len(answers[1][0]) <= 3 and any(not ended for _, ended in answers)
    with torch.no_grad():
        for p, (a, _), s1, sL in zip(prompts, answers, streams[1], streams[L]):
            ids = torch.tensor([p + a[:-1]])  # [1, P + A - 1]: every position that predicts an answer token
            assert s1.shape == sL.shape == (len(p) + max(len(a) - 1, 0), model.config.hidden_size)
            torch.testing.assert_close(s1, model.hidden_states(ids, end=1)[0], rtol=1e-5, atol=1e-5)
            final = model.hidden_states(ids)[0]  # [P + A - 1, C], normed
            torch.testing.assert_close(model.model.norm(sL), final, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model.hidden_states(ids, start=1, x=s1[None])[0], final, rtol=1e-5, atol=1e-5)
