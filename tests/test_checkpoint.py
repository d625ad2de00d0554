"""save_pretrained / load_pretrained: HF-compatible output and strict loading of checkpoint folders
(hub ids and their cache: tests/test_hub.py).

Every corrupt checkpoint must raise `CheckpointError` with a message naming the tensor or
file at fault, and must leave the checkpoint directory exactly as it was.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import smollm
from smollm import CheckpointError, SmolLM, load_pretrained, load_tokenizer, save_pretrained

from model_utils import random_model, save_random_checkpoint, small_config

# A small vocabulary keeps these files ~1 MB; nothing here decodes text with the model.
TIED = small_config(vocab_size=1024)
UNTIED = small_config(vocab_size=1024, tie_word_embeddings=False, num_key_value_heads=1, rope_theta=100000.0)
IDS = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).float()


def hf_logits(directory: Path) -> torch.Tensor:
    transformers = pytest.importorskip("transformers", reason="transformers is the compatibility oracle")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under `directory`: content hash and modification time."""
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


def assert_load_fails(directory: Path, *needles: str) -> str:
    """load_pretrained raises CheckpointError naming every needle, and touches nothing."""
    before = snapshot(directory)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(directory)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(directory) == before, "a failed load modified the checkpoint directory"
    return message


def edit_tensors(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def tied_model():
    return random_model(TIED, seed=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tied_model) -> Path:
    """A tied checkpoint saved once; tests that break things work on a copy (`ckpt`)."""
    return save_pretrained(tied_model, tmp_path_factory.mktemp("saved") / "ckpt")


@pytest.fixture
def ckpt(tmp_path, saved) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """An untied checkpoint split into shards of at most ~100 kB, and its model."""
    model = random_model(UNTIED, seed=2)
    return model, save_pretrained(model, tmp_path_factory.mktemp("sharded") / "ckpt", max_shard_bytes=100_000)


@pytest.fixture
def sharded_copy(tmp_path, sharded) -> Path:
    return Path(shutil.copytree(sharded[1], tmp_path / "ckpt"))


# ------------------------------------------------------------------- round trips
@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied"])
def test_transformers_loads_what_we_save(tmp_path, config):
    model = random_model(config, seed=3)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert max_diff(hf_logits(tmp_path), logits(model)) <= 1e-5
    ours = load_pretrained(tmp_path)
    assert ours.tied == config.tie_word_embeddings
    assert torch.equal(logits(ours), logits(model))


def test_sharded_checkpoint_round_trips(sharded):
    model, directory = sharded
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in directory.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (directory / "model.safetensors").exists()
    expected = dict(model.named_parameters())
    assert set(index["weight_map"]) == set(expected)  # untied: lm_head is a tensor of its own
    assert index["metadata"]["total_size"] == sum(p.numel() * p.element_size() for p in expected.values())
    for shard in shards:  # each shard fits the limit, unless it is one tensor larger than the limit
        names = [n for n, s in index["weight_map"].items() if s == shard]
        assert len(names) == 1 or sum(expected[n].numel() * 4 for n in names) <= 100_000

    assert torch.equal(logits(load_pretrained(directory)), logits(model))
    assert max_diff(hf_logits(directory), logits(model)) <= 1e-5


def test_tied_checkpoint_carrying_lm_head_loads_with_the_embedding(ckpt, tied_model):
    edit_tensors(ckpt / "model.safetensors", lambda t: t.update({"lm_head.weight": torch.randn(1024, 64)}))
    model = load_pretrained(ckpt)
    assert model.tied
    assert torch.equal(model.lm_head.weight, tied_model.model.embed_tokens.weight)
    assert torch.equal(logits(model), logits(tied_model))


def test_load_in_bfloat16(saved, tied_model):
    model = load_pretrained(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.tied
    assert model.rotary.cos.dtype == torch.float32
    torch.testing.assert_close(model.model.embed_tokens.weight, tied_model.model.embed_tokens.weight.bfloat16())
    assert max_diff(logits(model), logits(tied_model)) < 0.05


def test_bfloat16_checkpoint_loads_as_float32_by_default(tmp_path, tied_model):
    save_pretrained(tied_model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    model = load_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.model.embed_tokens.weight, tied_model.model.embed_tokens.weight.bfloat16().float())


# --------------------------------------------------------------- bad checkpoints
def test_missing_tensor_is_named(ckpt):
    edit_tensors(ckpt / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    assert_load_fails(ckpt, "missing", "model.layers.1.mlp.down_proj.weight")


def test_wrong_shape_names_tensor_and_both_shapes(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_tensors(ckpt / "model.safetensors", lambda t: t.update({name: torch.zeros(32, 64)}))
    assert_load_fails(ckpt, name, "(32, 64)", "(64, 64)")


def test_unexpected_tensor_is_named(ckpt):
    name = "model.layers.0.self_attn.q_proj.bias"
    edit_tensors(ckpt / "model.safetensors", lambda t: t.update({name: torch.zeros(64)}))
    assert_load_fails(ckpt, "unexpected", name)


def test_truncated_file_is_named(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert_load_fails(ckpt, str(file), "truncated")


@pytest.mark.parametrize("size", [5, 4096], ids=["tiny", "4k"])
def test_garbage_file_is_named(ckpt, size):
    file = ckpt / "model.safetensors"
    file.write_bytes(random.Random(size).randbytes(size))
    assert_load_fails(ckpt, str(file))


def test_index_naming_a_missing_shard(sharded_copy):
    last = sorted(sharded_copy.glob("model-*-of-*.safetensors"))[-1]
    last.unlink()
    assert_load_fails(sharded_copy, "model.safetensors.index.json", last.name, "missing")


def test_index_shard_name_escaping_the_directory_is_refused(sharded_copy):
    index_file = sharded_copy / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = next(iter(index["weight_map"]))
    shard = index["weight_map"][first]
    shutil.copyfile(sharded_copy / shard, sharded_copy.parent / shard)  # present, but outside: still refused
    index["weight_map"][first] = f"../{shard}"
    index_file.write_text(json.dumps(index))
    assert_load_fails(sharded_copy, f"../{shard}", "outside")


class _PickleBomb:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoint_is_never_loaded(ckpt, tmp_path):
    marker = tmp_path / "unpickled"
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_PickleBomb(marker)))
    assert_load_fails(ckpt, "pytorch_model.bin", "pickle", "never loaded")
    assert not marker.exists()


def test_no_weights_at_all(ckpt):
    (ckpt / "model.safetensors").unlink()
    assert_load_fails(ckpt, "model.safetensors")


def test_missing_config_is_an_error(ckpt):
    (ckpt / "config.json").unlink()
    assert_load_fails(ckpt, "config.json")


def test_config_not_matching_the_weights_is_a_shape_error(ckpt):
    edit_config(ckpt, hidden_size=128)
    message = assert_load_fails(ckpt, "shape", "(1024, 128)")
    assert any(f"tensor {name} has shape" in message for name in load_file(ckpt / "model.safetensors"))


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="mistral"), "model_type"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
], ids=["mistral", "rope-linear", "attention-bias", "mlp-bias", "gelu", "bad-gqa"])
def test_unsupported_config_is_refused(ckpt, changes, field):
    edit_config(ckpt, **changes)
    assert_load_fails(ckpt, field, "config.json")


