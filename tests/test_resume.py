"""Killed, interrupted and resumed runs of `python -m dpo.train` (and `python -m dpo.sft`, the same
trainer and loop), as real subprocesses.

The guarantee: a run killed with SIGKILL at any moment and continued with `--resume RUN_DIR`
ends with the same final weights and the same metrics, bit for bit on CPU, as a run that was
never interrupted; Ctrl-C (SIGINT) and SIGTERM save a checkpoint, print where, and exit with
128 + the signal's number, without a traceback.

Setup: a 2-block random SmolLM with the real 49,152-token vocabulary and synthetic pairs.
Every subprocess gets the same environment (one intra-op thread, so that runs that overlap
do not fight over the two cores, and so that reductions are split the same way every time).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo.checkpointing import list_checkpoints

from model_utils import tiny_run_inputs

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "tokens_per_s")  # the only fields of metrics.jsonl allowed to differ
MAX_STEPS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_json) -> Path:
    return tiny_run_inputs(tmp_path_factory.mktemp("tiny"), tokenizer_json, 48, seed=1)


def train_args(tiny: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny / "model"), "--data", str(tiny / "pairs.jsonl"), "--output-dir", str(out),
            "--no-filter", "--train-last-n", "1", "--batch-size", "4", "--num-pairs", "40",
            "--eval-pairs", "8", "--max-steps", str(MAX_STEPS), "--no-progress", *extra]


def start(args: list[str], command: str = "dpo.train") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", command, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    """Poll (every 20 ms) until `condition()`; fail if the process ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def checkpoint_past(run: Path, step: int):
    return lambda: any(int(p.name[5:]) >= step for p in list_checkpoints(run))


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    weights = "adapter_model.safetensors" if (a / "final" / "adapter_model.safetensors").is_file() else "model.safetensors"
    wa, wb = load_file(a / "final" / weights), load_file(b / "final" / weights)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"final weights differ: {different}"
    ra, rb = metrics_rows(a), metrics_rows(b)
    assert [r["step"] for r in rb] == list(range(1, MAX_STEPS + 1))
    assert without_timing(ra) == without_timing(rb)
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (a, b))
    assert ea.pop("timing") and eb.pop("timing")  # wall times differ ...
    ma, mb = ea.pop("memory", {}), eb.pop("memory", {})  # ... and so does peak memory (dpo.train reports it)
    assert ma.pop("peak_rss_mb", 1) > 0 and mb.pop("peak_rss_mb", 1) > 0 and ma == mb  # nothing else may
    assert ea == eb  # accuracies, margins, the eval history, data counts


LORA = ["--lora-r", "4", "--lora-dropout", "0.1", "--lora-targets", "q_proj", "v_proj", "down_proj"]


@pytest.mark.slow
@pytest.mark.parametrize("command, flags", [("dpo.train", []), ("dpo.train", LORA), ("dpo.sft", [])],
                         ids=["last-block", "lora", "sft"])
def test_sigkill_sigint_and_resume_end_bitwise_like_an_uninterrupted_run(tiny, tmp_path, command, flags):
    plain, broken = tmp_path / "plain", tmp_path / "broken"
    # The uninterrupted run and the one to be killed run side by side. With LoRA (dropout
    # included, so the RNG state must resume too), final/ is peft's adapter folder.
    reference = start(train_args(tiny, plain, "--save-every", "1", *flags), command)
    victim = start(train_args(tiny, broken, "--save-every", "1", *flags), command)
    wait_until(checkpoint_past(broken, 3), victim, "a checkpoint at step 3")
    victim.send_signal(signal.SIGKILL)
    assert finish(victim)[0] == -signal.SIGKILL  # killed, not finished
    saved = list_checkpoints(broken)[-1]
    assert len(list_checkpoints(broken)) <= 3  # keep 2 (+ one being pruned at the moment of the kill)
    # A kill can come between a metrics line and the next checkpoint, even mid-line: simulate both.
    with open(broken / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": int(saved.name[5:]) + 1, "loss": 123.0}) + "\n" + '{"step": 9, "lo')

    # Resume; stop that session with Ctrl-C after two more steps ...
    resumed = start(["--resume", str(broken), "--no-progress"], command)
    wait_until(checkpoint_past(broken, int(saved.name[5:]) + 2), resumed, "two more steps")
    resumed.send_signal(signal.SIGINT)
    code, _, err = finish(resumed)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and f"resuming from {saved}" in err
    assert "checkpoint saved to" in err and f"python -m {command} --resume {broken}" in err

    # ... and resume again, to the end.
    code, _, err = finish(start(["--resume", str(broken), "--no-progress"], command))
    assert code == 0, err[-3000:]
    code, _, err = finish(reference)
    assert code == 0, err[-3000:]
    assert_same_run(plain, broken)
    assert not [p for p in (broken / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs


def test_sigint_and_sigterm_save_a_checkpoint_and_exit_cleanly(tiny, tmp_path):
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # side by side, to halve the wait
        out = tmp_path / signal.Signals(sig).name
        # No periodic checkpoints: the one found afterwards was written because of the signal.
        runs[sig] = (out, start(train_args(tiny, out, "--save-every", "0")))
    for sig, (out, proc) in runs.items():
        metrics = out / "metrics.jsonl"
        wait_until(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc, "two steps")
        proc.send_signal(sig)
    for sig, (out, proc) in runs.items():
        code, _, err = finish(proc)
        assert code == 128 + sig, err[-3000:]  # 130 for SIGINT, 143 for SIGTERM
        assert "Traceback" not in err
        assert f"{signal.Signals(sig).name} received" in err
        [ckpt] = list_checkpoints(out)
        assert f"checkpoint saved to {ckpt}" in err
        assert f"continue with: python -m dpo.train --resume {out}" in err
        step = json.loads((ckpt / "state.json").read_text())["step"]
        assert 2 <= step < MAX_STEPS
        assert [r["step"] for r in metrics_rows(out)] == list(range(1, step + 1))
        assert not (out / "final").exists()
