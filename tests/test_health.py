"""dpo.health: text statistics, the reference's NLL and KL on samples against naive loops,
and the thresholds on hand-made health dicts (the collapsed and a healthy SmolLM2 run)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dpo import health
from dpo.evaluate import EvalResult
from dpo.health import (HealthThresholds, assess, distinct_n, health_report, kl_on_samples, reference_nll,
                        text_stats)
from dpo.tokenization import TokenizedPair
from smollm import load_tokenizer
from tests.model_utils import random_model, small_config

# --------------------------------------------------------------------------- text_stats


def test_whitespace_only_answers_are_all_empty():
    stats = text_stats([[216] * 128, [], [198, 198]], [" " * 128, "", "\n\n"])
    assert stats["empty_share"] == 1.0
    assert stats["mean_length"] == pytest.approx((128 + 0 + 2) / 3)


def test_repeated_word_has_low_distinct_2_and_counts_as_repetition(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    text = "the" + " the" * 39
    ids = tok.encode_ids(text)
    assert len(ids) == 40  # "the", then " the" 39 times
    stats = text_stats([ids], [text])
    assert stats["distinct_2"] == pytest.approx(2 / 39)  # ("the"," the") and (" the"," the") of 39 bigrams
    assert stats["repetition"] == 1.0
    assert stats["empty_share"] == 0.0


def test_varied_answers_have_distinct_2_of_one(tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    texts = ["Bake the bread at two hundred degrees.", "Paris is the capital of France.", "Use a ladder."]
    ids = [tok.encode_ids(t) for t in texts]
    stats = text_stats(ids, texts)
    assert stats["distinct_2"] == 1.0
    assert stats["repetition"] == 0.0
    assert stats["empty_share"] == 0.0
    assert stats["mean_length"] == pytest.approx(sum(map(len, ids)) / 3)


def test_distinct_2_pools_bigrams_and_never_crosses_answers():
    # bigrams: (1,2) (2,3) | (1,2) | none | none  -> 2 distinct of 3; (3,1) across answers is not one
    assert distinct_n([[1, 2, 3], [1, 2], [5], []], 2) == pytest.approx(2 / 3)
    assert distinct_n([[5], [], [7]], 2) == 0.0  # no bigram at all: defined as 0
    assert text_stats([], [])["mean_length"] != text_stats([], [])["mean_length"]  # nan for no answers


def test_repetition_needs_a_repeated_4gram_covering_over_half():
    once = [1, 2, 3, 4, 5, 6]  # one occurrence of every 4-gram: not a loop
    loop = [9, 8, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]  # (1,2,3,4) x3 covers 12 of 14
    half = [1, 2, 3, 4, 1, 2, 3, 4] + list(range(10, 18))  # covers 8 of 16: not over half
    stats = text_stats([once, loop, half], ["a", "b", "c"])
    assert stats["repetition"] == pytest.approx(1 / 3)


def test_text_stats_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 token lists but 1 texts"):
        text_stats([[1], [2]], ["x"])


# --------------------------------------------------------------------------- model measurements


@pytest.fixture(scope="module")
def models():
    model = random_model(small_config(), seed=0)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.model.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, other


PROMPTS = [[5, 17, 300, 41], [8, 9], [1000, 2000, 3000, 4000, 5000, 6], [77]]
ANSWERS = [[12, 13, 14], [400, 401, 402, 403, 404], [], [3]]


def _naive_log_probs(model, prompt, answer):
    """[len(answer), V] fp32 log-softmax of the positions that predict each answer token,
    from one full forward of the single unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer]))[0].float()  # [T, V]
    return F.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) + len(answer) - 1]


@pytest.fixture(params=[256, 2], ids=["one-head-call", "head-in-chunks-of-2"])
def head_chunk(request, monkeypatch):
    monkeypatch.setattr(health, "HEAD_CHUNK", request.param)


def test_reference_nll_equals_a_naive_loop(models, head_chunk):
    model, _ = models
    total, count = 0.0, 0
    for p, a in zip(PROMPTS, ANSWERS):
        if a:
            logp = _naive_log_probs(model, p, a)
            total -= logp[torch.arange(len(a)), torch.tensor(a)].sum().item()
            count += len(a)
    got = reference_nll(model, PROMPTS, ANSWERS, batch_size=3)
    assert count == 9 and got == pytest.approx(total / count, rel=1e-5)
    assert math.isnan(reference_nll(model, [[1], [2]], [[], []]))  # nothing to score


def test_kl_of_a_model_with_itself_is_zero(models):
    model, _ = models
    assert abs(kl_on_samples(model, copy.deepcopy(model), PROMPTS, ANSWERS, batch_size=2)) <= 1e-6


