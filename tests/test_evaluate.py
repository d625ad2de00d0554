"""Held-out evaluation with the frozen part cached (`dpo.evaluate.HeldOutCache`): the same numbers
as `evaluate_pairs`, with the trunk and the reference run once, and one tail at step 0."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from dpo.config import TrainConfig
from dpo.evaluate import EvalResult, HeldOutCache, evaluate_pairs
from dpo.freeze import freeze_all_but_last, frozen_reference
from dpo.tokenization import TokenizedPair
from dpo.trainer import DPOTrainer

from model_utils import crafted_pairs, random_model, small_config

LAYERS, TRAIN_LAST = 4, 2  # blocks 0-1 are the frozen trunk, blocks 2-3 + norm + head train


def held_out_pairs(n: int, seed: int) -> list[TokenizedPair]:
    """Pairs of varied lengths; every third pair's answers share their first token, so prefixes
    longer than the prompt are shared too."""
    return crafted_pairs(n, seed, share_first_token=True, source="held-out")


def make_trainer(seed: int = 0, train_last: int = TRAIN_LAST, **settings) -> DPOTrainer:
    policy = random_model(small_config(num_hidden_layers=LAYERS), seed=seed)
    freeze_all_but_last(policy, train_last)
    reference = frozen_reference(policy)
    config = TrainConfig(**{"batch_size": 4, "beta": 0.5, "lr": 3e-3, "dtype": "float32", **settings})
    return DPOTrainer(policy, reference, held_out_pairs(16, seed=seed + 100), config, pad_token_id=0, device="cpu")


def uncached(trainer: DPOTrainer, pairs: list[TokenizedPair]) -> EvalResult:
    """What DPOTrainer.evaluate computed before the cache: everything, every time."""
    return evaluate_pairs(trainer.policy, trainer.reference, pairs, pad_token_id=0, beta=trainer.config.beta,
                          reduction=trainer.config.logp_reduction, batch_size=trainer.config.batch_size,
                          autocast_dtype=trainer.autocast_dtype, engine=trainer.engine)


def assert_same(a: EvalResult, b: EvalResult, tol: float = 1e-6) -> None:
    for name, value in a.to_dict().items():
        assert value == pytest.approx(b.to_dict()[name], abs=tol, rel=0), name


class CallCounter:
    """Forward calls of the modules that an evaluation may run, by part."""

    def __init__(self, trainer: DPOTrainer):
        self.calls: Counter[str] = Counter()
        K, pol, ref = trainer.engine.split, trainer.policy.model, trainer.reference.model
        parts = {"trunk": [pol.embed_tokens, *pol.layers[:K], ref.embed_tokens, *ref.layers[:K]],
                 "reference tail": [*ref.layers[K:], ref.norm],
                 "policy tail": [*pol.layers[K:], pol.norm]}
        for part, modules in parts.items():
            for m in modules:
                m.register_forward_hook(lambda *_, part=part: self.calls.update([part]))

    def during(self, fn):
        self.calls.clear()
        out = fn()
        return out, dict(self.calls)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cached_evaluation_equals_uncached_at_step_0_and_after_training(reduction):
    trainer = make_trainer(logp_reduction=reduction)
    pairs = held_out_pairs(10, seed=1)  # 3 batches of 4, 4, 2
    first = trainer.evaluate(pairs)
    cache = trainer.eval_cache
    assert isinstance(cache, HeldOutCache) and len(cache.batches) == 3
    assert_same(first, uncached(trainer, pairs))
    assert first.reward_accuracy == 0 and first.mean_margin == 0  # policy == reference
    assert first.policy_chosen_logp == first.reference_chosen_logp
    for _ in range(3):
        trainer.train_step()
    later = trainer.evaluate(pairs)
    assert trainer.eval_cache is cache  # reused, not rebuilt
    assert_same(later, uncached(trainer, pairs))
    assert later.mean_margin != 0 and later.reference_chosen_logp == first.reference_chosen_logp
    # And the uncached shared-trunk path is the plain one (two full padded forwards).
    plain = evaluate_pairs(trainer.policy, trainer.reference, pairs, pad_token_id=0, beta=0.5, reduction=reduction,
                           batch_size=4)
    assert_same(later, plain, tol=1e-4 if reduction == "sum" else 1e-5)


def test_later_evaluations_run_only_the_policy_tail_and_step_0_runs_one_tail():
    trainer = make_trainer(seed=3)
    pairs = held_out_pairs(10, seed=4)
    batches, tail = 3, LAYERS - TRAIN_LAST + 1  # blocks K..L-1 and the final norm
    counter = CallCounter(trainer)
    assert trainer.engine.policy_is_reference()
    _, before = counter.during(lambda: uncached(trainer, pairs))  # today: trunk and two tails
    assert before == {"trunk": batches * (1 + TRAIN_LAST), "reference tail": batches * tail,
                      "policy tail": batches * tail}
    _, first = counter.during(lambda: trainer.evaluate(pairs))  # step 0: trunk and one tail
    assert first == {"trunk": batches * (1 + TRAIN_LAST), "reference tail": batches * tail}
    _, again = counter.during(lambda: trainer.evaluate(pairs))  # still step 0: nothing to run
    assert again == {}
    trainer.train_step()
    assert not trainer.engine.policy_is_reference()
    for _ in range(2):
        _, later = counter.during(lambda: trainer.evaluate(pairs))
        assert later == {"policy tail": batches * tail}


def test_a_first_evaluation_after_training_runs_both_tails_once_then_the_policy_only():
    trainer = make_trainer(seed=5)
    pairs = held_out_pairs(6, seed=6)
    trainer.train_step()
    counter = CallCounter(trainer)
    result, first = counter.during(lambda: trainer.evaluate(pairs))
    assert first == {"trunk": 2 * (1 + TRAIN_LAST), "reference tail": 2 * 3, "policy tail": 2 * 3}
    assert_same(result, uncached(trainer, pairs))
    _, later = counter.during(lambda: trainer.evaluate(pairs))
    assert later == {"policy tail": 2 * 3}


def test_the_cache_is_rebuilt_when_the_pairs_or_the_settings_change():
    trainer = make_trainer(seed=7)
    pairs = held_out_pairs(6, seed=8)
    trainer.evaluate(pairs)
    cache = trainer.eval_cache
    trainer.train_step()
    trainer.evaluate(pairs)
    assert trainer.eval_cache is cache
    copy = list(pairs)  # an equal list, another object: rebuilt (keyed by identity)
    trainer.evaluate(copy)
    assert trainer.eval_cache is not cache
    cache = trainer.eval_cache
    copy[2] = dataclasses.replace(copy[2], rejected_ids=copy[2].rejected_ids[:-1] + [7],)  # other tokens
    assert_same(trainer.evaluate(copy), uncached(trainer, copy))
    assert trainer.eval_cache is not cache
    cache = trainer.eval_cache
    assert_same(trainer.evaluate(copy, batch_size=5), uncached(trainer, copy))  # other batches
    assert trainer.eval_cache is not cache and len(trainer.eval_cache.batches) == 2
    cache = trainer.eval_cache
    with torch.no_grad():  # a frozen trunk tensor changed in place: the kept states are stale
        trainer.reference.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert_same(trainer.evaluate(copy, batch_size=5), uncached(trainer, copy))
    assert trainer.eval_cache is not cache


def test_without_a_shared_trunk_only_the_reference_is_cached():
    """--no-shared-trunk, or everything trained (nothing frozen): no trunk to keep, but the
    reference's log-probs are still computed once, and the numbers are evaluate_pairs'."""
    pairs = held_out_pairs(6, seed=9)
    for trainer in (make_trainer(seed=10, shared_trunk=False), make_trainer(seed=10, train_last=LAYERS)):
        assert trainer.engine.split == 0
        trainer.train_step()
        counter = CallCounter(trainer)
        result, calls = counter.during(lambda: trainer.evaluate(pairs))
        assert all(b.trunk is None for b in trainer.eval_cache.batches)
        assert_same(result, uncached(trainer, pairs))
        assert result.mean_margin != 0
        _, later = counter.during(lambda: trainer.evaluate(pairs))
        assert "reference tail" not in later and later["policy tail"] == calls["policy tail"]
    with pytest.raises(ValueError, match="at least one pair"):
        HeldOutCache(make_trainer().engine, [], pad_token_id=0)


def test_bf16_autocast_cached_evaluation_follows_uncached():
    """The CUDA default (bf16 autocast), on CPU: the cache keeps the trunk's fp32 residual stream
    and runs the same code, so it gives the uncached numbers."""
    trainer = make_trainer(seed=11, dtype="bfloat16")
    assert trainer.autocast_dtype == torch.bfloat16
    pairs = held_out_pairs(10, seed=12)
    assert_same(trainer.evaluate(pairs), uncached(trainer, pairs), tol=1e-3)
    assert all(b.trunk.dtype == torch.float32 for b in trainer.eval_cache.batches)
    for _ in range(2):
        trainer.train_step()
    assert_same(trainer.evaluate(pairs), uncached(trainer, pairs), tol=1e-3)


def test_the_cache_keeps_each_real_token_once():
    trainer = make_trainer(seed=13)
    pairs = held_out_pairs(10, seed=14)
    trainer.evaluate(pairs)
    cache = trainer.eval_cache
    kept = sum(b.trunk.shape[1] for b in cache.batches)
    tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    shared = sum(next(i for i, (a, b) in enumerate(zip(p.chosen_ids, p.rejected_ids)) if a != b) for p in pairs)
    assert kept == tokens - shared  # the padding dropped, each shared prefix once
    assert cache.nbytes >= kept * 64 * 4


def test_a_cache_bound_to_the_next_run_of_a_sweep_gives_that_runs_numbers():
    """Runs from one starting model (its frozen trunk shared, the model itself the reference) reuse
    one cache: the next run's evaluation equals its own uncached one, and runs only its tail."""
    import copy

    start = random_model(small_config(num_hidden_layers=LAYERS), seed=3).requires_grad_(False)
    trunk = {id(p): p for p in [*start.model.embed_tokens.parameters(), *start.model.layers[:LAYERS - TRAIN_LAST].parameters()]}
    pairs = held_out_pairs(12, seed=7)
    config = TrainConfig(batch_size=4, beta=0.5, lr=3e-3, dtype="float32", max_steps=2)

    def run():
        policy = copy.deepcopy(start, memo=dict(trunk))  # shares the trunk, copies the rest
        freeze_all_but_last(policy, TRAIN_LAST)
        return DPOTrainer(policy, start, held_out_pairs(16, seed=1), config, pad_token_id=0)

    first = run()
    first.evaluate(pairs)
    first.train_step()
    second = run()
    second.train_step()
    second.train_step()  # the second run's policy differs from the first's
    second.eval_cache = first.eval_cache.bind(second.engine)
    calls = Counter()  # the blocks the engine runs: the second policy's (its trunk's modules run the trunk)
    hooks = [layer.register_forward_hook(lambda m, i, o, k=k: calls.update([k]))
             for k, layer in enumerate(second.policy.model.layers)]
    got = second.evaluate(pairs)
    for h in hooks:
        h.remove()
    assert set(calls) == set(range(LAYERS - TRAIN_LAST, LAYERS))  # the tail only: the trunk's states were reused
    assert got == uncached(second, pairs)
    with pytest.raises(ValueError, match="very same reference"):
        first.eval_cache.bind(make_trainer().engine)
