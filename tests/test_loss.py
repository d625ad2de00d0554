"""DPO loss variants against values worked out by hand.

Notation: x = beta * h, with h = (pc - pr) - (rc - rr) the log-ratio margin, and
a(x) = -logsigmoid(x) = ln(1 + e^-x). Two identities make the hand values easy:
    -logsigmoid(-x) = ln(1 + e^x) = x + a(x)
    a(0) = ln 2,  a(1) = ln(1 + e^-1) = 0.31326168751822286
"""
from __future__ import annotations

import math

import pytest
import torch

from dpo.loss import LOSS_TYPES, dpo_loss

LN2 = math.log(2.0)
A1 = math.log1p(math.exp(-1.0))  # a(1) = 0.31326168751822286


def _logps(h: float, dtype=torch.float32):
    """Four [1] log-prob tensors with margin h: pc = -5, pr = -7, rc = -6, rr = -8 + h,
    so (pc - pr) - (rc - rr) = 2 - (2 - h) = h."""
    pc = torch.tensor([-5.0], dtype=dtype)
    pr = torch.tensor([-7.0], dtype=dtype)
    rc = torch.tensor([-6.0], dtype=dtype)
    rr = torch.tensor([-6.0 - (2.0 - h)], dtype=dtype)  # rc - rr = 2 - h
    return pc, pr, rc, rr


def _loss(h, beta, loss_type="sigmoid", ls=0.0):
    return dpo_loss(*_logps(h), beta=beta, loss_type=loss_type, label_smoothing=ls)[0].item()


def test_loss_types_exported():
    assert set(LOSS_TYPES) == {"sigmoid", "robust", "ipo", "hinge"}


def test_sigmoid_equal_inputs_is_ln2():
    """h = 0 -> -logsigmoid(0) = ln 2 exactly, for any beta."""
    for beta in (0.01, 0.1, 1.0, 5.0):
        assert _loss(0.0, beta) == pytest.approx(LN2, abs=1e-7)
    # policy == reference, batch of 3
    lp = torch.tensor([-3.0, -10.0, -0.5])
    losses, _, _ = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    torch.testing.assert_close(losses, torch.full((3,), LN2))


def test_sigmoid_h1_beta1():
    """h = 1, beta = 1 -> ln(1 + e^-1) = 0.31326...; h = -1 -> ln(1 + e) = 1 + 0.31326..."""
    assert _loss(1.0, 1.0) == pytest.approx(A1, abs=1e-6)
    assert _loss(-1.0, 1.0) == pytest.approx(1.0 + A1, abs=1e-6)
    # beta = 0.5, h = 2 is the same x = 1
    assert _loss(2.0, 0.5) == pytest.approx(A1, abs=1e-6)


def test_conservative_dpo_ls01():
    """sigmoid with ls = 0.1 at x = 1: 0.9 a(1) + 0.1 (1 + a(1)) = a(1) + 0.1 = 0.41326..."""
    assert _loss(1.0, 1.0, "sigmoid", 0.1) == pytest.approx(A1 + 0.1, abs=1e-6)
    # at h = 0 the smoothing changes nothing: 0.9 ln2 + 0.1 ln2
    assert _loss(0.0, 1.0, "sigmoid", 0.1) == pytest.approx(LN2, abs=1e-6)


def test_robust_ls01():
    """robust, ls = 0.1, x = 1: (0.9 a(1) - 0.1 (1 + a(1))) / 0.8 = (0.8 a(1) - 0.1) / 0.8
    = a(1) - 0.125 = 0.18826..."""
    assert _loss(1.0, 1.0, "robust", 0.1) == pytest.approx(A1 - 0.125, abs=1e-6)
    # with ls = 0 robust is plain DPO
    assert _loss(1.0, 1.0, "robust", 0.0) == pytest.approx(A1, abs=1e-6)


def test_ipo():
    """(h - 1/(2 beta))^2: beta = 0.5 -> target 1; h=0 -> 1, h=1 -> 0, h=3 -> 4."""
    assert _loss(0.0, 0.5, "ipo") == pytest.approx(1.0, abs=1e-6)
    assert _loss(1.0, 0.5, "ipo") == pytest.approx(0.0, abs=1e-6)
    assert _loss(3.0, 0.5, "ipo") == pytest.approx(4.0, abs=1e-5)
    # beta = 0.1 -> target 5: h = 0 -> 25
    assert _loss(0.0, 0.1, "ipo") == pytest.approx(25.0, abs=1e-4)


def test_hinge():
    """relu(1 - beta h), beta = 0.5: h=-2 -> 2, h=0 -> 1, h=1 -> 0.5, h=2 -> 0, h=4 -> 0."""
    for h, want in ((-2.0, 2.0), (0.0, 1.0), (1.0, 0.5), (2.0, 0.0), (4.0, 0.0)):
        assert _loss(h, 0.5, "hinge") == pytest.approx(want, abs=1e-6), h


def test_rewards_values_and_detached():
    """rewards = beta (policy - reference): chosen 0.5 (-5 - -6) = 0.5, rejected 0.5 (-7 - -6) = -0.5."""
    pc, pr, rc, rr = (torch.tensor([v], requires_grad=True) for v in (-5.0, -7.0, -6.0, -6.0))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert cr.item() == pytest.approx(0.5)
    assert rj.item() == pytest.approx(-0.5)
    assert not cr.requires_grad and not rj.requires_grad
    assert losses.requires_grad
    # h = 2 - 0 = 2, x = 1
    assert losses.item() == pytest.approx(A1, abs=1e-6)