def test_kl_equals_a_naive_loop_and_is_positive_for_a_perturbed_copy(models, head_chunk):
    model, other = models
    total, count = 0.0, 0
    for p, a in zip(PROMPTS, ANSWERS):
        if a:
            lp, lq = _naive_log_probs(model, p, a), _naive_log_probs(other, p, a)
            for t in range(len(a)):  # KL(p || q) = sum_v p(v) (log p(v) - log q(v)), position by position
                total += sum((lp[t].exp() * (lp[t] - lq[t])).tolist())
                count += 1
    got = kl_on_samples(model, other, PROMPTS, ANSWERS, batch_size=3)
    assert got > 1e-4
    assert got == pytest.approx(total / count, rel=1e-4)


def test_model_functions_restore_modes_and_take_no_grad(models):
    model, other = models
    model.train()
    try:
        kl_on_samples(model, other, PROMPTS, ANSWERS)
        assert model.training and not other.training
    finally:
        model.eval()


def test_empty_prompt_is_an_error(models):
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        reference_nll(models[0], [[1], []], [[2], [3]])


# --------------------------------------------------------------------------- assess

COLLAPSED = {"logp_reduction": "mean", "n_samples": 16,
             "policy_chosen_logp": -10.84, "reference_chosen_logp": -2.74,
             "policy_sample_empty_share": 1.0, "reference_sample_empty_share": 0.0,
             "policy_sample_distinct_2": 0.008, "reference_sample_distinct_2": 0.62,
             "policy_sample_reference_nll": 6.4, "reference_sample_reference_nll": 0.9}
HEALTHY = {"logp_reduction": "mean", "n_samples": 16,
           "policy_chosen_logp": -3.64, "reference_chosen_logp": -2.79,
           "policy_sample_empty_share": 0.0, "reference_sample_empty_share": 0.0,
           "policy_sample_distinct_2": 0.55, "reference_sample_distinct_2": 0.62,
           "policy_sample_reference_nll": 1.3, "reference_sample_reference_nll": 0.9}


def test_collapsed_run_is_flagged_on_every_metric_with_values_and_bounds():
    problems = assess(COLLAPSED, HealthThresholds())
    assert len(problems) == 4
    logp, empty, distinct, nll = problems
    assert logp == ("held-out log p(chosen) fell 8.10 nats/token below the reference's "
                    "(-10.84 vs -2.74; bound 1.00)")
    assert "100% of 16" in empty and "bound 25%" in empty
    assert "0.008" in distinct and "0.620" in distinct and "bound 0.310" in distinct
    assert "5.50 nats/token" in nll and "bound 1.50" in nll


def test_healthy_run_has_no_problems():
    assert assess(HEALTHY) == []


def test_only_the_chosen_logp_collapse_is_named_log_p_chosen():
    problems = assess({"policy_chosen_logp": -10.84, "reference_chosen_logp": -2.74})
    assert len(problems) == 1 and "log p(chosen)" in problems[0] and "bound 1.00" in problems[0]


def test_thresholds_are_the_bounds_in_the_messages():
    strict = HealthThresholds(max_chosen_logp_drop=0.5, max_empty_share=0.0, min_distinct_2_ratio=0.95,
                              max_reference_nll_rise=0.25)
    problems = assess(HEALTHY | {"policy_sample_empty_share": 0.0625}, strict)
    assert [p.split()[0] for p in problems] == ["held-out", "policy", "policy", "the"]
    assert "bound 0.50" in problems[0] and "bound 0%" in problems[1]
    assert "bound 0.589" in problems[2] and "bound 0.25" in problems[3]


def test_missing_nan_and_summed_metrics_are_not_judged():
    assert assess({}) == []
    assert assess({"policy_sample_reference_nll": math.nan, "reference_sample_reference_nll": 0.9}) == []
    assert assess({"policy_sample_distinct_2": 0.01}) == []  # no reference value to compare with
    summed = {"logp_reduction": "sum", "policy_chosen_logp": -400.0, "reference_chosen_logp": -100.0}
    assert assess(summed) == []


# --------------------------------------------------------------------------- health_report


def _pair(index: int, prompt: list[int], chosen: list[int], rejected: list[int]) -> TokenizedPair:
    return TokenizedPair(index=index, source="test",
                         chosen_ids=prompt + chosen, chosen_mask=[0] * len(prompt) + [1] * len(chosen),
                         rejected_ids=prompt + rejected, rejected_mask=[0] * len(prompt) + [1] * len(rejected),
                         prompt_len=len(prompt))


