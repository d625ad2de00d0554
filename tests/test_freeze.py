"""Layer freezing: exactly the last N blocks (+ head and final norm) train."""
from __future__ import annotations

import pytest
import torch

from dpo.freeze import count_shared, freeze_all_but_last, frozen_reference
from smollm import SMOLLM_135M, SmolLM, load_pretrained, save_pretrained

from model_utils import random_model, small_config


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_last_n_blocks_and_untied_head_train():
    model = random_model(small_config(num_hidden_layers=4))
    report = freeze_all_but_last(model, 1)
    names = trainable_names(model)
    assert all(n.startswith(("model.layers.3.", "model.norm.", "lm_head.")) for n in names)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    assert any(n.startswith("model.layers.3.") for n in names)
    assert not model.tied  # the head got its own copy; the embedding stays frozen
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < report.percent < 100 and "layers 3-3" in str(report)


def test_assignment_setting_on_the_135m_config():
    """The first 25 of 30 blocks frozen: the last 5 blocks + final norm + untied head train."""
    with torch.device("meta"):
        model = SmolLM(SMOLLM_135M)
    report = freeze_all_but_last(model, 5)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    # q, o [576 x 576]; k, v [192 x 576] (3 KV heads of 64); gate, up, down 576 x 1536; two norms
    assert per_block == 2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536 + 2 * 576 == 3_540_096
    assert report.trainable == 5 * per_block + 576 + 49152 * 576
    assert report.total == 134_515_008 + 49152 * 576  # the 135M model plus the untied head copy


def test_freeze_head_too():
    model = random_model(small_config(num_hidden_layers=3))
    freeze_all_but_last(model, 2, train_head=False, train_final_norm=False)
    assert model.tied  # nothing to untie
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in trainable_names(model))


def test_too_many_blocks_is_an_error():
    with pytest.raises(ValueError, match="the model has 2"):
        freeze_all_but_last(random_model(small_config()), 3)


def test_reference_shares_frozen_tensors_and_copies_trainable_ones():
    model = random_model(small_config(num_hidden_layers=4))
    freeze_all_but_last(model, 1)
    reference = frozen_reference(model)
    assert all(not p.requires_grad for p in reference.parameters())
    assert reference.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight
    assert reference.lm_head.weight is not model.lm_head.weight
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert count_shared(model, reference) == frozen
    with torch.no_grad():  # training the policy does not move the reference
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(model.lm_head.weight, reference.lm_head.weight)


def test_reference_head_is_the_frozen_embedding_until_the_policy_head_moves():
    """The untied policy head is a copy of the embedding; the reference needs no copy of its own."""
    model = random_model(small_config(num_hidden_layers=3))
    freeze_all_but_last(model, 1)
    reference = frozen_reference(model)
    assert reference.tied and reference.config.tie_word_embeddings
    assert reference.lm_head.weight is model.model.embed_tokens.weight  # shared, not copied
    assert reference.lm_head.weight is not model.lm_head.weight
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reference(ids), model(ids), atol=0, rtol=0)
        model.lm_head.weight.mul_(2.0)  # the policy's head trains; the reference keeps the embedding
        assert not torch.equal(reference(ids), model(ids))
    later = frozen_reference(model)  # a reference of the trained policy copies its head
    assert not later.tied and torch.equal(later.lm_head.weight, model.lm_head.weight)
    assert later.lm_head.weight is not model.lm_head.weight


def test_untied_policy_saves_an_untied_checkpoint(tmp_path):
    model = random_model(small_config(num_hidden_layers=2))
    freeze_all_but_last(model, 1)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert not loaded.tied
    ids = torch.randint(0, 1000, (1, 8))
    torch.testing.assert_close(loaded(ids), model(ids))
