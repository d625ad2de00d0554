"""What tests/test_notebooks.py checks after running notebooks/04_reflection_questions.ipynb (tiny mode)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def check(ns: dict, out: Path) -> None:
    """The five answers, checked on the experiments that give them."""
    ln2 = math.log(2)
    # 0. The over-optimisation run: evaluated every few steps, with health beside the accuracy.
    over = ns["over"]
    assert [e["step"] for e in over["evals"]] == list(range(0, ns["OVER_STEPS"] + 1, ns["OVER_EVAL_EVERY"]))
    assert over["evals"][0]["health"]["kl_policy_reference"] == 0.0
    assert over["evals"][-1]["health"]["kl_policy_reference"] > 0.0
    assert over["evals"][-1]["policy_accuracy"] > over["evals"][0]["policy_accuracy"]
    assert all("policy_sample_distinct_2" in e["health"] for e in over["evals"])
    assert all(0 <= e["health"]["policy_sample_ended_share"] <= 1 and 0 <= e["health"]["policy_sample_loop_share"] <= 1
               for e in over["evals"])
    # 0b. The old way, the previous default and the new one: the same settings and steps.
    lesson = ns["lesson"]
    assert list(lesson) == ["old way", "previous default", "new default"]
    steps = [[e["step"] for e in r["evals"]] for r in lesson.values()]
    assert steps[0] == steps[1] == steps[2]
    assert [r["config"]["loss_type"] for r in lesson.values()] == [["sigmoid"], ["sigmoid"], ["apo_zero"]]
    assert all("policy_sample_ended_share" in e["health"] for r in lesson.values() for e in r["evals"])
    # 1. Clean labels teach the synthetic task; half the labels flipped teaches (almost) nothing.
    runs = ns["data_runs"]
    gain = {name: r["evals"][-1]["policy_accuracy"] - r["evals"][0]["reference_accuracy"] for name, r in runs.items()}
    assert gain["filtered"] >= 0.15
    assert gain["50% flipped"] < gain["filtered"] - 0.1
    assert runs["50% flipped"]["evals"][-1]["mean_margin"] < runs["filtered"]["evals"][-1]["mean_margin"]
    assert "also" in runs["filtered"] and "also" in runs["unfiltered"]
    # 2. Higher beta keeps the policy closer to the reference: the margin h and the |log-ratio| fall as beta rises.
    betas, margin_h, distance = ns["BETAS"], ns["margin_h"], ns["distance"]
    assert list(betas) == sorted(betas) and len(betas) >= 3
    assert all(margin_h[a] > margin_h[b] for a, b in zip(betas, betas[1:])), margin_h
    assert all(distance[a] > distance[b] for a, b in zip(betas, betas[1:])), distance
    # 3. The policy's log-probs replaced by the reference's: ln 2 at every step, and no gradient at all.
    q3 = ns["q3"]
    assert q3["replaced"]["loss"] == pytest.approx([ln2] * 3, abs=1e-6)
    assert q3["replaced"]["grad_norm"] == [0.0, 0.0, 0.0]
    assert q3["correct"]["loss"][0] == pytest.approx(ln2, abs=1e-6)  # step 1 is ln 2 either way ...
    assert q3["correct"]["grad_norm"][0] > 0  # ... but only the correct loss has a gradient
    assert min(q3["correct"]["loss"][1:]) < ln2
    # 4. Summed log-probs follow the length difference; per-token means much less.
    corr = ns["length_corr"]
    assert corr["sum"] < -0.5 and abs(corr["sum"]) > abs(corr["mean"])
    assert ns["sum_run"]["config"]["logp_reduction"] == "sum"
    # 5. reference = policy: shares trainable weights, the loss is stuck at ln 2, the weights move anyway,
    # and the check (policy_is_reference / same_weights after training) fires; the correct setup passes it.
    bug, good = ns["q5"]["reference = policy (the bug)"], ns["q5"]["a reference apart (correct)"]
    assert bug["shared_trainable"] == bug["trainable"] > 0 and good["shared_trainable"] == 0
    assert ns["q5_refusal"].startswith("the reference shares ")  # DPOTrainer refuses the bug by default
    assert [m["loss"] for m in bug["metrics"]] == pytest.approx([ln2] * len(bug["metrics"]), abs=1e-6)
    assert all(m["grad_norm"] > 0 and m["reward_accuracy"] == 0 for m in bug["metrics"])
    assert bug["moved"] > 0 and bug["kl_truth"] > 0
    assert bug["policy_is_reference"] and bug["same_weights"]
    assert not good["policy_is_reference"] and not good["same_weights"]
    assert bug["own"].policy_accuracy == bug["own"].reference_accuracy and bug["own"].mean_margin == 0
    # The figures were written where the test asked.
    for name in ("q0_overoptimisation.png", "q0b_new_default.png", "q1_data.png", "q1_runs.png", "q2_beta.png", "q2_runs.png",
                 "q3_replaced.png", "q4_length.png", "q5_same_weights.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