def test_health_report_is_flat_and_consistent(models, tokenizer_json):
    model, other = models
    tok = load_tokenizer(tokenizer_json)
    pairs = [_pair(i, tok.encode_ids(p), tok.encode_ids(" Sure."), tok.encode_ids(" No."))
             for i, p in enumerate(["Human: hi\n\nAssistant:", "Human: name a fruit\n\nAssistant:",
                                    "Human: what is two plus two?\n\nAssistant:"])]
    result = EvalResult(num_pairs=3, reference_accuracy=0.5, policy_accuracy=0.9, reward_accuracy=0.9,
                        mean_margin=0.3, policy_chosen_logp=-3.5, policy_rejected_logp=-5.0,
                        reference_chosen_logp=-2.8, reference_rejected_logp=-3.0)
    health, samples = health_report(other, model, tok, pairs, n_prompts=2, max_new_tokens=6, eval_result=result,
                                    batch_size=2)
    assert len(samples) == 2 and health["n_samples"] == 2
    assert [s.prompt_ids for s in samples] == [p.chosen_ids[:p.prompt_len] for p in pairs[:2]]
    assert health["policy_chosen_logp"] == -3.5 and health["reference_rejected_logp"] == -3.0
    for side in ("policy", "reference"):
        for key in ("mean_length", "empty_share", "distinct_2", "repetition", "stopped_share", "reference_nll"):
            assert f"{side}_sample_{key}" in health
    assert all(isinstance(v, (int, float, str)) for v in health.values())  # flat
    ids = [s.policy_ids for s in samples]
    prompts = [s.prompt_ids for s in samples]
    assert health["kl_policy_reference"] == pytest.approx(kl_on_samples(other, model, prompts, ids))
    assert health["policy_sample_reference_nll"] == pytest.approx(reference_nll(model, prompts, ids))
    assert health["kl_policy_reference"] > 0
    assert health["reference_sample_mean_length"] == pytest.approx(sum(len(s.reference_ids) for s in samples) / 2)
    assert isinstance(assess(health), list)


def _three_pairs(tok) -> list[TokenizedPair]:
    return [_pair(i, tok.encode_ids(p), tok.encode_ids(" Sure."), tok.encode_ids(" No."))
            for i, p in enumerate(["Human: hi\n\nAssistant:", "Human: name a fruit\n\nAssistant:",
                                   "Human: what is two plus two?\n\nAssistant:"])]


def test_probe_generates_the_reference_once_and_matches_health_report(models, tokenizer_json, monkeypatch):
    from dpo import samples as samples_module

    model, other = models
    tok = load_tokenizer(tokenizer_json)
    pairs = _three_pairs(tok)
    expected = health_report(other, model, tok, pairs, n_prompts=3, max_new_tokens=6, batch_size=2)
    calls = []
    real = samples_module._greedy_answers
    monkeypatch.setattr(samples_module, "_greedy_answers",
                        lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    probe = health.HealthProbe(model, tok, pairs, n_prompts=3, max_new_tokens=6, batch_size=2)
    for _ in range(2):
        got = probe.report(other)
        assert got[0] == expected[0] and got[1] == expected[1]
    assert calls == [model, other, other]  # the reference answered once, the policy each time


def test_probe_with_the_reference_weights_generates_once_and_reports_zero_kl(models, tokenizer_json, monkeypatch):
    from dpo import samples as samples_module

    model, _ = models
    tok = load_tokenizer(tokenizer_json)
    pairs = _three_pairs(tok)
    twin = copy.deepcopy(model)  # equal weights, another object: the policy before its first step
    assert health.same_weights(twin, model)
    with torch.no_grad():
        computed = health_report(twin, model, tok, pairs, n_prompts=3, max_new_tokens=6, batch_size=2)[0]
    calls = []
    real = samples_module._greedy_answers
    monkeypatch.setattr(samples_module, "_greedy_answers",
                        lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    shortcut, samples = health.HealthProbe(model, tok, pairs, n_prompts=3, max_new_tokens=6,
                                           batch_size=2).report(twin)
    assert len(calls) == 1
    assert shortcut["kl_policy_reference"] == 0.0 and computed["kl_policy_reference"] == pytest.approx(0.0, abs=1e-6)
    assert {k: v for k, v in shortcut.items() if k != "kl_policy_reference"} == \
        {k: v for k, v in computed.items() if k != "kl_policy_reference"}
    assert all(s.policy_ids == s.reference_ids for s in samples)
    with torch.no_grad():
        next(twin.parameters()).add_(1e-3)
    assert not health.same_weights(twin, model)


def test_probe_recomputes_the_reference_after_an_in_place_change(models, tokenizer_json):
    model, other = models
    tok = load_tokenizer(tokenizer_json)
    pairs = _three_pairs(tok)
    reference = copy.deepcopy(model)
    probe = health.HealthProbe(reference, tok, pairs, n_prompts=3, max_new_tokens=6, batch_size=2)
    probe.report(other)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(dict(other.named_parameters())[next(n for n, q in reference.named_parameters() if q is p)])
    health_now, samples = probe.report(other)  # the reference now equals the policy
    assert health_now["kl_policy_reference"] == 0.0
    assert all(s.policy_ids == s.reference_ids for s in samples)


def test_kl_and_reference_nll_in_one_pass_equal_the_two_functions(models):
    model, other = models
    kl, nll = health.kl_and_reference_nll(other, model, PROMPTS, ANSWERS, batch_size=2)
    assert kl == pytest.approx(kl_on_samples(other, model, PROMPTS, ANSWERS, batch_size=3), abs=1e-6)
    assert nll == pytest.approx(reference_nll(model, PROMPTS, ANSWERS, batch_size=3), abs=1e-6)
    assert all(math.isnan(x) for x in health.kl_and_reference_nll(other, model, PROMPTS, [[]] * len(PROMPTS)))
