"""What tests/test_notebooks.py checks after running notebooks/01_dpo_walkthrough.ipynb."""
from __future__ import annotations

import math
from pathlib import Path

import pytest


def check(ns: dict, out: Path) -> None:
    """Facts the walkthrough teaches, checked on what it computed."""
    # The filter report adds up, and it kept some real pairs but not all.
    report = ns["report"]
    assert report.total == len(ns["pairs"]) == 400
    assert report.kept + sum(report.rejected.values()) == report.total
    assert 0 < report.kept < report.total
    # The response mask: 0 on the prompt, 1 from the first response token through EOS.
    tp = ns["tp"]
    assert tp.chosen_mask == [0] * tp.prompt_len + [1] * (len(tp.chosen_ids) - tp.prompt_len)
    assert tp.chosen_ids[-1] == ns["tokenizer"].eos_token_id
    # Equal policy and reference log-probs give a sigmoid DPO loss of ln 2.
    assert ns["losses"].tolist() == pytest.approx([math.log(2)] * len(ns["losses"]), abs=1e-6)
    # Training: ln 2 at step 1 (policy == reference), then the held-out policy accuracy rises.
    metrics, before, after = ns["metrics"], ns["before"], ns["after"]
    assert len(metrics) == ns["train_config"].max_steps
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert before.reward_accuracy == 0.0 and before.policy_accuracy == before.reference_accuracy
    assert after.policy_accuracy > before.policy_accuracy
    assert after.policy_accuracy >= 0.8 and after.mean_margin > 0
    assert after.reference_accuracy == before.reference_accuracy  # the reference never trains
    # The curves were written where the test asked, as a PNG.
    assert ns["png"] == out / "curves.png"
    assert ns["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
