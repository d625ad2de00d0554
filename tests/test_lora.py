"""LoRA (smollm.lora): peft's numbers and files, a reference that copies nothing, the engine's
equality with the textbook path, and `python -m dpo.train --lora-r` end to end."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo.engine import LogProbEngine, textbook_policy_and_reference_logps
from dpo.tokenization import collate_pairs
from smollm import load_pretrained, load_tokenizer
from smollm.checkpoint import CheckpointError, save_pretrained
from smollm.config import ConfigError
from smollm.lora import (LoRAConfig, LoRALinear, add_lora, load_peft, lora_layers, merge_lora, save_peft,
                         without_adapters)

from model_utils import assert_fp32_close, crafted_pairs, random_model, save_random_checkpoint, small_config

REPO = Path(__file__).resolve().parents[1]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(layers=None, targets=ALL, r=4, seed=0):
    torch.manual_seed(seed)
    model = random_model(small_config(num_hidden_layers=4), seed=seed)
    add_lora(model, LoRAConfig(r=r, alpha=2 * r, targets=list(targets), layers=layers))
    return model


def perturb(model, scale=0.05, seed=1):
    """Move B away from zero, so the adapters change the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(scale * torch.randn(layer.lora_B.weight.shape, generator=g))


def test_a_fresh_adapter_is_the_base_model_and_is_initialised_as_in_the_paper():
    base = random_model(small_config(num_hidden_layers=4), seed=0)
    model = copy.deepcopy(base)
    names = add_lora(model, LoRAConfig(r=8, alpha=16, targets=ALL + ["lm_head"]))
    assert len(names) == 4 * 7 + 1 and names[-1] == "lm_head"
    ids = torch.randint(5, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B = 0: exactly nothing added
    for layer in lora_layers(model).values():
        A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert float(A.abs().max()) <= bound
        assert float(A.std()) == pytest.approx(bound / math.sqrt(3), rel=0.2)
        assert torch.equal(B, torch.zeros_like(B))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.tied  # the head's base layer is still the embedding


def test_the_reference_is_the_model_with_adapters_off_and_copies_nothing():
    model = adapted()
    perturb(model)
    reference = without_adapters(model)
    # measured: every parameter of the reference is a tensor of the policy, same storage
    pointers = {p.data_ptr() for p in model.parameters()}
    copied = sum(p.numel() * p.element_size() for p in reference.parameters() if p.data_ptr() not in pointers)
    assert copied == 0 and not lora_layers(reference)
    assert not any(p.requires_grad for p in reference.parameters())
    ids = torch.randint(5, 300, (2, 7))
    with torch.no_grad():
        with_adapters = model(ids)
        for layer in lora_layers(model).values():
            layer.enabled = False
        assert torch.equal(reference(ids), model(ids))  # switched off = the reference
        assert not torch.equal(reference(ids), with_adapters)


@pytest.mark.parametrize("layers", [None, [2, 3]], ids=["all-blocks", "last-2-blocks"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_engine_with_lora_gives_textbook_logps_and_gradients(layers, reduction):
    """The engine runs blocks before the first adapter once (shared trunk), calls the adapted
    modules, and gives the textbook numbers: log-probs and every adapter's gradient."""
    pol_a = adapted(layers, targets=ALL + ["lm_head"])
    perturb(pol_a)
    pol_b = copy.deepcopy(pol_a)
    ref_a, ref_b = without_adapters(pol_a), without_adapters(pol_b)
    engine = LogProbEngine(pol_a, ref_a)
    assert engine.split == (0 if layers is None else 2)
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    fast_pol, fast_ref = engine(batch, reduction)
    plain_pol, plain_ref = textbook_policy_and_reference_logps(pol_b, ref_b, batch, reduction)
    assert_fp32_close(fast_pol, plain_pol)  # summed log-probs near -97: rounding grows with them
    assert_fp32_close(fast_ref, plain_ref)
    weights = torch.arange(1.0, 9.0)
    (fast_pol * weights).sum().backward()
    (plain_pol * weights).sum().backward()
    grads = {n: p.grad for n, p in pol_b.named_parameters() if p.requires_grad}
    for name, p in pol_a.named_parameters():
        if p.requires_grad:
            assert_fp32_close(p.grad, grads[name], msg=name)
            assert float(grads[name].abs().max()) > 0 or ".lora_A." in name  # B = 0 leaves A's gradient 0


def test_peft_loads_what_we_save_with_equal_logits_and_we_load_what_it_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = small_config(num_hidden_layers=3)
    save_random_checkpoint(tmp_path / "base", config, seed=1)
    ours = load_pretrained(tmp_path / "base")
    lora = LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj", "lm_head"], layers=[1, 2])
    add_lora(ours, lora)
    perturb(ours)
    save_peft(ours, tmp_path / "adapter", lora, base_model=str(tmp_path / "base"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base") and saved["r"] == 4
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=0)
        with theirs.disable_adapter():
            torch.testing.assert_close(theirs(ids).logits, without_adapters(ours)(ids), atol=1e-5, rtol=0)
    # and back: peft's own save_pretrained, read by load_peft
    theirs.save_pretrained(tmp_path / "from-peft")
    again = load_pretrained(tmp_path / "base")
    loaded = load_peft(again, tmp_path / "from-peft")
    assert sorted(loaded.targets) == sorted(lora.targets) and loaded.layers == [1, 2] and loaded.r == 4
    with torch.no_grad():
        torch.testing.assert_close(again(ids), expected, atol=1e-5, rtol=0)


def test_merge_folds_the_adapters_in_and_the_merged_model_saves_as_huggingface(tmp_path):
    model = adapted(targets=ALL + ["lm_head"])
    perturb(model)
    ids = torch.randint(5, 300, (2, 7))
    with torch.no_grad():
        expected = model(ids)
    with pytest.raises(CheckpointError, match="LoRA adapters"):
        save_pretrained(model, tmp_path / "refused")
    embedding = model.model.embed_tokens.weight.clone()
    assert merge_lora(model) == 4 * 7 + 1 and not lora_layers(model)
    assert not model.tied and torch.equal(model.model.embed_tokens.weight, embedding)  # the head alone changed
    save_pretrained(model, tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "merged")(ids), expected, atol=1e-5, rtol=0)


def test_bad_lora_settings_are_refused_with_the_flag():
    model = random_model(small_config(num_hidden_layers=4))
    with pytest.raises(ConfigError, match="--lora-targets: embed_tokens"):
        add_lora(model, LoRAConfig(targets=["embed_tokens"]))
    with pytest.raises(ConfigError, match="--lora-r"):
        add_lora(model, LoRAConfig(r=0))
    with pytest.raises(ConfigError, match=r"--lora-layers: block indices must be in \[0, 4\)"):
        add_lora(model, LoRAConfig(layers=[4]))
    add_lora(model, LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ConfigError, match="already has LoRA"):
        add_lora(model, LoRAConfig())
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    from dpo.config import TrainConfig

    with pytest.raises(ConfigError, match="--merge-lora: needs --lora-r"):
        TrainConfig(merge_lora=True).check()
    with pytest.raises(ConfigError, match="--lora-layers 9: the model has only 4 blocks"):
        TrainConfig(lora_r=4, lora_layers=9).lora_config(4)


def _train(tmp_path: Path, tokenizer_json, *flags: str) -> tuple[Path, subprocess.CompletedProcess]:
    from dpo.data import make_synthetic_pairs

    model = save_random_checkpoint(tmp_path / "tiny", small_config(), seed=0, tokenizer=load_tokenizer(tokenizer_json))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in make_synthetic_pairs(60, seed=0)))
    out = tmp_path / "run"
    args = ["--model", str(model), "--data", str(data), "--no-filter", "--num-pairs", "32", "--eval-pairs", "8",
            "--batch-size", "4", "--max-steps", "4", "--lr", "1e-2", "--sample-prompts", "2", "--sample-tokens", "8",
            "--no-progress", "--output-dir", str(out), "--lora-r", "4", *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SMOLLM_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "dpo.train", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return model, result


@pytest.mark.slow
def test_dpo_train_with_lora_writes_a_peft_folder_that_peft_loads(tmp_path, tokenizer_json):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model, result = _train(tmp_path, tokenizer_json, "--lora-layers", "1")
    final = tmp_path / "run" / "final"
    assert sorted(p.name for p in final.iterdir() if p.name.startswith("adapter")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model)
    assert "nothing copied" in result.stderr and "LoRA r=4" in result.stderr
    ours = load_pretrained(model)
    load_peft(ours, final)
    assert any(float(m.lora_B.weight.detach().abs().max()) > 0 for m in lora_layers(ours).values())  # it trained
    base = transformers.LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    theirs = peft.PeftModel.from_pretrained(base, final).eval()
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dpo_train_merge_lora_writes_huggingface_weights_that_export_to_gguf(tmp_path, tokenizer_json):
    pytest.importorskip("gguf")
    from smollm.convert import main as convert

    _, _ = _train(tmp_path, tokenizer_json, "--merge-lora")
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
    merged = load_pretrained(final)
    assert convert([str(final), str(tmp_path / "merged.gguf"), "--type", "f32"]) == 0
    again = load_pretrained(tmp_path / "merged.gguf")
    ids = torch.randint(5, 300, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), merged(ids), atol=1e-5, rtol=0)
