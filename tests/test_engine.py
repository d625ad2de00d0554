"""The log-prob engine (real tokens only, shared frozen trunk, head only at response positions)
equals the textbook path, in every way of training: log-probs, gradients and trajectories."""
from __future__ import annotations

import copy

import pytest
import torch

from dpo.engine import (LogProbEngine, head_logps, plain_logps, run_layers,
                        textbook_policy_and_reference_logps)
from dpo.config import TrainConfig
from dpo.freeze import first_trainable_layer, freeze_all_but_last, frozen_reference
from dpo.logprobs import sequence_logprobs
from dpo.tokenization import TokenizedPair, collate_pairs
from smollm import onednn
from dpo.trainer import DPOTrainer

from model_utils import assert_fp32_close, crafted_pairs, random_model, small_config, textbook_layers


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_head_logps_equals_sequence_logprobs_over_full_logits(reduction):
    model = random_model(small_config())
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        full = sequence_logprobs(model.lm_head(hidden), batch["input_ids"], batch["response_mask"], reduction)
        sparse = head_logps(model.lm_head, hidden, batch["input_ids"], batch["response_mask"], reduction)
    assert_fp32_close(sparse, full)  # summed log-probs near -97: one ulp there is 7.6e-6


def _policy_and_reference(n_train: int, seed: int = 0):
    policy = random_model(small_config(num_hidden_layers=4), seed=seed)
    freeze_all_but_last(policy, n_train)
    return policy, frozen_reference(policy)


def _train(n_train: int, seed: int, pairs: list[TokenizedPair], steps: int, textbook: bool = False, **settings):
    """A fresh policy/reference trained `steps` steps: (trainer, losses, final trainable weights)."""
    policy, reference = _policy_and_reference(n_train, seed=seed)
    config = TrainConfig(**{"dtype": "float32", "loss_type": ["sigmoid"], **settings})  # DPO: its closed forms below
    trainer = DPOTrainer(policy, reference, pairs, config, pad_token_id=0,
                         device="cpu", textbook=textbook)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    return trainer, losses, {n: t.clone() for n, t in trainer.trainable_state().items()}


@pytest.mark.parametrize("mode", ["last-2-blocks", "full-fine-tuning", "head-only"])
def test_an_untrained_policy_equals_its_reference_to_the_bit(mode):
    """The trunk runs with oneDNN (no backward), the trainable tail with autograd's matmuls; the
    reference's tail must use the policy's kernel in training (and both oneDNN's in an evaluation),
    or an untrained policy's log-ratios would not be exactly 0 and the step-0 loss not exactly ln 2."""
    n_train = {"last-2-blocks": 2, "full-fine-tuning": 4, "head-only": 0}[mode]
    policy = random_model(small_config(num_hidden_layers=4, hidden_size=256, intermediate_size=512), seed=4)
    freeze_all_but_last(policy, n_train)  # hidden size 256: where oneDNN's and MKL's sums differ
    reference = frozen_reference(policy)
    engine = LogProbEngine(policy, reference)
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    pol, ref = engine(batch, "sum")  # training: the policy's with grad
    assert pol.requires_grad and torch.equal(pol.detach(), ref)
    with torch.no_grad():  # an evaluation
        pol_eval, ref_eval = engine(batch, "sum")
    assert torch.equal(pol_eval, ref_eval)
    assert_fp32_close(pol_eval, ref)  # oneDNN's sums and MKL's agree to rounding
    if mode != "full-fine-tuning" and onednn.available():  # a trunk ran with oneDNN, the tails not in training
        with torch.no_grad():
            mkl = plain_logps(reference, batch)  # every block with MKL
        assert not torch.equal(ref, mkl)  # the kernels do differ in the last bits at this size


# Every way of training, on a 4-block model: (blocks trained, share_trunk, K the shared trunk's depth).
MODES = {
    "last-2-blocks": (2, True, 2),
    "full-fine-tuning": (4, True, 0),  # the embedding trains (tied to the head): nothing is shared
    "no-shared-trunk": (2, False, 0),  # --no-shared-trunk: each model from its own embedding
    "head-only": (0, True, 4),
}


