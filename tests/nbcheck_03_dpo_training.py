"""What tests/test_notebooks.py checks after running notebooks/03_dpo_training.ipynb (tiny mode)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def check(ns: dict, out: Path) -> None:
    """Facts the training notebook teaches, checked on what it computed."""
    # The filter report adds up, and it kept some real pairs but not all.
    report = ns["report"]
    assert report.total == len(ns["pairs"]) == 640
    assert report.kept + sum(report.rejected.values()) == report.total
    assert 0 < report.kept < report.total
    # The response mask: 0 on the prompt, 1 from the first answer token through EOS.
    tp = ns["tp"]
    assert tp.chosen_mask == [0] * tp.prompt_len + [1] * (len(tp.chosen_ids) - tp.prompt_len)
    assert tp.chosen_ids[-1] == ns["tokenizer"].eos_token_id
    # Log-probs by hand = sequence_logprobs = the trainer's engine, on the same real batch.
    assert ns["by_hand_sum"].tolist() == pytest.approx(ns["package_sum"].tolist(), abs=1e-3)
    assert ns["by_hand_mean"].tolist() == pytest.approx(ns["package_mean"].tolist(), abs=1e-4)
    assert ns["by_hand_sum"].tolist() == pytest.approx(ns["engine_sum"].tolist(), abs=1e-2)
    assert all(v < 0 for v in ns["by_hand_sum"].tolist())
    # Policy == reference: h = 0 and a loss of ln 2, by hand and by the package; a moved policy is below it.
    assert ns["losses_by_hand"].tolist() == pytest.approx([math.log(2)] * ns["B"], abs=1e-6)
    assert ns["losses"].tolist() == pytest.approx([math.log(2)] * ns["B"], abs=1e-6)
    assert ns["moved"].mean().item() < math.log(2)
    # Freezing: the report's count is the policy's trainable parameters, and the reference shares the frozen ones.
    policy, reference, trainable = ns["policy"], ns["reference"], ns["trainable"]
    assert trainable.trainable == sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert 0 < trainable.trainable < trainable.total
    assert ns["count_shared"](policy, reference) == trainable.total - trainable.trainable
    assert not any(p.requires_grad for p in reference.parameters())
    # Training: ln 2 at step 1 (policy == reference), then the loss falls and held-out accuracy rises.
    metrics, evaluations = ns["metrics"], ns["evaluations"]
    assert len(metrics) == ns["train_config"].max_steps == ns["trainer"].step
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    before, after = evaluations[0].result, evaluations[-1].result
    assert [e.step for e in evaluations] == list(range(0, ns["STEPS"] + 1, ns["EVAL_EVERY"]))
    assert before.reward_accuracy == 0.0 and before.policy_accuracy == before.reference_accuracy
    assert after.policy_accuracy > before.policy_accuracy
    assert after.policy_accuracy >= 0.8 and after.mean_margin > 0  # the synthetic task is learnable
    assert after.reference_accuracy == before.reference_accuracy  # the reference never trains
    # Health beside accuracy, at every evaluation: no drift at step 0, some after training.
    for e in evaluations:
        for key in ("policy_sample_mean_length", "policy_sample_empty_share", "policy_sample_distinct_2",
                    "kl_policy_reference", "policy_chosen_logp"):
            assert key in e.health, key
    assert evaluations[0].health["kl_policy_reference"] == 0.0
    assert evaluations[-1].health["kl_policy_reference"] > 0.0
    assert len(evaluations[-1].samples) == ns["SAMPLE_PROMPTS"]
    # The figures and the samples were written where the test asked.
    for name in ("loss_vs_margin.png", "trainable_parameters.png", "live_curves.png", "curves.png", "health.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert ns["png"] == out / "curves.png"
    assert (out / "samples.md").is_file() and (out / "samples.jsonl").is_file()
