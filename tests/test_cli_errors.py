"""`python -m dpo.train` with bad models and bad flags: one line `error: ...`, exit code 2,
before any expensive work, and no output directory left behind.

Most cases call `dpo.train.main([...])` in-process (what `python -m dpo.train` runs); one
runs the real command to show the exit code and the bare stderr line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dpo.cli
import dpo.train
from dpo.train import main
from smollm import load_tokenizer

from model_utils import save_random_checkpoint, small_config, tiny_run_inputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_json) -> Path:
    return tiny_run_inputs(tmp_path_factory.mktemp("tiny"), tokenizer_json, 16, seed=6)


@pytest.fixture
def model_copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny / "model", tmp_path / "model"))


@pytest.fixture
def guarded(monkeypatch):
    """Record the expensive steps; the checks under test must come before them."""
    called = []
    monkeypatch.setattr(dpo.train, "load_pretrained", lambda *a, **k: called.append("load_pretrained") or 1 / 0)
    real_prepare = dpo.train.prepare_data
    monkeypatch.setattr(dpo.train, "prepare_data",
                        lambda *a, **k: called.append("prepare_data") or real_prepare(*a, **k))
    return called


def args(tiny: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["--model", str(model or tiny / "model"), "--data", str(tiny / "pairs.jsonl"), "--output-dir", str(out),
            "--no-filter", "--train-last-n", "1", "--batch-size", "2", "--num-pairs", "8", "--eval-pairs", "2",
            "--max-steps", "2", "--no-progress", *extra]


def fails(argv: list[str], capsys, *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err[-2000:]
    missing = [e for e in expected if e not in line]
    assert not missing, f"{missing} not in: {line}"
    return line


# ====================================================================== 6. bad models
def test_truncated_weights(tiny, tmp_path, model_copy, capsys, guarded):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "run"
    fails(args(tiny, out, model=model_copy), capsys, str(weights), "corrupt or truncated")
    assert guarded == [] and not out.exists()  # found from the header, before the data


def test_garbage_weights(tiny, tmp_path, model_copy, capsys, guarded):
    (model_copy / "model.safetensors").write_bytes(os.urandom(4096))
    fails(args(tiny, tmp_path / "run", model=model_copy), capsys, "model.safetensors", "corrupt or truncated")
    assert guarded == []


def test_config_that_does_not_match_the_weights(tiny, tmp_path, model_copy, capsys, guarded):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    fails(args(tiny, tmp_path / "run", model=model_copy), capsys,
          "model.safetensors: tensor model.layers.0.mlp.", "(from config.json) expects", "128")
    assert guarded == []


def test_config_with_more_layers_than_the_weights(tiny, tmp_path, model_copy, capsys):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    out = tmp_path / "run"
    fails(args(tiny, out, model=model_copy), capsys, "tensors missing", "model.layers.2.")
    assert not out.exists()  # load_pretrained found it; the output directory was not made yet


@pytest.mark.parametrize("change, expected", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"architectures": ["MistralForCausalLM"]}, "architectures=['MistralForCausalLM'] is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"hidden_size": "big"}, "hidden_size"),
])
def test_unknown_architecture(tiny, tmp_path, model_copy, capsys, guarded, change, expected):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, **change}))
    fails(args(tiny, tmp_path / "run", model=model_copy), capsys, "config.json", expected)
    assert guarded == []


def test_unreadable_config(tiny, tmp_path, model_copy, capsys, guarded):
    (model_copy / "config.json").write_text("{ not json")
    fails(args(tiny, tmp_path / "run", model=model_copy), capsys, "config.json", "not valid JSON")


def test_tokenizer_that_does_not_fit_the_model(tiny, tmp_path, capsys, guarded, tokenizer_json):
    small_vocab = save_random_checkpoint(tmp_path / "small", small_config(vocab_size=1024),
                                         tokenizer=load_tokenizer(tokenizer_json))
    fails(args(tiny, tmp_path / "run", model=small_vocab), capsys,
          "the tokenizer has 49152 tokens but the model's vocab_size is 1024", "--tokenizer")
    assert guarded == []


def test_missing_or_broken_tokenizer(tiny, tmp_path, model_copy, capsys, guarded):
    (model_copy / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    fails(args(tiny, tmp_path / "run", model=model_copy), capsys, "tokenizer.json", "not a valid tokenizer.json")
    (model_copy / "tokenizer.json").unlink()
    fails(args(tiny, tmp_path / "run", model=model_copy), capsys, "has no tokenizer.json; pass --tokenizer")
    assert guarded == []


def test_pickle_only_model_is_refused(tiny, tmp_path, model_copy, capsys, guarded):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    fails(args(tiny, tmp_path / "run", model=model_copy), capsys, "pytorch_model.bin", "pickle", "never loaded")


def test_missing_model_directory(tiny, tmp_path, capsys, guarded):
    missing = tmp_path / "no" / "such" / "model"
    fails(args(tiny, tmp_path / "run", model=missing), capsys, "no such checkpoint directory")


# ====================================================================== 7. bad flags
FLAG_ERRORS = {
    "beta-zero": (["--beta", "0"], "--beta: beta must be a finite number > 0, got 0.0"),
    "beta-negative": (["--beta", "-1"], "--beta: beta must be a finite number > 0"),
    "beta-nan": (["--beta", "nan"], "--beta: beta must be a finite number > 0"),
    "robust-smoothing-half": (["--loss-type", "robust", "--label-smoothing", "0.5"],
                              "--label-smoothing: label_smoothing for loss_type 'robust' must be in [0, 0.5)"),
    "ipo-smoothing": (["--loss-type", "ipo", "--label-smoothing", "0.1"],
                      "--label-smoothing: label_smoothing is not a parameter of any of loss_types ipo"),
    "weights-count": (["--loss-type", "sigmoid", "sft", "--loss-weights", "1"],
                      "--loss-weights: weights has 1 entries for 2 loss types"),
    "gamma-for-dpo": (["--loss-type", "sigmoid", "--simpo-gamma", "0.5"],
                      "--simpo-gamma: gamma is not a parameter of any of loss_types sigmoid"),
    "gamma-for-default": (["--simpo-gamma", "0.5"], "--simpo-gamma: gamma is not a parameter of any of loss_types apo_zero"),
    "exo-smoothing-zero": (["--loss-type", "exo_pair", "--label-smoothing", "0"], "--label-smoothing: "),
    "batch-size-zero": (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    "prompt-not-shorter": (["--max-length", "64", "--max-prompt-length", "64"],
                           "--max-prompt-length: must be in [1, max_length=64)"),
    "lr-zero": (["--lr", "0"], "--lr: must be a positive finite number"),
    "keep-zero": (["--keep-checkpoints", "0"], "--keep-checkpoints: must be at least 1"),
    "nothing-to-train": (["--train-last-n", "0", "--freeze-head"], "leaves nothing to train"),
}


@pytest.mark.parametrize("case", list(FLAG_ERRORS))
def test_bad_flag_is_rejected_before_anything_is_loaded(tiny, tmp_path, capsys, monkeypatch, case):
    called = []
    for module, name in ((dpo.train, "load_pretrained"), (dpo.train, "prepare_data"),
                         (dpo.cli, "load_tokenizer"), (dpo.cli, "resolve_checkpoint_dir")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: called.append(_n))
    flags, expected = FLAG_ERRORS[case]
    out = tmp_path / "run"
    line = fails(args(tiny, out, *flags), capsys, expected)
    assert line == f"error: {expected}" or expected in line
    assert called == [] and not out.exists()


def test_train_last_n_larger_than_the_model(tiny, tmp_path, capsys, guarded):
    out = tmp_path / "run"
    fails(args(tiny, out, "--train-last-n", "5"), capsys, "--train-last-n 5: the model has only 2 blocks")
    assert guarded == [] and not out.exists()  # only config.json was read


def test_max_length_beyond_the_model(tiny, tmp_path, capsys, guarded):
    fails(args(tiny, tmp_path / "run", "--max-length", "4096"), capsys,
          "--max-length 4096 exceeds the model's max_position_embeddings (512)")
    assert guarded == []


def test_output_dir_holding_a_previous_run(tiny, tmp_path, capsys, guarded):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    fails(args(tiny, out), capsys, f"--output-dir {out} already holds a run (metrics.jsonl)", "--resume", "--overwrite")
    assert guarded == [] and sorted(os.listdir(out)) == ["metrics.jsonl"]


def test_output_dir_that_is_a_file(tiny, tmp_path, capsys, guarded):
    out = tmp_path / "run"
    out.write_text("not a directory")
    fails(args(tiny, out), capsys, f"--output-dir {out} is a file")
    assert guarded == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_dir_that_cannot_be_written(tiny, tmp_path, capsys, guarded):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    fails(args(tiny, locked / "run"), capsys, "cannot write in")


def test_resume_without_a_checkpoint(tiny, tmp_path, capsys, guarded):
    (tmp_path / "empty").mkdir()
    fails(["--resume", str(tmp_path / "empty")], capsys, "no checkpoint there")
    fails(["--resume", str(tmp_path / "missing")], capsys, "missing", "no checkpoint there")
    assert guarded == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tiny, tmp_path, capsys, guarded):
    fails(args(tiny, tmp_path / "run", "--device", "cuda"), capsys, "CUDA is not available")
    fails(args(tiny, tmp_path / "run", "--device", "gpu"), capsys, "--device gpu")
    assert guarded == []


def test_real_command_exit_code_and_single_error_line(tiny, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dpo.train", *args(tiny, out, "--beta", "-0.5")], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: --beta: beta must be a finite number > 0, got -0.5\n"
    assert proc.stdout == "" and not out.exists()