def _param_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", MODES)
def test_engine_gives_textbook_logps_and_gradients(mode, reduction):
    """Same log-probs and the same gradients on every trainable parameter (fp32 rounding)."""
    n_train, share, depth = MODES[mode]
    pol_a, ref_a = _policy_and_reference(n_train)
    pol_b = copy.deepcopy(pol_a)
    ref_b = frozen_reference(pol_b)
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    engine = LogProbEngine(pol_a, ref_a, share_trunk=share)
    assert engine.split == depth
    fast_pol, fast_ref = engine(batch, reduction)
    plain_pol, plain_ref = textbook_policy_and_reference_logps(pol_b, ref_b, batch, reduction)
    assert_fp32_close(fast_pol, plain_pol)
    assert_fp32_close(fast_ref, plain_ref)
    (fast_pol * torch.arange(1.0, 9.0)).sum().backward()
    (plain_pol * torch.arange(1.0, 9.0)).sum().backward()
    grads_a, grads_b = _param_grads(pol_a), _param_grads(pol_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert_fp32_close(grads_a[name], grads_b[name], msg=name)


@pytest.mark.parametrize("n_train", [2, 4])
def test_engine_policy_alone_gives_textbook_logps_and_gradients(n_train):
    """SFT's use: the policy alone, rows not paired; the frozen leading blocks run as a trunk."""
    pol_a, _ = _policy_and_reference(n_train)
    pol_b = copy.deepcopy(pol_a)
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    engine = LogProbEngine(pol_a)
    assert engine.split == (4 - n_train if n_train < 4 else 0)
    fast = engine.policy_logps(batch, "sum")
    plain = plain_logps(pol_b, batch, "sum")
    assert_fp32_close(fast, plain)
    fast.sum().backward()
    plain.sum().backward()
    for name, grad in _param_grads(pol_a).items():
        assert_fp32_close(grad, _param_grads(pol_b)[name], msg=name)
    with pytest.raises(ValueError, match="no reference"):
        engine(batch)


@pytest.mark.parametrize("mode", MODES)
def test_engine_training_trajectory_equals_textbook(mode):
    """Four optimizer steps: the same losses and the same final weights as the textbook path."""
    n_train, share, _ = MODES[mode]
    pairs = crafted_pairs(24)
    runs = []
    for textbook in (False, True):
        _, losses, weights = _train(n_train, 4, pairs, 4, textbook=textbook, batch_size=4, max_steps=4,
                                    shared_trunk=share, beta=0.5, logp_reduction="sum")
        runs.append((losses, weights))
    (loss_a, w_a), (loss_b, w_b) = runs
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert loss_a[0] == pytest.approx(0.6931472, abs=1e-5)  # policy == reference at the start: ln 2
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=1e-5, rtol=0, msg=name)


def test_a_reference_that_shares_nothing_gets_no_trunk_and_the_same_numbers():
    policy, reference = _policy_and_reference(1)
    stranger = copy.deepcopy(reference)  # equal weights, no tensor shared
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    shared, alone = LogProbEngine(policy, reference), LogProbEngine(policy, stranger)
    assert (shared.split, alone.split) == (3, 0)
    with torch.no_grad():
        for a, b in zip(shared(batch), alone(batch)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_first_trainable_layer():
    policy, _ = _policy_and_reference(1)
    assert first_trainable_layer(policy) == 3
    full = random_model(small_config())
    freeze_all_but_last(full, 2)  # everything, head tied to the embedding
    assert first_trainable_layer(full) == 0


# ---------------------------------------------------------------------------------------------
# The memory- and time-saving pieces, each against the textbook computation (fp32, 1e-5).

import contextlib

import torch.nn.functional as F

from dpo.engine import HeadLogProbs
from smollm.autograd import RMSNormFunction, SwiGLUDown
from smollm.layout import Packing




def _grads(params):
    return [p.grad.clone() for p in params]


def test_rms_norm_function_equals_autograd():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 64, requires_grad=True)
    w = (1 + 0.1 * torch.randn(64)).requires_grad_()
    up = torch.randn(3, 7, 64)
    out = RMSNormFunction.apply(x, w, 1e-5)
    (out * up).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    (ref * up).sum().backward()
    assert torch.equal(out, ref)  # the same arithmetic forward
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=0)


