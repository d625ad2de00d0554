"""`python -m dpo.train` end to end, as a user runs it.

1. A learnable synthetic preference set and a tiny random SmolLM: held-out policy accuracy goes
   from about 50% (an untrained model has no preference) to at least 90%.
2. The real pipeline (filter -> train -> eval) on the HH-RLHF test splits with the real
   tokenizer and a small random model: completes and writes every output.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpo.data import make_synthetic_pairs
from smollm import load_pretrained, load_tokenizer

from model_utils import save_random_checkpoint, small_config

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, pairs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SMOLLM_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "dpo.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_outputs(out: Path) -> dict:
    for name in ("metrics.jsonl", "eval.json", "curves.png", "train_config.json"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == len(rows)
    for key in ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin",
                "policy_chosen_logp", "policy_rejected_logp", "lr", "tokens_per_s"):
        assert all(key in r for r in rows), key
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert (final / "model.safetensors").is_file()
    load_pretrained(final)  # loads strictly
    return json.loads((out / "eval.json").read_text())


@pytest.mark.slow
def test_dpo_learns_a_synthetic_preference(tmp_path, tokenizer_json):
    tokenizer = load_tokenizer(tokenizer_json)
    model_dir = save_random_checkpoint(tmp_path / "tiny", small_config(), seed=0, tokenizer=tokenizer)
    data = write_jsonl(tmp_path / "synthetic.jsonl", make_synthetic_pairs(400, seed=0))
    out = tmp_path / "run"
    start = time.perf_counter()
    result = run_cli("--model", str(model_dir), "--data", str(data), "--no-filter", "--num-pairs", "256",
                     "--eval-pairs", "100", "--train-last-n", "1", "--lr", "1e-3", "--output-dir", str(out),
                     "--no-progress")
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    ev = assert_outputs(out)
    print(f"\nreference accuracy {ev['reference_accuracy']:.1%} -> policy accuracy {ev['policy_accuracy']:.1%} "
          f"in {seconds:.0f} s")
    assert 0.3 <= ev["reference_accuracy"] <= 0.7  # no preference before training
    assert ev["policy_accuracy"] >= 0.9
    assert ev["reward_accuracy"] >= 0.9 and ev["mean_margin"] > 0
    assert "preference accuracy" in result.stdout  # the reference-vs-policy table
    # The trained policy is a HuggingFace checkpoint: transformers loads it with equal logits.
    transformers = pytest.importorskip("transformers", reason="transformers is the loading oracle")
    ours = load_pretrained(out / "final")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode_ids("\n\nHuman: How do I bake bread?\n\nAssistant:")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_real_pipeline_on_hh_rlhf(tmp_path, tokenizer_json, hh_files):
    """Filter -> train -> eval on the real HH-RLHF test splits with the real tokenizer."""
    model_dir = save_random_checkpoint(tmp_path / "small", small_config(), seed=1,
                                       tokenizer=load_tokenizer(tokenizer_json))
    out = tmp_path / "run"
    result = run_cli("--model", str(model_dir), "--data", *map(str, hh_files), "--filter", "--num-pairs", "16",
                     "--eval-pairs", "16", "--max-length", "256", "--batch-size", "4", "--train-last-n", "1",
                     "--output-dir", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strong-preference filter: kept" in result.stderr  # the per-rule report
    assert "skipped 24" in result.stderr  # HH rows without a usable preference, reported
    ev = assert_outputs(out)
    assert ev["num_pairs"] == 16 and ev["steps"] == 4 and ev["train_pairs"] == 16
    assert 0.0 <= ev["reference_accuracy"] <= 1.0 and 0.0 <= ev["policy_accuracy"] <= 1.0
    assert ev["data"]["filter"]["kept"] >= 32


def test_held_out_prompts_cut_away_by_max_length_are_skipped_not_a_crash(tmp_path, tokenizer_json, hh_files):
    """The crash of issue 20: at --max-length 64 most held-out HH prompts lose every token to their long
    answers, and the first evaluation's samples raised `ValueError: prompt 0 has no tokens`."""
    from dpo.train import main

    model = save_random_checkpoint(tmp_path / "tiny", small_config(num_hidden_layers=4),
                                   tokenizer=load_tokenizer(tokenizer_json))
    out = tmp_path / "run"
    code = main(["--model", str(model), "--data", str(hh_files[0]), "--max-length", "64", "--train-last-n", "2",
                 "--num-pairs", "48", "--eval-pairs", "16", "--max-steps", "2", "--sample-tokens", "8",
                 "--output-dir", str(out), "--no-progress", "--dtype", "float32"])
    assert code == 0
    ev = json.loads((out / "eval.json").read_text())
    health = ev["history"][0]["health"]
    assert health["empty_skipped"] > 0  # prompts cut away: skipped and counted ...
    assert health["n_samples"] == 16 - health["empty_skipped"] > 0  # ... and the others answered
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == health["n_samples"] and all(s["prompt_ids"] for s in samples)
