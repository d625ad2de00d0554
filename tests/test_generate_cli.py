"""`python -m smollm.generate` as a user runs it: a subprocess on a saved tiny random checkpoint.

Each subprocess pays for importing torch, so the few runs that must be real processes start
together (module fixture) and the tests read their results; the rest call `main()` in-process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smollm import generate, load_pretrained, load_tokenizer
from smollm.cli import main

from model_utils import save_random_checkpoint, small_config

REPO = Path(__file__).resolve().parents[1]
SAMPLING = ["--temperature", "0.8", "--top-k", "5"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_json) -> Path:
    directory = tmp_path_factory.mktemp("cli") / "tiny"
    return save_random_checkpoint(directory, small_config(), seed=7, tokenizer=load_tokenizer(tokenizer_json))


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    model = ["--model", str(checkpoint), "--device", "cpu", "--prompt", "Hello", "--max-new-tokens", "5"]
    commands = {  # name: (module, arguments)
        "greedy": ("smollm.generate", model),
        "greedy-package": ("smollm", model),  # python -m smollm: the same command
        "missing-model": ("smollm.generate",
                          ["--model", str(tmp_path_factory.mktemp("empty") / "no-such-model"), "--prompt", "Hi"]),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SMOLLM_OFFLINE": "1"}
    procs = {
        name: subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        for name, (module, args) in commands.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=180)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_greedy_continues_the_prompt(runs, checkpoint):
    result = runs["greedy"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and result.stdout.endswith("\n")
    assert stderr_lines(result) == []

    # The same continuation, computed in this process.
    tokenizer, model = load_tokenizer(checkpoint), load_pretrained(checkpoint)
    ids = torch.tensor([tokenizer.encode_ids("Hello")])
    new = generate(model, ids, 5, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    text = tokenizer.decode([t for t in new if t != tokenizer.eos_token_id])
    printed = result.stdout[len("Hello"):-1]
    assert printed == text or (text.endswith("\ufffd") and text.startswith(printed))


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """main() in this process: (exit code, stdout, stderr)."""
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_mentions_the_sampling_flags(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for flag in ("--temperature", "--top-k", "--top-p", "--seed", "--model", "--max-new-tokens"):
        assert flag in out


def test_sampling_with_a_seed_is_reproducible(checkpoint, capsys):
    args = ["--model", str(checkpoint), "--device", "cpu", "--prompt", "Hello", "--max-new-tokens", "5", *SAMPLING]
    code, first, err = run_main(capsys, *args, "--seed", "1")
    assert code == 0 and err == "" and first.startswith("Hello")
    torch.manual_seed(1234)  # whatever the global RNG holds, --seed decides
    assert run_main(capsys, *args, "--seed", "1") == (0, first, "")
    assert run_main(capsys, *args, "--seed", "2")[1] != first  # the seed really drives sampling


def test_missing_model_is_a_one_line_error(runs):
    result = runs["missing-model"]
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "no-such-model" in lines[0] and "no such checkpoint directory" in lines[0]
    assert result.stdout == ""


def test_bad_tokenizer_is_a_one_line_error(checkpoint, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{")
    code, out, err = run_main(capsys, "--model", str(checkpoint), "--device", "cpu", "--prompt", "Hi",
                              "--tokenizer", str(bad))
    assert code == 2
    assert err.startswith("error: ") and str(bad) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--max-new-tokens", "-3")])
def test_negative_values_are_usage_errors(checkpoint, capsys, flag, value):
    code, _, err = run_main(capsys, "--model", str(checkpoint), "--prompt", "Hi", flag, value)
    assert code == 2
    assert f"{flag} must be >= 0" in err


def test_python_m_smollm_is_the_same_command(runs):
    assert runs["greedy-package"].returncode == 0, runs["greedy-package"].stderr
    assert runs["greedy-package"].stdout == runs["greedy"].stdout


def test_the_command_module_cannot_shadow_the_generate_function():
    import smollm

    with pytest.raises(ImportError, match="smollm.cli"):
        import smollm.generate  # noqa: F401
    assert callable(smollm.generate) and smollm.generate is generate