def test_batch_of_mixed_margins():
    """Each row is computed on its own: margins [0, 1, -1] at beta = 1."""
    pc = torch.tensor([-1.0, -1.0, -1.0])
    pr = torch.tensor([-1.0, -2.0, 0.0])
    zero = torch.zeros(3)
    losses, _, _ = dpo_loss(pc, pr, zero, zero, beta=1.0)
    torch.testing.assert_close(losses, torch.tensor([LN2, A1, 1 + A1]))


def test_sigmoid_gradient_closed_form():
    """d/d pc of -logsigmoid(beta h) = -beta sigmoid(-beta h); d/d pr is the opposite; reference gets none."""
    g = torch.Generator().manual_seed(0)
    pc = (torch.randn(16, generator=g) * 3).requires_grad_()
    pr = (torch.randn(16, generator=g) * 3).requires_grad_()
    rc, rr = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    beta = 0.3
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    h = (pc - pr - (rc - rr)).detach()
    want = -beta * torch.sigmoid(-beta * h)
    torch.testing.assert_close(pc.grad, want)
    torch.testing.assert_close(pr.grad, -want)


def test_bf16_inputs_computed_in_fp32():
    pc, pr, rc, rr = (t.requires_grad_() if i == 0 else t for i, t in enumerate(_logps(1.0, torch.bfloat16)))
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=1.0)
    assert losses.dtype == cr.dtype == rj.dtype == torch.float32
    assert losses.item() == pytest.approx(A1, abs=1e-6)  # the bf16 inputs here are exact
    losses.sum().backward()
    assert pc.grad is not None and pc.grad.dtype == torch.bfloat16


# --- the direction of beta: higher beta keeps the policy CLOSER to the reference -------------


def test_higher_beta_smaller_optimal_deviation_cdpo():
    """If a label is right with probability p (cDPO with ls = 1 - p), the expected loss
    -p logsig(beta h) - (1-p) logsig(-beta h) is minimised where sigmoid(beta h) = p,
    i.e. h* = logit(p) / beta. For p = 0.8: h* = ln 4 / beta: 13.86 at beta 0.1, 1.73 at
    beta 0.8. Higher beta -> the optimal policy deviates LESS from the reference."""
    # the loss is flat near its minimum (fp32), so locate where its slope changes sign
    h = torch.linspace(-30, 30, 60_001, dtype=torch.float64).requires_grad_()
    zero = torch.zeros_like(h)
    optimum = {}
    for beta in (0.1, 0.8):
        losses, _, _ = dpo_loss(h, zero, zero, zero, beta=beta, label_smoothing=0.2)
        (slope,) = torch.autograd.grad(losses.sum(), h)
        optimum[beta] = h[(slope < 0).sum()].item()  # first grid point with slope >= 0
        assert optimum[beta] == pytest.approx(math.log(4.0) / beta, abs=2e-3)
    assert optimum[0.8] < optimum[0.1]


def test_higher_beta_saturates_at_smaller_margin():
    """At the same margin h = 1, beta = 0.8 has already lowered the loss much more
    (a(0.8) = 0.371) than beta = 0.1 (a(0.1) = 0.644, near ln 2). The margin where the loss
    falls to 0.1 is h = ln(1/(e^0.1 - 1)) / beta = 2.252 / beta: 2.8 at beta 0.8, 22.5 at 0.1.
    The slope d loss / d h at h = 1 is -beta sigmoid(-beta): the push is spent at small h."""
    assert _loss(1.0, 0.8) == pytest.approx(math.log1p(math.exp(-0.8)), abs=1e-6)
    assert _loss(1.0, 0.1) == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-6)
    assert _loss(1.0, 0.8) < _loss(1.0, 0.1)
    x = math.log(1.0 / math.expm1(0.1))  # 2.2522...
    for beta in (0.8, 0.1):
        assert _loss(x / beta, beta) == pytest.approx(0.1, abs=1e-5)
    # the slope wrt h at h = 1
    for beta in (0.8, 0.1):
        h = torch.tensor([1.0], requires_grad=True)
        z = torch.zeros(1)
        dpo_loss(h, z, z, z, beta=beta)[0].sum().backward()
        assert h.grad.item() == pytest.approx(-beta / (1 + math.exp(beta)), abs=1e-6)


def test_ipo_target_margin_shrinks_with_beta():
    """IPO pulls h to 1/(2 beta): 5 at beta 0.1, 0.625 at beta 0.8."""
    for beta, target in ((0.1, 5.0), (0.8, 0.625)):
        assert _loss(target, beta, "ipo") == pytest.approx(0.0, abs=1e-5)
        assert _loss(target + 0.5, beta, "ipo") == pytest.approx(0.25, abs=1e-5)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, -0.1, float("inf"), float("nan")])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*_logps(0.0), beta=beta)


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        dpo_loss(*_logps(0.0), beta=0.1, loss_type="kto")
    for name in LOSS_TYPES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "loss_type, ls",
    [("sigmoid", -0.1), ("sigmoid", 0.6), ("robust", 0.5), ("robust", -0.01), ("ipo", 0.1), ("hinge", 0.1)],
)
def test_bad_label_smoothing(loss_type, ls):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_logps(0.0), beta=0.1, loss_type=loss_type, label_smoothing=ls)


def test_sigmoid_label_smoothing_half_allowed():
    """ls = 0.5 for sigmoid is allowed: the loss is symmetric in h, minimised at h = 0."""
    assert _loss(0.0, 1.0, "sigmoid", 0.5) == pytest.approx(LN2, abs=1e-6)
    assert _loss(1.0, 1.0, "sigmoid", 0.5) == pytest.approx(A1 + 0.5, abs=1e-6)


def test_shape_mismatch_names_argument():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="reference_rejected_logps"):
        dpo_loss(a, a, a, torch.zeros(4), beta=0.1)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        dpo_loss(a, torch.zeros(3, 1), a, a, beta=0.1)