def test_swiglu_down_equals_autograd():
    torch.manual_seed(0)
    gate, up = torch.randn(2, 5, 48, requires_grad=True), torch.randn(2, 5, 48, requires_grad=True)
    w = torch.randn(16, 48, requires_grad=True)
    probe = torch.randn(2, 5, 16)
    out = SwiGLUDown.apply(gate, up, w)
    (out * probe).sum().backward()
    mine = [gate.grad.clone(), up.grad.clone(), w.grad.clone()]
    gate.grad = up.grad = w.grad = None
    ref = F.linear(F.silu(gate) * up, w)
    (ref * probe).sum().backward()
    assert torch.equal(out, ref)
    for a, b in zip(mine, [gate.grad, up.grad, w.grad]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 256])
@pytest.mark.parametrize("train_weight", [True, False])
def test_head_log_probs_equal_full_logits(chunk, train_weight):
    """Chunked, recomputing head: same log-probs and gradients (h and weight) as full logits."""
    torch.manual_seed(0)
    h = torch.randn(10, 32, requires_grad=True)
    w = (0.3 * torch.randn(1000, 32)).requires_grad_(train_weight)
    targets = torch.randint(0, 1000, (10,))
    probe = torch.randn(10)
    out = HeadLogProbs.apply(h, w, targets, chunk)
    (out * probe).sum().backward()
    mine = [h.grad.clone()] + ([w.grad.clone()] if train_weight else [])
    h.grad = w.grad = None
    ref = F.linear(h, w).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (ref * probe).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for a, b in zip(mine, [h.grad] + ([w.grad] if train_weight else [])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("train_weight", [True, False])
def test_head_log_probs_keeping_logits_changes_no_bit(train_weight):
    """Logits kept for backward (all, the first chunks only, none) or recomputed: the very same
    gradients, since a kept chunk and a recomputed one are the same matmul; and a kept chunk
    survives a first backward (retain_graph) to give the same gradients again."""
    torch.manual_seed(0)
    h0 = torch.randn(10, 32)
    w0 = 0.3 * torch.randn(1000, 32)
    targets = torch.randint(0, 1000, (10,))
    probe = torch.randn(10)
    chunk_bytes = 3 * 1000 * 4  # one chunk of 3 positions' fp32 logits
    grads = {}
    for keep in (0, 2 * chunk_bytes, 10**9):  # recompute all 4 chunks; keep the first 2; keep all
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_(train_weight)
        out = HeadLogProbs.apply(h, w, targets, 3, keep)
        (out * probe).sum().backward(retain_graph=True)
        first = [h.grad.clone()] + ([w.grad.clone()] if train_weight else [])
        h.grad = w.grad = None
        (out * probe).sum().backward()
        second = [h.grad] + ([w.grad] if train_weight else [])
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        grads[keep] = first
    for keep in (2 * chunk_bytes, 10**9):
        for a, b in zip(grads[0], grads[keep]):
            assert torch.equal(a, b)


def test_head_log_probs_keep_logits_only_for_a_backward_within_the_budget():
    h, w = torch.randn(10, 32, requires_grad=True), torch.randn(1000, 32)
    targets = torch.randint(0, 1000, (10,))
    out = HeadLogProbs.apply(h, w, targets, 3, 2 * 3 * 1000 * 4 + 1)
    assert [t.shape for t in out.grad_fn.kept] == [(3, 1000), (3, 1000)]  # 2 of the 4 chunks fit
    with torch.no_grad():
        assert HeadLogProbs.apply(h, w, targets, 3).grad_fn is None  # no graph, nothing kept
    frozen = HeadLogProbs.apply(h.detach(), w, targets, 3)  # no input wants a gradient
    assert frozen.grad_fn is None


def test_head_logps_under_bf16_autocast_is_close_to_fp32():
    model = random_model(small_config())
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    with torch.no_grad():
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
        fp32 = head_logps(model.lm_head, hidden, batch["input_ids"], batch["response_mask"], "mean")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = head_logps(model.lm_head, hidden, batch["input_ids"], batch["response_mask"], "mean")
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.01)


