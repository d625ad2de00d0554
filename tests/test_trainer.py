"""The one Trainer (dpo.trainer): an objective decides what a step computes, the rest is shared.

* SFT through the Trainer takes the same step as a hand-written loop on the plain model (the
  token-level mean NLL over the step's response tokens, AdamW), in every freezing mode;
* cutting a step into micro-batches (--grad-accum) changes nothing but memory, for both
  objectives: the loss is a mean over the step's pairs or response tokens, not over micro-batches;
* the non-finite guard and its --skip-nonfinite counting are the same for both;
* `python -m dpo.sft` has the shared run-control flags (--resume, --save-every, --skip-nonfinite).
"""
from __future__ import annotations

import copy

import pytest
import torch

from dpo import sft
from dpo.config import SFTConfig, TrainConfig
from dpo.engine import LogProbEngine
from dpo.freeze import freeze_all_but_last, frozen_reference
from dpo.objectives import PreferenceObjective, SFTObjective
from dpo.tokenization import TokenizedSequence
from dpo.trainer import DPOTrainer, NonFiniteError, Trainer

from model_utils import crafted_pairs, random_model, small_config


def sequences(n: int, seed: int = 0) -> list[TokenizedSequence]:
    """Prompt + response sequences of varied lengths (prompt 2-8 tokens, response 1-9)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, r = int(torch.randint(2, 9, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
        ids = torch.randint(3, 1000, (p + r,), generator=g).tolist()
        out.append(TokenizedSequence(ids, [0] * p + [1] * r, p))
    return out


def sft_trainer(model, seqs, **overrides) -> Trainer:
    config = SFTConfig(**{"lr": 1e-2, "batch_size": 4, "max_grad_norm": 0.0, "dtype": "float32", **overrides})
    objective = SFTObjective(LogProbEngine(model, recompute=config.recompute_tail), pad_token_id=0)
    return Trainer(model, seqs, config, objective, device="cpu")


def with_sgd(trainer: Trainer) -> Trainer:
    """Compare updates by plain SGD (update = lr x gradient): Adam's first step is about lr x the
    gradient's sign, which turns rounding-level differences in tiny gradients into lr-sized ones."""
    trainer.optimizer = torch.optim.SGD(trainer.trainable, lr=trainer.config.lr)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    return trainer


def textbook_sft_step(model, micro_batches: list[list[TokenizedSequence]], lr: float) -> float:
    """One SFT step written out: every response token's NLL under the full model, summed over the
    step, divided by the step's response-token count; backward; SGD."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    count = 0
    nlls = []
    for batch in micro_batches:
        for s in batch:
            logp = torch.log_softmax(model(torch.tensor([s.input_ids]))[0].float(), -1)  # [T, V]
            for t in range(1, len(s.input_ids)):
                if s.response_mask[t]:
                    nlls.append(-logp[t - 1, s.input_ids[t]])
                    count += 1
    loss = torch.stack(nlls).sum() / count
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("train_last_n, recompute", [(None, False), (1, True)], ids=["full", "last-block"])
def test_sft_step_through_the_trainer_equals_the_textbook_step(train_last_n, recompute):
    seqs = sequences(8)
    ours = random_model(small_config())
    if train_last_n is not None:
        freeze_all_but_last(ours, train_last_n, train_head=True, train_final_norm=True)
    theirs = copy.deepcopy(ours)
    trainer = with_sgd(sft_trainer(ours, seqs, batch_size=8, train_last_n=train_last_n, recompute_tail=recompute))
    m = trainer.train_step()
    expected = textbook_sft_step(theirs, [[seqs[i] for i in b] for b in trainer.epoch_batches(0)[:1]], lr=1e-2)
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    assert m["response_tokens"] == sum(sum(s.response_mask[1:]) for s in seqs)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_sft_grad_accum_is_a_mean_over_the_steps_response_tokens():
    seqs = sequences(8, seed=3)  # responses of 1-9 tokens: a mean of micro-batch means would differ
    one, two = random_model(small_config()), random_model(small_config())
    a = with_sgd(sft_trainer(one, seqs, batch_size=8))
    b = with_sgd(sft_trainer(two, seqs, batch_size=4, grad_accum=2))
    b._order_cache = (0, [a.epoch_batches(0)[0][:4], a.epoch_batches(0)[0][4:]])  # the same 8 sequences
    ma, mb = a.train_step(), b.train_step()
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
    assert ma["response_tokens"] == mb["response_tokens"]
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_dpo_grad_accum_is_a_mean_over_the_steps_pairs():
    pairs = crafted_pairs(8)
    runs = []
    for batch_size, accum in ((8, 1), (4, 2)):
        policy = random_model(small_config())
        freeze_all_but_last(policy, 1, train_head=False, train_final_norm=False)
        config = TrainConfig(batch_size=batch_size, grad_accum=accum, lr=1e-2, dtype="float32", beta=0.5)
        trainer = DPOTrainer(policy, frozen_reference(policy), pairs, config, pad_token_id=0, device="cpu")
        runs.append((with_sgd(trainer), policy))
    (a, pa), (b, pb) = runs
    b._order_cache = (0, [a.epoch_batches(0)[0][:4], a.epoch_batches(0)[0][4:]])
    ma, mb = a.train_step(), b.train_step()
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5) and ma["pairs"] == mb["pairs"] == 8
    assert ma["reward_accuracy"] == pytest.approx(mb["reward_accuracy"])
    for p, q in zip(pa.parameters(), pb.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_the_nonfinite_guard_is_the_same_for_both_objectives(objective, monkeypatch):
    model = random_model(small_config())
    if objective == "sft":
        trainer = sft_trainer(model, sequences(8), skip_nonfinite=True)
        cls = SFTObjective
    else:
        freeze_all_but_last(model, 1, train_head=False, train_final_norm=False)
        trainer = DPOTrainer(model, frozen_reference(model), crafted_pairs(8),
                             TrainConfig(batch_size=4, dtype="float32", skip_nonfinite=True), pad_token_id=0)
        cls = PreferenceObjective
    real = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, batch: (real(self, batch)[0] * float("nan"), real(self, batch)[1]))
    before = [p.detach().clone() for p in model.parameters()]
    m = trainer.train_step()
    assert m["skipped_nonfinite"] and trainer.skipped_nonfinite == 1 and trainer.step == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # nothing applied
    trainer.config.skip_nonfinite = False
    with pytest.raises(NonFiniteError, match="non-finite loss=nan.* at step 2"):
        trainer.train_step()


def test_sft_help_has_the_shared_run_control_flags(capsys):
    with pytest.raises(SystemExit):
        sft.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--resume", "--save-every", "--keep-checkpoints", "--skip-nonfinite", "--max-grad-norm",
                 "--lora-r", "--recompute-tail", "--max-prompt-length"):
        assert flag in text, flag


def test_a_reference_that_shares_trainable_weights_is_refused():
    """The "same weights" pitfall (reference = policy) is caught before training, naming the tensors."""
    policy = random_model(small_config())
    freeze_all_but_last(policy, 1, train_head=False, train_final_norm=False)
    config = TrainConfig(batch_size=4, dtype="float32")
    with pytest.raises(ValueError, match=r"the reference shares \d+ trainable tensors with the policy "
                                         r"\(model\.layers\.1\."):
        DPOTrainer(policy, policy, crafted_pairs(8), config, pad_token_id=0)
    DPOTrainer(policy, frozen_reference(policy), crafted_pairs(8), config, pad_token_id=0)  # frozen shared: fine
    DPOTrainer(policy, policy, crafted_pairs(8), config, pad_token_id=0, allow_shared_reference=True)  # on purpose