def test_file_instead_of_directory_and_missing_directory(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="is a file"):
        load_pretrained(ckpt / "config.json")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------- saving
def test_save_with_tokenizer_is_atomic_and_loads_back(tmp_path, tied_model, tokenizer_json):
    tokenizer = load_tokenizer(tokenizer_json)
    save_pretrained(tied_model, tmp_path, tokenizer=tokenizer)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    back = load_tokenizer(tmp_path)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert back.encode_ids("Hello <|im_end|>") == tokenizer.encode_ids("Hello <|im_end|>")


def test_saved_files_get_the_usual_permissions(tmp_path, tied_model, tokenizer_json):
    old = os.umask(0o022)
    try:
        save_pretrained(tied_model, tmp_path, tokenizer=tokenizer_json)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o644}, modes  # not mkstemp's 0600


def test_resave_in_place_with_its_own_tokenizer(tmp_path, tied_model, tokenizer_json):
    save_pretrained(tied_model, tmp_path, tokenizer=tokenizer_json)
    model = load_pretrained(tmp_path)
    save_pretrained(model, tmp_path, tokenizer=tmp_path)  # tokenizer source == destination
    assert (tmp_path / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
    assert torch.equal(logits(load_pretrained(tmp_path)), logits(tied_model))


def test_resave_replaces_shards_with_a_single_file(sharded_copy):
    model = random_model(UNTIED, seed=5)
    save_pretrained(model, sharded_copy)
    assert not (sharded_copy / "model.safetensors.index.json").exists()
    assert torch.equal(logits(load_pretrained(sharded_copy)), logits(model))


def test_crash_during_save_leaves_the_old_checkpoint(ckpt, tied_model, monkeypatch):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    before = snapshot(ckpt)
    monkeypatch.setattr(smollm.checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(random_model(TIED, seed=9), ckpt)
    after = snapshot(ckpt)
    assert after["model.safetensors"] == before["model.safetensors"]
    assert sorted(after) == sorted(before)  # no temporary file left behind
    assert torch.equal(logits(load_pretrained(ckpt)), logits(tied_model))


# ------------------------------------------------------------ header-only verification
@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_shapes_match_the_models_parameters(tied):
    from smollm.checkpoint import checkpoint_shapes

    config = small_config(tie_word_embeddings=tied, num_key_value_heads=1)
    model = SmolLM(config)
    assert checkpoint_shapes(config) == {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_verify_checkpoint_reads_headers_and_finds_each_problem(tmp_path):
    from smollm.checkpoint import verify_checkpoint

    good = save_random_checkpoint(tmp_path / "good", small_config())
    assert verify_checkpoint(good) == load_pretrained(good).config
    # a config that does not match the weights
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape .*160.* expects .*96"):
        verify_checkpoint(bad)
    # a truncated file
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_checkpoint(good)
