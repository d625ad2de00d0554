"""Reference-free losses in `python -m dpo.train`: SimPO, ORPO and SFT build no reference model and
run no reference forward, and still learn the synthetic preference.

The synthetic task (`make_synthetic_pairs`) is learnable: a tiny random SmolLM starts with no
preference (about 50% held-out accuracy) and DPO takes it past 90%. Each reference-free loss must
raise held-out accuracy too, with the evaluation comparing the policy against the starting
model's log-probs (measured once, before the first step). Every model computation goes through
`SmolLM.run_layers`, so counting the distinct models that ran counts the reference: DPO runs two
(the control that shows the count can fail), a reference-free loss one.
"""
from __future__ import annotations

import json

import pytest

import dpo.train
from dpo.data import make_synthetic_pairs
from smollm import SmolLM, load_tokenizer

from model_utils import save_random_checkpoint, small_config


@pytest.fixture(scope="module")
def task(tmp_path_factory, tokenizer_json):
    root = tmp_path_factory.mktemp("reference_free")
    model = save_random_checkpoint(root / "model", small_config(), tokenizer=load_tokenizer(tokenizer_json))
    data = root / "synthetic.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in make_synthetic_pairs(300, seed=0)), encoding="utf-8")
    return model, data


@pytest.mark.slow
@pytest.mark.parametrize("loss, models", [(["sigmoid"], 2), (["simpo"], 1), (["orpo"], 1), (["sft"], 1)],
                         ids=["dpo-control", "simpo", "orpo", "sft"])
def test_reference_free_losses_learn_without_a_reference(task, tmp_path, monkeypatch, capsys, loss, models):
    model_dir, data = task
    ran: set[int] = set()  # the models whose layers ran (a reference forward would add one)
    real = SmolLM.run_layers

    def counted(self, *args, **kwargs):
        ran.add(id(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SmolLM, "run_layers", counted)
    out = tmp_path / "run"
    code = dpo.train.main(["--model", str(model_dir), "--data", str(data), "--no-filter", "--num-pairs", "192",
                           "--eval-pairs", "64", "--train-last-n", "1", "--lr", "1e-3", "--sample-prompts", "2",
                           "--sample-tokens", "8", "--stop-when-unhealthy", "0", "--output-dir", str(out),
                           "--no-progress", "--loss-type", *loss])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    assert len(ran) == models, f"{len(ran)} models ran, expected {models}"
    assert ev["memory"]["reference_model"] is (models == 2)
    if models == 1:
        assert "no reference model is built and no reference forward runs" in err
        assert ev["history"][0]["health"]["kl_policy_reference"] == 0.0  # step 0: the policy is the start
        assert ev["history"][-1]["health"]["kl_policy_reference"] is None  # no reference to ask afterwards
    assert 0.3 <= ev["reference_accuracy"] <= 0.7  # the starting model has no preference
    assert ev["policy_accuracy"] >= ev["reference_accuracy"] + 0.25, (ev["reference_accuracy"], ev["policy_accuracy"])


@pytest.mark.slow
def test_a_reference_free_run_resumes_with_the_starting_models_side_measured_again(task, tmp_path):
    """Resumed after its first step, a reference-free run loads the starting weights once more to
    measure their side of the evaluation (then drops them): it ends as an uninterrupted run does."""
    model_dir, data = task
    common = ["--model", str(model_dir), "--data", str(data), "--no-filter", "--num-pairs", "32", "--eval-pairs",
              "16", "--train-last-n", "1", "--lr", "1e-3", "--sample-prompts", "2", "--sample-tokens", "4",
              "--stop-when-unhealthy", "0", "--eval-every", "2", "--loss-type", "simpo", "--no-progress"]
    assert dpo.train.main(common + ["--output-dir", str(tmp_path / "plain")]) == 0
    assert dpo.train.main(common + ["--output-dir", str(tmp_path / "cut"), "--max-steps", "3",
                                    "--save-every", "1"]) == 0
    assert dpo.train.main(["--resume", str(tmp_path / "cut"), "--no-progress", "--max-steps", "4"]) == 0
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("plain", "cut"))
    assert a["steps"] == b["steps"] == 4
    for key in ("reference_accuracy", "policy_accuracy", "reward_accuracy", "mean_margin"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
