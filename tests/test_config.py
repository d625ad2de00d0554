"""SmolLMConfig: presets, HF config.json in and out, and refusal of invalid values."""
from __future__ import annotations

import dataclasses
import json

import pytest

from smollm import PRESETS, SMOLLM2_135M, SMOLLM_135M, SMOLLM_360M, ConfigError, SmolLMConfig

from model_utils import small_config


def test_smollm_135m_preset_matches_the_hub_config():
    c = SMOLLM_135M
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.intermediate_size, c.vocab_size, c.head_dim) == (1536, 49152, 64)
    assert c.rope_theta == 10000.0
    assert c.tie_word_embeddings


def test_smollm2_and_360m_presets():
    assert SMOLLM2_135M.rope_theta == 100000.0
    assert (SMOLLM2_135M.num_hidden_layers, SMOLLM2_135M.hidden_size) == (30, 576)
    c = SMOLLM_360M
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (32, 960, 15, 5)
    assert (c.intermediate_size, c.head_dim) == (2560, 64)
    assert PRESETS["smollm-135m"] is SMOLLM_135M and PRESETS["smollm-360m"] is SMOLLM_360M


# (preset, parameters of the published checkpoint: the sizes on the model cards, counted)
PUBLISHED = {"smollm-135m": 134_515_008, "smollm2-135m": 134_515_008, "smollm-360m": 361_821_120,
             "smollm2-360m": 361_821_120, "smollm-1.7b": 1_711_376_384, "smollm2-1.7b": 1_711_376_384}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_every_size_builds_the_published_network_as_transformers_does(name):
    """Built on the meta device (no memory): the parameter count of the published checkpoint, and
    the very tensor names and shapes of transformers' LlamaForCausalLM from the same config.json."""
    import torch

    from smollm import SmolLM

    config = PRESETS[name]
    with torch.device("meta"):
        ours = SmolLM(config)
    assert ours.num_parameters() == PUBLISHED[name]
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle (requirements-dev.txt)")
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict()))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)


def test_hub_ids_name_their_presets_without_a_download():
    from smollm import SMOLLM2_1_7B, SMOLLM2_360M, preset_of

    assert preset_of("HuggingFaceTB/SmolLM2-1.7B") is SMOLLM2_1_7B
    assert preset_of("HuggingFaceTB/SmolLM2-360M") is SMOLLM2_360M
    assert (SMOLLM2_1_7B.rope_theta, SMOLLM2_1_7B.max_position_embeddings) == (130000.0, 8192)
    instruct = preset_of("HuggingFaceTB/SmolLM2-1.7B-Instruct")
    assert (instruct.bos_token_id, instruct.eos_token_id, instruct.pad_token_id) == (1, 2, 2)
    assert dataclasses.replace(instruct, bos_token_id=0, eos_token_id=0, pad_token_id=None) == SMOLLM2_1_7B
    with pytest.raises(ConfigError, match="no preset for 'HuggingFaceTB/SmolLM3-3B'"):
        preset_of("HuggingFaceTB/SmolLM3-3B")


def test_head_dim_defaults_to_hidden_over_heads_and_may_be_given():
    assert SmolLMConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2).head_dim == 16
    assert SmolLMConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=32).head_dim == 32
    # hidden_size not divisible by the heads is fine when head_dim is explicit
    assert SmolLMConfig(hidden_size=100, num_attention_heads=6, num_key_value_heads=2, head_dim=16).head_dim == 16


def test_padding_id_falls_back_to_eos_then_zero():
    assert SmolLMConfig(pad_token_id=5, eos_token_id=2).padding_id == 5
    assert SmolLMConfig(pad_token_id=None, eos_token_id=2).padding_id == 2
    assert SmolLMConfig(pad_token_id=None, eos_token_id=None).padding_id == 0


def test_from_json_reads_transformers5_rope_parameters(tmp_path):
    raw = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000},
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=[0, 2], head_dim=None,
        transformers_version="5.0.0", dtype="bfloat16",  # fields we do not use are ignored
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    c = SmolLMConfig.from_json(path)
    assert c.rope_theta == 100000
    assert c.head_dim == 64 and c.max_position_embeddings == 8192
    assert c.eos_token_id == 0  # the first of a list of EOS ids
    assert c == dataclasses.replace(SMOLLM2_135M, eos_token_id=0)


def test_from_json_reports_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        SmolLMConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        SmolLMConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        SmolLMConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("config", [
    small_config(),
    small_config(tie_word_embeddings=False, rope_theta=100000.0, head_dim=32, pad_token_id=2),
    SMOLLM_360M,
], ids=["small-tied", "small-untied-headdim", "360m"])
def test_to_hf_dict_round_trips_through_llama_config(config):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(**config.to_hf_dict())
    assert hf.model_type == "llama"
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim) == (
        config.hidden_size, config.num_key_value_heads, config.head_dim)
    assert hf.tie_word_embeddings == config.tie_word_embeddings
    back = SmolLMConfig.from_dict(json.loads(hf.to_json_string()))
    assert back == config


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=100, num_attention_heads=6), "hidden_size=100 is not divisible"),
    (dict(num_attention_heads=9, num_key_value_heads=2), "num_key_value_heads=2"),
    (dict(hidden_size=60, num_attention_heads=4, num_key_value_heads=2), "head_dim=15 must be even"),
    (dict(head_dim=7), "head_dim=7 must be even"),
    (dict(hidden_size=-576), "hidden_size"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(num_hidden_layers=-2), "num_hidden_layers"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(head_dim=-64), "head_dim"),
    (dict(hidden_size="576"), "hidden_size"),
    (dict(max_position_embeddings=2048.0), "max_position_embeddings"),
])
def test_invalid_values_raise_config_error(changes, field):
    with pytest.raises(ConfigError, match=field):
        SmolLMConfig(**changes)


def test_invalid_values_from_json_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(small_config().to_hf_dict(), num_key_value_heads=3)))
    with pytest.raises(ConfigError, match=r"config\.json.*num_key_value_heads=3"):
        SmolLMConfig.from_json(path)


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="mistral"), "model_type"),
    (dict(architectures=["MistralForCausalLM"]), "architectures"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "rope_parameters"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(pretraining_tp=2), "pretraining_tp"),
])
def test_unsupported_settings_are_refused(changes, field):
    raw = dict(small_config().to_hf_dict(), **changes)
    with pytest.raises(ConfigError, match=field):
        SmolLMConfig.from_dict(raw)
