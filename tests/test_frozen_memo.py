"""dpo.frozen_memo: the runs of a sweep that share a `FrozenMemo` train exactly as they would alone.

A sweep's runs start from one base model, their reference, and train on the same batches: a later
run takes each batch's trunk output and reference log-probs from the memo. The losses and the
weights must be the same to the bit, the memo must really be used (hits), a batch with other
response masks must reuse the trunk but not the reference's log-probs, and a reference changed in
place must empty it.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dpo.config import TrainConfig
from dpo.frozen_memo import FrozenMemo
from dpo.policy import make_trainable
from dpo.trainer import DPOTrainer

from model_utils import crafted_pairs, random_model, small_config

STEPS = 3


@pytest.fixture(scope="module")
def base():
    return random_model(small_config(num_hidden_layers=3), seed=1).requires_grad_(False)


def run(base, pairs, memo: FrozenMemo | None, **settings):
    """A fresh policy sharing the base's frozen embedding and first 2 blocks (its last block trains),
    the base as its reference, trained STEPS steps: (losses, policy)."""
    trunk = [*base.model.embed_tokens.parameters(), *base.model.layers[:2].parameters()]
    policy = copy.deepcopy(base, memo={id(p): p for p in trunk})
    make_trainable(policy, None, train_last_n=1, train_head=False)
    config = TrainConfig(**{"batch_size": 4, "max_steps": STEPS, "lr": 1e-2, "beta": 0.5, "dtype": "float32",
                            "seed": 0, **settings})
    trainer = DPOTrainer(policy, base, pairs, config, pad_token_id=0, device="cpu", frozen_memo=memo)
    assert trainer.engine.split == 2
    return [trainer.train_step()["loss"] for _ in range(STEPS)], policy


def same_run(a, b) -> bool:
    (la, pa), (lb, pb) = a, b
    return la == lb and all(torch.equal(p, q) for p, q in zip(pa.parameters(), pb.parameters()))


def test_a_sweep_sharing_a_memo_trains_exactly_as_without_and_reuses_the_first_runs_batches(base):
    pairs = crafted_pairs(12)
    sweep = [dict(), dict(beta=2.0, lr=3e-2), dict(loss_type=["ipo"])]
    alone = [run(base, pairs, None, **s) for s in sweep]
    memo = FrozenMemo()
    shared = []
    for k, s in enumerate(sweep):
        shared.append(run(base, pairs, memo, **s))
        # the first run misses every lookup (trunk and reference: 2 a step); the later ones hit them all
        assert (memo.hits, memo.misses) == (2 * STEPS * k, 2 * STEPS)
    assert all(same_run(a, b) for a, b in zip(alone, shared))
    assert 0 < memo.nbytes < 2**20


def test_other_response_masks_reuse_the_trunk_but_not_the_reference_log_probs(base):
    pairs = crafted_pairs(12)
    masked = [dataclasses.replace(p, rejected_mask=p.rejected_mask[:-1] + [0]) for p in pairs]  # last token out
    memo = FrozenMemo()
    run(base, pairs, memo)
    got = run(base, masked, memo)
    assert (memo.hits, memo.misses) == (STEPS, 3 * STEPS)  # the trunks hit, the reference log-probs missed
    assert same_run(got, run(base, masked, None))


def test_a_reference_changed_in_place_empties_the_memo(base):
    pairs = crafted_pairs(12)
    memo = FrozenMemo()
    moved = copy.deepcopy(base)
    run(moved, pairs, memo)
    assert memo.nbytes > 0
    with torch.no_grad():
        moved.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a frozen trunk tensor, changed in place
    got = run(moved, pairs, memo)
    assert memo.hits == 0  # nothing of the old trunk was used
    assert same_run(got, run(moved, pairs, None))


def test_a_memo_with_no_room_keeps_nothing_and_changes_nothing(base):
    pairs = crafted_pairs(12)
    memo = FrozenMemo(max_bytes=0)
    assert same_run(run(base, pairs, memo), run(base, pairs, None))
    assert memo.nbytes == 0 and memo.hits == 0
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        FrozenMemo(max_bytes=-1)
