"""The fast path (shared frozen trunk, head only at response positions) equals the plain path."""
from __future__ import annotations

import copy

import pytest
import torch

from dpo.batch_logps import SharedTrunk, head_logps, plain_logps, policy_and_reference_logps
from dpo.config import TrainConfig
from dpo.freeze import first_trainable_layer, freeze_all_but_last, frozen_reference
from dpo.logprobs import sequence_logprobs
from dpo.tokenization import TokenizedPair, collate_pairs
from dpo.trainer import DPOTrainer

from model_utils import random_model, small_config


def crafted_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of varied lengths: prompt 3-12 tokens, responses 2-9 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(3, 13, (1,), generator=g))
        c, r = (int(x) for x in torch.randint(2, 10, (2,), generator=g))
        prompt = torch.randint(3, 1000, (p,), generator=g).tolist()
        chosen = torch.randint(3, 1000, (c,), generator=g).tolist()
        rejected = torch.randint(3, 1000, (r,), generator=g).tolist()
        out.append(TokenizedPair(index=i, source=f"crafted:{i}", chosen_ids=prompt + chosen,
                                 chosen_mask=[0] * p + [1] * c, rejected_ids=prompt + rejected,
                                 rejected_mask=[0] * p + [1] * r, prompt_len=p))
    return out


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_head_logps_equals_sequence_logprobs_over_full_logits(reduction):
    model = random_model(small_config())
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        full = sequence_logprobs(model.lm_head(hidden), batch["input_ids"], batch["response_mask"], reduction)
        sparse = head_logps(model.lm_head, hidden, batch["input_ids"], batch["response_mask"], reduction)
    torch.testing.assert_close(sparse, full, atol=1e-5, rtol=0)


def _policy_and_reference(n_train: int, seed: int = 0):
    policy = random_model(small_config(num_hidden_layers=4), seed=seed)
    freeze_all_but_last(policy, n_train)
    return policy, frozen_reference(policy)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_shared_trunk_gives_plain_losses_and_gradients(reduction):
    """Same log-probs and the same gradients on every trainable parameter (fp32, 1e-5)."""
    pol_a, ref_a = _policy_and_reference(2)
    pol_b, ref_b = copy.deepcopy(pol_a), None
    ref_b = frozen_reference(pol_b)
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    trunk = SharedTrunk(pol_a, ref_a)
    assert trunk.split == 2
    fast_pol, fast_ref = policy_and_reference_logps(pol_a, ref_a, batch, reduction, trunk)
    plain_pol, plain_ref = policy_and_reference_logps(pol_b, ref_b, batch, reduction, None)
    torch.testing.assert_close(fast_pol, plain_pol, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_ref, plain_ref, atol=1e-5, rtol=0)
    (fast_pol * torch.arange(1.0, 9.0)).sum().backward()
    (plain_pol * torch.arange(1.0, 9.0)).sum().backward()
    grads_a = {n: p.grad for n, p in pol_a.named_parameters() if p.requires_grad}
    grads_b = {n: p.grad for n, p in pol_b.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=0, msg=name)


def test_shared_trunk_training_trajectory_equals_plain():
    """A few optimizer steps: the same losses and the same final weights."""
    pairs = crafted_pairs(24)
    runs = []
    for shared in (True, False):
        policy, reference = _policy_and_reference(1, seed=4)
        config = TrainConfig(batch_size=4, max_steps=4, shared_trunk=shared, beta=0.5, logp_reduction="sum")
        trainer = DPOTrainer(policy, reference, pairs, config, pad_token_id=0)
        assert (trainer.shared_trunk is not None) == shared
        losses = [trainer.train_step()["loss"] for _ in range(4)]
        runs.append((losses, {n: t.clone() for n, t in trainer.trainable_state().items()}))
    (loss_a, w_a), (loss_b, w_b) = runs
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert loss_a[0] == pytest.approx(0.6931472, abs=1e-5)  # policy == reference at the start: ln 2
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=1e-5, rtol=0, msg=name)


def test_shared_trunk_refuses_a_reference_that_does_not_share():
    policy, _ = _policy_and_reference(1)
    stranger = copy.deepcopy(policy)
    with pytest.raises(ValueError, match="shares the policy's frozen trunk"):
        SharedTrunk(policy, stranger)


def test_first_trainable_layer():
    policy, _ = _policy_and_reference(1)
    assert first_trainable_layer(policy) == 3
    full = random_model(small_config())
    freeze_all_but_last(full, 2)  # everything, head tied to the embedding
    assert first_trainable_layer(full) == 0