def _left_and_right_padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1000, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 9:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    mask[3, 1:] = 0  # a single real token
    return ids, mask


def test_packed_forward_equals_padded_forward_and_gradients():
    """Padding removed (`Packing`): same logits at real positions, same gradients, padding zero."""
    ids, mask = _left_and_right_padded_batch()
    real = mask.bool()
    assert Packing.of(mask) is not None
    models = [random_model(small_config(num_hidden_layers=3), seed=2) for _ in range(2)]
    probe = 1e-3 * torch.randn(4, 12, 49152)  # small: the tied embedding sums 49,152 classes
    outs = []
    for model, pack in zip(models, (True, False)):
        model.train()
        logits = model(ids, mask, pack=pack)
        (logits * probe * real[..., None]).sum().backward()
        outs.append(logits.detach())
    torch.testing.assert_close(outs[0][real], outs[1][real], atol=1e-5, rtol=0)
    hidden = models[0].hidden_states(ids, mask)
    assert torch.equal(hidden[~real], torch.zeros_like(hidden[~real]))  # padding: zero hidden state
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0, msg=name)


def test_a_mask_with_holes_is_not_packed():
    ids = torch.randint(0, 1000, (2, 6))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    assert Packing.of(mask) is None
    model = random_model(small_config())
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), model(ids, mask, pack=False), atol=0, rtol=0)


