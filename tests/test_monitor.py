"""Collapse detection in `python -m dpo.train`: a run that collapses says so, a healthy one does not.

A tiny random SmolLM on the learnable synthetic preference set (dpo.data.make_synthetic_pairs).
At lr 1e-3 it learns the preference and stays healthy. At lr 5e-2 it learns it too (held-out
accuracy 100%), but by pushing every answer's log-prob down: its per-token log p(chosen) falls
far below the reference's, which is the collapse that accuracy alone hides.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo.data import make_synthetic_pairs
from dpo.monitor import evaluation_interval, verdict
from smollm import load_pretrained, load_tokenizer

from model_utils import save_random_checkpoint, small_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_json) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("monitor")
    model = save_random_checkpoint(folder / "tiny", small_config(), seed=0, tokenizer=load_tokenizer(tokenizer_json))
    data = folder / "synthetic.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for p in make_synthetic_pairs(160, seed=0):
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return model, data


def train(setup, out: Path, lr: str, eval_every: str = "3") -> subprocess.CompletedProcess:
    model, data = setup
    # --rejected-end-of-turn: the textbook loss over every response token, whose collapse at lr 5e-2 is
    # the log-prob fall described above (with the default's masked end-of-turn it collapses into empty answers)
    args = ["--model", str(model), "--data", str(data), "--no-filter", "--loss-type", "sigmoid", "--rejected-end-of-turn", "--num-pairs", "96", "--eval-pairs", "32",
            "--train-last-n", "1", "--no-freeze-head", "--beta", "0.8", "--lr", lr, "--eval-every", eval_every, "--sample-prompts", "4", "--sample-tokens", "32",
            "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SMOLLM_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dpo.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_collapsing_run_warns_keeps_an_earlier_healthy_best_and_says_it_collapsed(setup, tmp_path):
    out = tmp_path / "collapse"
    result = train(setup, out, "5e-2", eval_every="2")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: step")]
    assert warnings and all("log p(chosen) fell" in w and "bound 1.00" in w for w in warnings), result.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["policy_accuracy"] >= 0.9  # accuracy alone would call this a success ...
    assert ev["degraded"] is True and ev["problems"]  # ... the run does not
    assert ev["policy_chosen_logp"] < ev["reference_chosen_logp"] - 1.0
    assert "THE POLICY DEGRADED" in result.stdout and "log p(chosen) fell" in result.stdout
    best = ev["best"]
    assert best is not None and best["step"] < ev["steps"]  # an earlier evaluation ...
    record = next(e for e in ev["history"] if e["step"] == best["step"])
    assert record["healthy"] and not record["problems"]  # ... that was within the bounds
    assert json.loads((out / "best" / "dpo_best.json").read_text())["step"] == best["step"]
    load_pretrained(out / "best")
    assert "(empty)" in (out / "samples.md").read_text() or (out / "samples.jsonl").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("health_kl_policy_reference" in r for r in rows)  # health tracked during training
    # early stopping on health (--stop-when-unhealthy 1, the default): the run ends at the first
    # unhealthy evaluation, which is also the final one (not evaluated twice)
    first_bad = next(e["step"] for e in ev["history"] if not e["healthy"])
    assert ev["stopped_early"] == {"step": first_bad, "of": 12, "unhealthy_evaluations": 1}
    assert ev["steps"] == first_bad < 12 and len(rows) == first_bad
    assert [e["step"] for e in ev["history"]].count(first_bad) == 1
    assert f"early stop at step {first_bad} of 12" in result.stderr
    assert "Training stopped early" in result.stdout


@pytest.mark.slow
def test_a_healthy_run_does_not_warn(setup, tmp_path):
    out = tmp_path / "healthy"
    result = train(setup, out, "1e-3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning:" not in result.stderr
    ev = json.loads((out / "eval.json").read_text())
    assert ev["degraded"] is False and ev["problems"] == []
    assert ev["policy_accuracy"] > ev["reference_accuracy"]
    assert "health: within the bounds" in result.stdout and "COLLAPSED" not in result.stdout
    assert all(e["healthy"] for e in ev["history"]) and ev["stopped_early"] is None and ev["steps"] == 12
    assert ev["best"]["step"] > 0 and ev["best"]["policy_accuracy"] > ev["reference_accuracy"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all({"prompt", "reference", "policy"} <= set(s) for s in samples)


def test_evaluation_interval():
    assert evaluation_interval(None) == 100  # the default run's 75 steps: before and after only
    assert evaluation_interval(0) == 0 and evaluation_interval(7) == 7


def test_verdict_names_the_problems_and_best():
    summary = {"degraded": True, "problems": ["held-out log p(chosen) fell 8.10 nats/token"],
               "best": {"step": 40, "policy_accuracy": 0.88, "dir": "best"}}
    text = verdict(summary, "runs/dpo")
    assert text.startswith("THE POLICY DEGRADED") and "fell 8.10" in text and "step 40" in text and "runs/dpo/best/" in text
    assert verdict({**summary, "degraded": False, "problems": []}).startswith("health: within the bounds")
    assert "no best/" in verdict({**summary, "best": None})


def test_preset_assignment_gives_the_assignments_settings_and_explicit_flags_win():
    from dpo.config import PRESETS, build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--preset", "assignment"]))
    assert (config.lr, config.beta, config.train_last_n, config.batch_size, config.logp_reduction) == (
        1e-4, 0.8, 5, 8, "mean")
    assert config.freeze_head is False and config.weight_decay == 1e-2 and config.max_length == 512
    assert all(getattr(config, k) == v for k, v in PRESETS["assignment"].items())
    mine = config_from_args(build_parser().parse_args(["--preset", "assignment", "--beta", "0.5"]))
    assert mine.beta == 0.5 and mine.lr == 1e-4
    # a flag given wins even when it equals the default (--freeze-head is the default, not the preset's)
    frozen = config_from_args(build_parser().parse_args(["--preset", "assignment", "--freeze-head"]))
    assert frozen.freeze_head is True and frozen.beta == 0.8
    default = config_from_args(build_parser().parse_args([]))
    assert (default.lr, default.beta, default.freeze_head, default.num_pairs, default.stop_when_unhealthy) == (
        1e-4, 2.0, True, 600, 1)  # the grid's best healthy setting (docs/results.md)