def _rows_sharing_prefixes():
    """Six rows in three pairs (0, 3), (1, 4), (2, 5) with 8, 0 and all-of-row-5 common leading
    tokens; right padding, left padding, and a row that is a prefix of its partner."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 1000, (6, 14), generator=g)
    mask = torch.ones(6, 14, dtype=torch.long)
    ids[3, :8] = ids[0, :8]  # the prompt plus the first response token
    ids[3, 8] = ids[0, 8] + 1
    mask[0, 12:] = 0
    mask[3, 10:] = 0
    ids[4, 3] = ids[1, 0] + 1  # (1, 4): left-padded row 4, nothing in common
    mask[4, :3] = 0
    mask[2, :2] = 0  # (2, 5): row 5 is row 2 without its last 3 tokens, and differently padded
    ids[5, :9] = ids[2, 2:11]
    mask[5, 9:] = 0
    return ids, mask


@pytest.mark.parametrize("recompute", [False, True])
def test_shared_prefixes_run_once_and_change_nothing(recompute):
    """Rows given as pairs run their common leading tokens once: same hidden states at every real
    position (zero at padding), same gradients for the weights and for the input hidden states."""
    ids, mask = _rows_sharing_prefixes()
    pairs = [(0, 3), (1, 4), (2, 5)]
    packing = Packing.of(mask, ids, pairs)
    assert len(packing.index) == int(mask.sum()) - 8 - 0 - 9  # each shared prefix counted once
    assert [s.prefix_length for s in packing.segments] == [0, 0, 0, 8, 0]  # row 5 has no token of its own
    real = mask.bool()
    probe = torch.randn(6, 14, 64, generator=torch.Generator().manual_seed(4))
    outs, grads = [], []
    for shared in (packing, None):  # None: the default packing, padding removed only
        model = random_model(small_config(num_hidden_layers=3), seed=6)
        freeze_all_but_last(model, 2)
        batch = {"input_ids": ids, "attention_mask": mask}
        shared = shared if shared is not None else Packing.of(mask)  # None: padding removed only
        with torch.no_grad():
            trunk = run_layers(model, model.model.embed_tokens(ids), batch, shared, 0, 1)
        trunk.requires_grad_(True)
        hidden = model.model.norm(run_layers(model, trunk, batch, shared, 1, recompute=recompute))
        (hidden * probe).sum().backward()
        outs.append(hidden.detach())
        grads.append([trunk.grad] + [p.grad for n, p in model.named_parameters() if n.startswith("model.")
                                     and p.requires_grad])  # blocks 1-2 and the final norm
    torch.testing.assert_close(outs[0][real], outs[1][real], atol=1e-5, rtol=0)
    assert torch.equal(outs[0][~real], torch.zeros_like(outs[0][~real]))
    # A shared prefix is read from row a only: its input gradient is the sum of both rows' gradients.
    folded = grads[1][0].clone()
    for a, b, start_a, start_b, n in ((0, 3, 0, 0, 8), (2, 5, 2, 0, 9)):
        folded[a, start_a:start_a + n] += folded[b, start_b:start_b + n]
        folded[b, start_b:start_b + n] = 0
    grads[1][0] = folded
    for a, b in zip(*grads):  # fp32 sums of large terms in another order: rounding of the tensor's scale
        assert_fp32_close(a, b)


def test_shared_prefixes_without_padding_and_bad_pairs():
    ids = torch.randint(5, 1000, (4, 6))
    ids[2, :4] = ids[0, :4]
    model = random_model(small_config())
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():  # no padding at all: still packed, to share the prefixes
        shared = run_layers(model, model.model.embed_tokens(ids), batch, Packing.of(mask, ids, [(0, 2)]), 0)
        torch.testing.assert_close(model(ids), model.lm_head(model.model.norm(shared)), atol=1e-5, rtol=0)
    assert len(Packing.of(mask, ids, [(0, 2), (1, 3)]).index) == 24 - 4 - int(ids[1, 0] == ids[3, 0])
    ids[3, :3] = ids[0, :3]  # rows 2 and 3 both reuse row 0's prefix: 4 and 3 tokens
    assert len(Packing.of(mask, ids, [(0, 2), (0, 3)]).index) == 24 - 4 - 3
    for bad in ([(0, 2), (2, 3)], [(0, 2), (1, 2)], [(0, 0)], [(0, 4)]):
        with pytest.raises(ValueError, match="reuses at most one prefix, and a row that lends its prefix reuses none"):
            Packing.of(mask, ids, bad)
    with pytest.raises(ValueError, match="needs input_ids"):
        Packing.of(mask, None, [(0, 2)])
    with pytest.raises(ValueError, match=r"a Packing of shape \(4, 6\) cannot pack a tensor of shape \(4, 5, 64\)"):
        run_layers(model, model.model.embed_tokens(ids[:, :5]), batch, Packing.of(mask, ids, [(0, 2)]), 0)


def test_packed_forward_matches_transformers_with_padding(tmp_path):
    transformers = pytest.importorskip("transformers")
    from model_utils import save_random_checkpoint

    from smollm import load_pretrained

    config = small_config(num_hidden_layers=3)
    save_random_checkpoint(tmp_path, config, seed=1)
    ours = load_pretrained(tmp_path)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = _left_and_right_padded_batch()
    mask[1] = 1  # transformers' positions ignore left padding unless given position_ids: keep it right-padded
    real = mask.bool()
    with torch.no_grad():
        a = ours(ids, mask)
        b = theirs(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n_train", [2, 4])
def test_optimized_step_equals_textbook_step(reduction, n_train):
    """Everything on (shared trunk, packing, sparse chunked head, hand-written backwards) against
    everything off (two full padded forwards, full logits, plain autograd): same log-probs and
    the same gradients on every trainable parameter; last blocks and full fine-tuning."""
    pol_a, ref_a = _policy_and_reference(n_train)
    pol_b = copy.deepcopy(pol_a)
    ref_b = frozen_reference(pol_b)
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    fast_pol, fast_ref = LogProbEngine(pol_a, ref_a)(batch, reduction)
    (fast_pol * torch.arange(1.0, 9.0)).sum().backward()
    with textbook_layers():
        plain_pol, plain_ref = textbook_policy_and_reference_logps(pol_b, ref_b, batch, reduction)
        (plain_pol * torch.arange(1.0, 9.0)).sum().backward()
    assert_fp32_close(fast_pol, plain_pol)
    assert_fp32_close(fast_ref, plain_ref)
    trainable = [(n, p) for n, p in pol_a.named_parameters() if p.requires_grad]
    assert trainable
    for (name, a), b in zip(trainable, [p for p in pol_b.parameters() if p.requires_grad]):
        assert_fp32_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("n_train", [2, 4])
def test_optimized_training_trajectory_equals_textbook(n_train):
    """Four optimizer steps with everything on vs everything off: same losses, same weights."""
    pairs = crafted_pairs(24)
    runs = []
    for fast in (True, False):
        with contextlib.nullcontext() if fast else textbook_layers():
            _, losses, weights = _train(n_train, 5, pairs, 4, textbook=not fast, batch_size=4, max_steps=4,
                                        beta=0.5, logp_reduction="mean")
        runs.append((losses, weights))
    (loss_a, w_a), (loss_b, w_b) = runs
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    for name in w_a:
        torch.testing.assert_close(w_a[name], w_b[name], atol=1e-5, rtol=0, msg=name)


def test_recomputed_tail_gives_the_same_gradients():
    """Activation checkpointing of the policy's trainable blocks: same log-probs and gradients,
    and almost nothing kept for backward."""
    batch = collate_pairs(crafted_pairs(4), pad_token_id=0)
    grads, kept = [], []
    for recompute in (True, False):
        policy, reference = _policy_and_reference(2, seed=7)
        engine = LogProbEngine(policy, reference, recompute=recompute)
        sizes = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t,
                lambda t: t):
            pol, _ = engine(batch, "sum")
        kept.append(sum(sizes.values()))
        (pol * torch.arange(1.0, 9.0)).sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=0, msg=name)
    assert kept[0] < kept[1]


@pytest.mark.parametrize("recompute", [True, False])
def test_trainer_takes_recompute_tail_from_the_config_and_uses_fused_adamw(recompute):
    from dpo.config import build_parser, config_from_args

    flags = ["--recompute-tail"] if recompute else []  # off by default: faster, ~250 MB more at the default settings
    config = config_from_args(build_parser().parse_args(flags + ["--batch-size", "4"]))
    assert config.recompute_tail is recompute
    policy, reference = _policy_and_reference(1)
    trainer = DPOTrainer(policy, reference, crafted_pairs(4), config, pad_token_id=0)
    assert trainer.engine.recompute is recompute
    assert trainer.optimizer.defaults["fused"] is True  # one kernel, no foreach temporaries, on CPU too
    assert config.loss_type == ["apo_zero"]  # the command's default: at the start 1 - sig(0) + sig(0) = 1
    assert trainer.train_step()["loss"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n_train", [2, 4])
def test_bf16_autocast_training_follows_fp32(n_train):
    """The CUDA default (bf16 autocast, fp32 master weights) through the whole fast path (shared
    trunk, packing with shared prompts, chunked head), run on CPU: the losses follow fp32's."""
    pairs = crafted_pairs(16)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        trainer, losses[dtype], _ = _train(n_train, 9, pairs, 4, batch_size=8, epochs=2, beta=0.5, lr=3e-3,
                                           logp_reduction="mean", dtype=dtype)
        assert trainer.autocast_dtype == (torch.bfloat16 if dtype == "bfloat16" else None)
        assert all(p.dtype == torch.float32 for p in trainer.trainable)
    assert losses["bfloat16"][0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at the start
    assert losses["float32"][3] < 0.6  # it learns (two epochs of the same 16 pairs)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=5e-3)  # measured: within 2e-4
