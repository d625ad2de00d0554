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

from dpo.loss import LOSS_TYPES, LOSSES, dpo_loss

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
    """LOSS_TYPES (imported by dpo.config) is every name in LOSSES; the original four among them."""
    assert LOSS_TYPES == tuple(LOSSES)
    assert {"sigmoid", "robust", "ipo", "hinge"} <= set(LOSS_TYPES)


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



# =============================================================================================
# The loss family: preference_loss, combined_loss, LOSSES
#
# Inputs are SUMS of response-token log-probs, [B], and token counts [B]. The formula tests
# below recompute every loss with plain Python floats (math, not torch, not our helpers).
# =============================================================================================

from types import SimpleNamespace  # noqa: E402

from dpo.loss import (  # noqa: E402
    FLAGS,
    LossParamError,
    check_combination,
    check_loss_params,
    combined_loss,
    needs_reference,
    needs_token_counts,
    preference_loss,
)

BETAS = (0.1, 0.5, 2.0)
REFERENCE_FREE = {"simpo", "orpo", "sft"}
LENGTH_NORMALISED = {"sigmoid_norm", "simpo", "orpo", "sft"}


def _logsig(x: float) -> float:
    """log sigmoid(x) in plain floats, without overflow."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return math.exp(_logsig(x))


def _log_odds(m: float) -> float:
    """log(P / (1 - P)) for P = exp(m), m < 0."""
    return m - math.log(-math.expm1(m))


# Each: (pair d, beta, **params) -> (loss, chosen_reward, rejected_reward), written from the papers.
# d has pc, pr (policy sums), rc, rr (reference sums), nc, nr (token counts).
def _ratio_rewards(d, b):
    return b * (d.pc - d.rc), b * (d.pr - d.rr)


def _h(d):
    return (d.pc - d.pr) - (d.rc - d.rr)


REF = {
    "sigmoid": lambda d, b, label_smoothing=0.0: (
        -(1 - label_smoothing) * _logsig(b * _h(d)) - label_smoothing * _logsig(-b * _h(d)), *_ratio_rewards(d, b)),
    "robust": lambda d, b, label_smoothing=0.0: (
        (-(1 - label_smoothing) * _logsig(b * _h(d)) + label_smoothing * _logsig(-b * _h(d)))
        / (1 - 2 * label_smoothing), *_ratio_rewards(d, b)),
    "ipo": lambda d, b: ((_h(d) - 1 / (2 * b)) ** 2, *_ratio_rewards(d, b)),
    "hinge": lambda d, b: (max(0.0, 1 - b * _h(d)), *_ratio_rewards(d, b)),
    "sigmoid_norm": lambda d, b: (
        -_logsig(b * ((d.pc - d.rc) / d.nc - (d.pr - d.rr) / d.nr)),
        b * (d.pc - d.rc) / d.nc, b * (d.pr - d.rr) / d.nr),
    "simpo": lambda d, b, gamma=1.0: (
        -_logsig(b * (d.pc / d.nc - d.pr / d.nr) - gamma), b * d.pc / d.nc, b * d.pr / d.nr),
    "orpo": lambda d, b, lambda_=0.1: (
        -d.pc / d.nc - lambda_ * _logsig(_log_odds(d.pc / d.nc) - _log_odds(d.pr / d.nr)),
        lambda_ * d.pc / d.nc, lambda_ * d.pr / d.nr),
    "apo_zero": lambda d, b: (
        (1 - _sig(b * (d.pc - d.rc))) + _sig(b * (d.pr - d.rr)), *_ratio_rewards(d, b)),
    "apo_down": lambda d, b: (
        _sig(b * (d.pc - d.rc)) + (1 - _sig(b * _h(d))), *_ratio_rewards(d, b)),
    "bco_pair": lambda d, b, delta=0.0: (
        -_logsig(b * (d.pc - d.rc) - delta) - _logsig(-(b * (d.pr - d.rr) - delta)), *_ratio_rewards(d, b)),
    "nca_pair": lambda d, b: (
        -_logsig(b * (d.pc - d.rc)) - 0.5 * _logsig(-b * (d.pc - d.rc)) - 0.5 * _logsig(-b * (d.pr - d.rr)),
        *_ratio_rewards(d, b)),
    # KL([q, 1-q] || [1-eps, eps]) with q = sigmoid(beta h)
    "exo_pair": lambda d, b, label_smoothing=1e-3: (
        _sig(b * _h(d)) * (math.log(_sig(b * _h(d))) - math.log(1 - label_smoothing))
        + _sig(-b * _h(d)) * (math.log(_sig(-b * _h(d))) - math.log(label_smoothing)), *_ratio_rewards(d, b)),
    "dpop": lambda d, b, dpop_lambda=50.0: (
        -_logsig(b * (_h(d) - dpop_lambda * max(0.0, d.rc - d.pc))), *_ratio_rewards(d, b)),
    "sft": lambda d, b: (-d.pc / d.nc, b * d.pc / d.nc, b * d.pr / d.nr),
}

# non-default settings each formula is also checked at
OTHER_PARAMS = {
    "sigmoid": {"label_smoothing": 0.2}, "robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 0.05},
    "simpo": {"gamma": 0.3}, "orpo": {"lambda_": 0.7}, "dpop": {"dpop_lambda": 5.0}, "bco_pair": {"delta": 0.4},
}


def test_ref_formulas_cover_every_loss():
    assert set(REF) == set(LOSSES)


def _batch(seed: int = 0, B: int = 16, dtype=torch.float64, ref_scale: float = 2.0):
    """Random pairs: token counts in [1, 40], per-token mean log-probs in (-3, -0.02), summed;
    reference sums = policy sums + N(0, ref_scale^2)."""
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 41, (B,), generator=g)
    nr = torch.randint(1, 41, (B,), generator=g)
    pc = -(0.02 + 2.98 * torch.rand(B, generator=g, dtype=torch.float64)) * nc
    pr = -(0.02 + 2.98 * torch.rand(B, generator=g, dtype=torch.float64)) * nr
    rc = pc + ref_scale * torch.randn(B, generator=g, dtype=torch.float64)
    rr = pr + ref_scale * torch.randn(B, generator=g, dtype=torch.float64)
    return SimpleNamespace(pc=pc.to(dtype), pr=pr.to(dtype), rc=rc.to(dtype), rr=rr.to(dtype), nc=nc, nr=nr)


def _call(loss_type, x, beta, **params):
    """preference_loss with what the loss takes, from a _batch."""
    spec = LOSSES[loss_type]
    refs = (x.rc, x.rr) if spec.needs_reference else (None, None)
    toks = dict(chosen_tokens=x.nc, rejected_tokens=x.nr) if spec.length_normalised else {}
    return preference_loss(loss_type, x.pc, x.pr, *refs, beta=beta, **toks, **params)


def _rows(x):
    return [SimpleNamespace(pc=float(x.pc[i]), pr=float(x.pr[i]), rc=float(x.rc[i]), rr=float(x.rr[i]),
                            nc=int(x.nc[i]), nr=int(x.nr[i])) for i in range(len(x.pc))]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type, params", [(t, {}) for t in LOSSES] + list(OTHER_PARAMS.items()))
def test_formula(loss_type, params, beta):
    """Every loss and both rewards equal the formula recomputed in plain floats, in float64,
    at the default params and at other ones."""
    x = _batch(seed=int(beta * 10) + len(loss_type))
    losses, cr, rj = _call(loss_type, x, beta, **params)
    want = [REF[loss_type](d, beta, **params) for d in _rows(x)]
    torch.testing.assert_close(losses, torch.tensor([w[0] for w in want], dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cr, torch.tensor([w[1] for w in want], dtype=torch.float64), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rj, torch.tensor([w[2] for w in want], dtype=torch.float64), rtol=1e-10, atol=1e-12)


# --- values worked out by hand ---------------------------------------------------------------


def _same_as_reference(B=3):
    """policy == reference: rho_w = rho_l = h = 0."""
    pc, pr = torch.tensor([-3.0, -10.0, -0.5][:B]), torch.tensor([-4.0, -2.0, -7.5][:B])
    return pc, pr, pc.clone(), pr.clone()


@pytest.mark.parametrize("loss_type, want", [
    ("apo_zero", 1.0),  # 1 - sig(0) + sig(0)
    ("apo_down", 1.0),  # sig(0) + 1 - sig(0)
    ("nca_pair", 2 * LN2),  # ln2 + ln2/2 + ln2/2
    ("bco_pair", 2 * LN2),  # delta = 0: ln2 + ln2
    ("dpop", LN2),  # no penalty when the policy is the reference
    ("exo_pair", -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3))),  # q = [1/2, 1/2] against [1 - eps, eps]
])
def test_at_the_reference(loss_type, want):
    for beta in BETAS:
        losses, cr, rj = preference_loss(loss_type, *_same_as_reference(), beta=beta)
        torch.testing.assert_close(losses, torch.full((3,), want))
        assert (cr == 0).all() and (rj == 0).all()


def test_simpo_by_hand():
    """Equal mean log-probs (-6/3 = -4/2): gamma = 0 -> ln 2; gamma = 1 -> -logsig(-1) = 1 + a(1), any beta."""
    pc, pr, n3, n2 = torch.tensor([-6.0]), torch.tensor([-4.0]), torch.tensor([3]), torch.tensor([2])
    for beta in BETAS:
        kw = dict(chosen_tokens=n3, rejected_tokens=n2, beta=beta)
        assert preference_loss("simpo", pc, pr, gamma=0.0, **kw)[0].item() == pytest.approx(LN2, abs=1e-6)
        assert preference_loss("simpo", pc, pr, gamma=1.0, **kw)[0].item() == pytest.approx(1 + A1, abs=1e-6)
    # the default gamma is 1.0 (= the SimPO repository's gamma/beta ratio 0.5 at our default beta 2)
    assert LOSSES["simpo"].params["gamma"] == 1.0


def test_sigmoid_norm_equal_lengths_is_sigmoid_with_beta_over_n():
    """With n_w = n_l = n, the normalised margin is h / n: sigmoid_norm at beta = sigmoid at beta / n."""
    x = _batch(3)
    n = torch.full_like(x.nc, 8)
    got = preference_loss("sigmoid_norm", x.pc, x.pr, x.rc, x.rr, chosen_tokens=n, rejected_tokens=n, beta=2.0)
    want = preference_loss("sigmoid", x.pc, x.pr, x.rc, x.rr, beta=2.0 / 8)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])  # rewards: beta * rho / n = (beta / n) * rho


def test_dpop_is_dpo_while_chosen_is_above_the_reference():
    """No penalty while log pi(y_w) >= log pi_ref(y_w); below, the margin shrinks by lambda * the gap."""
    pc, pr = torch.tensor([-5.0, -5.0]), torch.tensor([-7.0, -7.0])
    rc, rr = torch.tensor([-6.0, -4.0]), torch.tensor([-6.0, -6.0])
    # row 0: gap 0 (pc > rc), h = 2 - 0 = 2; row 1: gap 1, h = 2 - 2 = 0, logits 0 - lam * 1
    losses, _, _ = preference_loss("dpop", pc, pr, rc, rr, beta=0.5, dpop_lambda=2.0)
    torch.testing.assert_close(losses, torch.tensor([A1, -_logsig(0.5 * (0 - 2.0))]))


def test_orpo_stable_at_probability_one():
    """A response whose every token has probability 1 (mean log-prob exactly 0, or just below)
    gives a finite loss and gradient, in fp32 (log(1 - exp(m)) would be log 0)."""
    for m in (0.0, -1e-12, -1e-7):
        pc = torch.tensor([m, -1.0], requires_grad=True)
        pr = torch.tensor([-2.0, m], requires_grad=True)
        n = torch.ones(2)
        losses, _, _ = preference_loss("orpo", pc, pr, chosen_tokens=n, rejected_tokens=n, beta=1.0)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), m


def test_sft_is_mean_nll_of_chosen():
    pc, pr = torch.tensor([-6.0, -1.0]), torch.tensor([-9.0, -3.0])
    nc, nr = torch.tensor([3, 4]), torch.tensor([2, 2])
    losses, cr, rj = preference_loss("sft", pc, pr, chosen_tokens=nc, rejected_tokens=nr, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([2.0, 0.25]))
    torch.testing.assert_close(cr, torch.tensor([-1.0, -0.125]))  # beta * mean log-prob
    torch.testing.assert_close(rj, torch.tensor([-2.25, -0.75]))


def test_dpo_loss_is_preference_loss():
    """The wrapper gives preference_loss's numbers for every loss it accepts."""
    x = _batch(5)
    for t in ("sigmoid", "robust", "ipo", "hinge", "apo_zero", "apo_down", "bco_pair", "nca_pair", "dpop"):
        for a, b in zip(dpo_loss(x.pc, x.pr, x.rc, x.rr, beta=0.5, loss_type=t), _call(t, x, 0.5)):
            torch.testing.assert_close(a, b)
    got = dpo_loss(x.pc, x.pr, x.rc, x.rr, 0.5, "exo_pair", 0.01)
    for a, b in zip(got, _call("exo_pair", x, 0.5, label_smoothing=0.01)):
        torch.testing.assert_close(a, b)


# --- gradient signs --------------------------------------------------------------------------

# The chosen-side sign does not hold for apo_down at all: it lowers the chosen likelihood on purpose.
# Some losses have a finite optimum in h (ipo at h = 1/(2 beta), cDPO at beta h = logit(1 - eps),
# exo_pair at beta h = log((1 - eps) / eps)) or in rho_w (nca_pair at beta rho_w = log 2): past it the
# signs flip (test_gradient_signs_flip_past_the_optimum). So the signs are tested where the policy is
# still behind the reference on both responses: rho_w <= 0 <= rho_l, h <= 0.
CHOSEN_SIGN_FAILS = {"apo_down"}


def _behind_reference(seed: int, dtype=torch.float64):
    x = _batch(seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 100)
    x.pc = x.rc - 3 * torch.rand(len(x.rc), generator=g, dtype=dtype)  # rho_w in (-3, 0]
    x.pr = x.rr + 3 * torch.rand(len(x.rr), generator=g, dtype=dtype)  # rho_l in [0, 3)
    return x


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_gradient_signs(loss_type, beta):
    """d loss / d s_w <= 0 (raising the chosen log-prob does not raise the loss) and
    d loss / d s_l >= 0, pair by pair, with default and non-default params."""
    for params in ({}, OTHER_PARAMS.get(loss_type, {})):
        x = _behind_reference(7)
        x.pc.requires_grad_()
        x.pr.requires_grad_()
        losses, _, _ = _call(loss_type, x, beta, **params)
        losses.sum().backward()
        if loss_type == "sft":  # sft does not read the rejected response: no gradient at all
            assert x.pr.grad is None and (x.pc.grad < 0).all()
            continue
        assert (x.pr.grad >= 0).all() and (x.pr.grad > 0).any(), (loss_type, params, x.pr.grad)
        if loss_type not in CHOSEN_SIGN_FAILS:
            assert (x.pc.grad <= 0).all() and (x.pc.grad < 0).any(), (loss_type, params, x.pc.grad)


@pytest.mark.parametrize("loss_type, params, pc, why", [
    ("apo_down", {}, -6.0, "rho_w = 0, h = 8: sig'(0) > sig'(beta h)"),
    ("nca_pair", {}, 0.0, "beta rho_w = 6 > log 2"),
    ("ipo", {}, 4.0, "h = 12 > 1/(2 beta)"),
    ("sigmoid", {"label_smoothing": 0.2}, 4.0, "beta h = 6 > logit(0.8)"),
    ("exo_pair", {"label_smoothing": 0.1}, 4.0, "beta h = 6 > log 9"),
])
def test_gradient_signs_flip_past_the_optimum(loss_type, params, pc, why):
    """Where the chosen-side sign does not hold: raising s_w RAISES these losses."""
    s_w = torch.tensor([pc], requires_grad=True)
    # reference chosen -6, rejected policy -10 = reference rejected -2 - 8: rho_l = -8
    losses, _, _ = preference_loss(loss_type, s_w, torch.tensor([-10.0]), torch.tensor([-6.0]),
                                   torch.tensor([-2.0]), beta=0.5, **params)
    losses.sum().backward()
    assert s_w.grad.item() > 0, why


# --- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_float64_stays_float64(loss_type):
    x = _batch(11)
    for t in _call(loss_type, x, 0.5):
        assert t.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", list(LOSSES))
def test_half_inputs_computed_in_fp32_with_gradients(loss_type, dtype):
    """bf16/fp16 in -> fp32 out, the same numbers as fp32 inputs holding the same values, and
    gradients reach the half-precision inputs (in their dtype)."""
    x = _batch(13, dtype=dtype, B=8)
    x.pc.requires_grad_()
    losses, cr, rj = _call(loss_type, x, 0.5)
    assert losses.dtype == cr.dtype == rj.dtype == torch.float32
    ref = SimpleNamespace(**{k: (v.detach().float() if v.is_floating_point() else v) for k, v in vars(x).items()})
    torch.testing.assert_close(losses, _call(loss_type, ref, 0.5)[0])
    losses.sum().backward()
    assert x.pc.grad is not None and x.pc.grad.dtype == dtype and torch.isfinite(x.pc.grad.float()).all()


def test_mixed_dtypes_promote():
    """bf16 policy with float64 reference computes in float64; float token counts are fine."""
    x = _batch(17)
    losses, _, _ = preference_loss("sigmoid_norm", x.pc.bfloat16(), x.pr.bfloat16(), x.rc, x.rr,
                                   chosen_tokens=x.nc.double(), rejected_tokens=x.nr.float(), beta=0.5)
    assert losses.dtype == torch.float64


# --- errors ----------------------------------------------------------------------------------


def test_unknown_loss_names_the_valid_ones():
    x = _batch(0, B=2)
    with pytest.raises(LossParamError) as err:
        preference_loss("kto", x.pc, x.pr, x.rc, x.rr, beta=0.1)
    assert err.value.param == "loss_type" and FLAGS["loss_type"] == "--loss-type"
    for name in LOSSES:
        assert name in str(err.value)


@pytest.mark.parametrize("loss_type", [t for t in LOSSES if t not in REFERENCE_FREE])
def test_missing_reference_is_refused(loss_type):
    x = _batch(0, B=2)
    toks = dict(chosen_tokens=x.nc, rejected_tokens=x.nr) if loss_type in LENGTH_NORMALISED else {}
    with pytest.raises(ValueError, match="reference_chosen is required"):
        preference_loss(loss_type, x.pc, x.pr, beta=0.1, **toks)
    with pytest.raises(ValueError, match="reference_rejected is required"):
        preference_loss(loss_type, x.pc, x.pr, x.rc, beta=0.1, **toks)


@pytest.mark.parametrize("loss_type", sorted(REFERENCE_FREE))
def test_reference_given_to_reference_free_loss_is_refused(loss_type):
    """Accepting and ignoring a reference would hide a mistake (the caller believes it is used)."""
    x = _batch(0, B=2)
    with pytest.raises(ValueError, match="reference_chosen is not used.*reference-free"):
        preference_loss(loss_type, x.pc, x.pr, x.rc, x.rr, chosen_tokens=x.nc, rejected_tokens=x.nr, beta=0.1)
    with pytest.raises(ValueError, match="reference_rejected is not used"):
        preference_loss(loss_type, x.pc, x.pr, None, x.rr, chosen_tokens=x.nc, rejected_tokens=x.nr, beta=0.1)


@pytest.mark.parametrize("loss_type", sorted(LENGTH_NORMALISED))
def test_missing_token_counts_are_refused(loss_type):
    x = _batch(0, B=2)
    refs = (x.rc, x.rr) if LOSSES[loss_type].needs_reference else ()
    with pytest.raises(ValueError, match="chosen_tokens is required"):
        preference_loss(loss_type, x.pc, x.pr, *refs, beta=0.1)
    with pytest.raises(ValueError, match="rejected_tokens is required"):
        preference_loss(loss_type, x.pc, x.pr, *refs, chosen_tokens=x.nc, beta=0.1)
    with pytest.raises(ValueError, match="rejected_tokens must be > 0"):
        preference_loss(loss_type, x.pc, x.pr, *refs, chosen_tokens=x.nc, rejected_tokens=x.nr * 0, beta=0.1)


def test_token_counts_given_to_a_sum_loss_are_refused():
    """ipo reads the inputs as given; token counts passed to it (as if it normalised, like TRL's) are refused."""
    x = _batch(0, B=2)
    with pytest.raises(ValueError, match="chosen_tokens is not used by loss_type 'ipo'"):
        preference_loss("ipo", x.pc, x.pr, x.rc, x.rr, chosen_tokens=x.nc, rejected_tokens=x.nr, beta=0.1)


@pytest.mark.parametrize("loss_type, params, param, says", [
    ("sigmoid", {"label_smoothing": 0.6}, "label_smoothing", "[0, 0.5]"),
    ("sigmoid", {"label_smoothing": -0.1}, "label_smoothing", "[0, 0.5]"),
    ("robust", {"label_smoothing": 0.5}, "label_smoothing", "[0, 0.5)"),
    ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing", "(0, 0.5)"),
    ("exo_pair", {"label_smoothing": 0.5}, "label_smoothing", "(0, 0.5)"),
    ("simpo", {"gamma": -1.0}, "gamma", ">= 0"),
    ("simpo", {"gamma": float("nan")}, "gamma", "finite"),
    ("orpo", {"lambda_": -0.1}, "lambda_", ">= 0"),
    ("orpo", {"lambda_": float("inf")}, "lambda_", "finite"),
    ("dpop", {"dpop_lambda": -1.0}, "dpop_lambda", ">= 0"),
    ("bco_pair", {"delta": float("inf")}, "delta", "finite"),
    ("simpo", {"gamma": True}, "gamma", "finite number"),
    ("simpo", {"gamma": "1"}, "gamma", "finite number"),
    ("sigmoid", {"gamma": 1.0}, "gamma", "its parameters: label_smoothing"),
    ("ipo", {"label_smoothing": 0.1}, "label_smoothing", "its parameters: none"),
    ("ipo", {"label_smoothing": 0.0}, "label_smoothing", "its parameters: none"),
    ("simpo", {"lambda_": 0.1}, "lambda_", "its parameters: gamma"),
])
def test_bad_params_name_the_param(loss_type, params, param, says):
    with pytest.raises(LossParamError) as err:
        check_loss_params(loss_type, 0.5, params)
    assert err.value.param == param and param in FLAGS
    assert param in str(err.value) and says in str(err.value)
    x = _batch(0, B=2)  # preference_loss raises the same
    with pytest.raises(ValueError, match=param):
        _call(loss_type, x, 0.5, **params)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_bad_beta_names_beta(beta):
    with pytest.raises(LossParamError) as err:
        check_loss_params("simpo", beta, {})
    assert err.value.param == "beta" and "beta" in str(err.value)


def test_check_loss_params_fills_defaults():
    assert check_loss_params("exo_pair", 0.1, {}) == {"label_smoothing": 1e-3}
    assert check_loss_params("simpo", 2.0, {"gamma": None}) == {"gamma": 1.0}  # None: not given
    assert check_loss_params("orpo", 2.0, {"lambda_": 1}) == {"lambda_": 1.0}
    assert check_loss_params("ipo", 2.0, {"label_smoothing": None}) == {}
    assert check_loss_params("dpop", 2.0, {}) == {"dpop_lambda": 50.0}
    assert check_loss_params("bco_pair", 2.0, {"delta": -0.5}) == {"delta": -0.5}


def test_shapes_are_checked_naming_the_argument():
    x = _batch(0, B=3)
    with pytest.raises(ValueError, match="reference_rejected has shape"):
        preference_loss("sigmoid", x.pc, x.pr, x.rc, x.rr[:2], beta=0.1)
    with pytest.raises(ValueError, match="policy_rejected must be 1-D"):
        preference_loss("sigmoid", x.pc, x.pr[:, None], x.rc, x.rr, beta=0.1)
    with pytest.raises(ValueError, match="chosen_tokens has shape"):
        preference_loss("simpo", x.pc, x.pr, chosen_tokens=x.nc[:2], rejected_tokens=x.nr, beta=0.1)
    with pytest.raises(TypeError, match="policy_chosen must be a floating-point"):
        preference_loss("sigmoid", x.pc.long(), x.pr, x.rc, x.rr, beta=0.1)
    with pytest.raises(TypeError, match="reference_chosen must be a torch.Tensor"):
        preference_loss("sigmoid", x.pc, x.pr, [0.0] * 3, x.rr, beta=0.1)


# --- the table -------------------------------------------------------------------------------


def test_loss_specs():
    import dataclasses

    assert {t for t, s in LOSSES.items() if not s.needs_reference} == REFERENCE_FREE
    assert {t for t, s in LOSSES.items() if s.length_normalised} == LENGTH_NORMALISED
    for t, s in LOSSES.items():
        assert s.paper and s.formula, t
        assert set(s.params) <= set(FLAGS), t  # every param has a flag
        assert s.reduction == ("mean per token" if t in LENGTH_NORMALISED else "sum (as given)")
        check_loss_params(t, 1.0, {})  # the defaults are valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        LOSSES["simpo"].needs_reference = True
    with pytest.raises(TypeError):
        LOSSES["simpo"].params["gamma"] = 5.0  # read-only
    assert FLAGS["label_smoothing"] == "--label-smoothing" and FLAGS["gamma"] == "--simpo-gamma"
    assert FLAGS["lambda_"] == "--orpo-lambda"


def test_needs_reference_and_token_counts():
    assert needs_reference(["sigmoid", "sft"]) and needs_reference("dpop")
    assert not needs_reference(["simpo", "sft"]) and not needs_reference("orpo")
    assert needs_token_counts(["sigmoid", "sft"]) and not needs_token_counts(["sigmoid", "ipo"])
    with pytest.raises(LossParamError, match="kto"):
        needs_reference(["sigmoid", "kto"])


# --- combinations ----------------------------------------------------------------------------


def test_rpo_is_sigmoid_plus_weighted_sft():
    """["sigmoid", "sft"] with weights [1.0, 0.2]: the DPO loss + 0.2 * the chosen mean NLL, per pair;
    the rewards are the sigmoid's."""
    x = _batch(21)
    for beta in BETAS:
        losses, cr, rj = combined_loss(["sigmoid", "sft"], [1.0, 0.2], x.pc, x.pr, x.rc, x.rr,
                                       chosen_tokens=x.nc, rejected_tokens=x.nr, beta=beta)
        want = [REF["sigmoid"](d, beta)[0] + 0.2 * (-d.pc / d.nc) for d in _rows(x)]
        torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64))
        torch.testing.assert_close(cr, beta * (x.pc - x.rc))
        torch.testing.assert_close(rj, beta * (x.pr - x.rr))


def test_combination_rewards_and_weights():
    x = _batch(22)
    kw = dict(chosen_tokens=x.nc, rejected_tokens=x.nr, beta=0.5)
    # rewards of the first member that is not sft
    _, cr, _ = combined_loss(["sft", "simpo"], None, x.pc, x.pr, **kw)
    torch.testing.assert_close(cr, 0.5 * x.pc / x.nc)
    _, cr, _ = combined_loss(["sft", "orpo"], None, x.pc, x.pr, lambda_=0.3, **kw)
    torch.testing.assert_close(cr, 0.3 * x.pc / x.nc)
    # sft alone: beta * mean log-prob
    losses, cr, rj = combined_loss(["sft"], [2.0], x.pc, x.pr, **kw)
    torch.testing.assert_close(losses, -2.0 * x.pc / x.nc)
    torch.testing.assert_close(rj, 0.5 * x.pr / x.nr)
    # weights None = 1 each; a single member = preference_loss
    a = combined_loss(["simpo", "sft"], None, x.pc, x.pr, **kw)[0]
    torch.testing.assert_close(a, _call("simpo", x, 0.5)[0] + _call("sft", x, 0.5)[0])
    for got, want in zip(combined_loss(["ipo"], None, x.pc, x.pr, x.rc, x.rr, beta=0.5), _call("ipo", x, 0.5)):
        torch.testing.assert_close(got, want)


def test_combination_routes_params():
    """A shared param goes to every member that takes it; each member otherwise keeps its default."""
    x = _batch(23)
    args = (x.pc, x.pr, x.rc, x.rr)
    got = combined_loss(["sigmoid", "exo_pair"], None, *args, beta=0.5)[0]
    torch.testing.assert_close(got, _call("sigmoid", x, 0.5)[0] + _call("exo_pair", x, 0.5)[0])
    got = combined_loss(["sigmoid", "exo_pair"], None, *args, beta=0.5, label_smoothing=0.1)[0]
    torch.testing.assert_close(got, _call("sigmoid", x, 0.5, label_smoothing=0.1)[0]
                               + _call("exo_pair", x, 0.5, label_smoothing=0.1)[0])
    got = combined_loss(["dpop", "sft"], [1.0, 0.5], *args, chosen_tokens=x.nc, rejected_tokens=x.nr,
                        beta=0.5, dpop_lambda=3.0)[0]
    torch.testing.assert_close(got, _call("dpop", x, 0.5, dpop_lambda=3.0)[0] + 0.5 * _call("sft", x, 0.5)[0])
    members = check_combination(["sigmoid", "sft"], [1.0, 0.2], 0.5, {"label_smoothing": 0.1})
    assert members == [("sigmoid", 1.0, {"label_smoothing": 0.1}), ("sft", 0.2, {})]


@pytest.mark.parametrize("loss_types, weights, params, param, says", [
    (["sigmoid", "sft"], [1.0], {}, "weights", "2 loss types"),
    (["sigmoid", "sft"], [1.0, -0.2], {}, "weights", "finite number >= 0"),
    (["sigmoid", "sft"], [1.0, float("nan")], {}, "weights", "finite number >= 0"),
    (["sigmoid", "sft"], [0.0, 0.0], {}, "weights", "all 0"),
    (["sigmoid", "sigmoid"], None, {}, "loss_types", "more than once"),
    ([], None, {}, "loss_types", "at least one"),
    (["sigmoid", "kto"], None, {}, "loss_types", "valid loss types"),
    (["sigmoid", "sft"], None, {"gamma": 1.0}, "gamma", "not a parameter of any"),
    (["sigmoid", "sft"], None, {"label_smoothing": 0.7}, "label_smoothing", "[0, 0.5]"),
])
def test_bad_combinations(loss_types, weights, params, param, says):
    with pytest.raises(LossParamError) as err:
        check_combination(loss_types, weights, 0.5, params)
    assert err.value.param == param and param in FLAGS and says in str(err.value)
    x = _batch(0, B=2)
    with pytest.raises(ValueError):
        combined_loss(loss_types, weights, x.pc, x.pr, x.rc, x.rr, chosen_tokens=x.nc, rejected_tokens=x.nr,
                      beta=0.5, **params)


def test_combination_references_and_counts():
    """References and counts are required iff some member needs them, and refused otherwise."""
    x = _batch(0, B=2)
    with pytest.raises(ValueError, match="reference_chosen is required by loss_types sigmoid, sft"):
        combined_loss(["sigmoid", "sft"], None, x.pc, x.pr, chosen_tokens=x.nc, rejected_tokens=x.nr, beta=0.5)
    with pytest.raises(ValueError, match="chosen_tokens is required"):
        combined_loss(["sigmoid", "sft"], None, x.pc, x.pr, x.rc, x.rr, beta=0.5)
    with pytest.raises(ValueError, match="reference_chosen is not used by any of loss_types simpo, sft"):
        combined_loss(["simpo", "sft"], None, x.pc, x.pr, x.rc, x.rr, chosen_tokens=x.nc, rejected_tokens=x.nr,
                      beta=0.5)
    with pytest.raises(ValueError, match="chosen_tokens is not used"):
        combined_loss(["sigmoid", "hinge"], None, x.pc, x.pr, x.rc, x.rr, chosen_tokens=x.nc, beta=0.5)


# =============================================================================================
# Against TRL's own loss code (TRL 1.16). TRL 1.x computes the DPO losses inside
# DPOTrainer._compute_loss, from the model's per-token log-probs; we call it on a trainer made
# with object.__new__ (no model, no data set) whose model is a stub returning fixed per-token
# log-probs, with the reference log-probs "precomputed". Convention differences, each tested:
#   - ipo: TRL divides each log-ratio by its response length; ours takes h as given, so we pass
#     per-token means (s/n, S/n) to ours.
#   - sigmoid: TRL 1.16's "sigmoid" has no label smoothing (cDPO); compared at eps = 0 only.
#   - bco_pair: TRL 1.16 has no delta (older TRL kept a running mean); ours at delta = 0.
#   - sigmoid_norm: TRL logs the unnormalised rewards beta * rho; ours beta * rho / n.
#   - sft: TRL's is one token mean over the whole batch; ours the mean over pairs of each pair's
#     token mean: equal when the chosen responses all have the same length (as here).
#   - orpo (ORPOTrainer.odds_ratio_loss): TRL returns lambda * logsig(log odds) and adds its NLL
#     (over prompt and response tokens, batch token mean) outside; ours includes -m_w per pair.
#   - simpo (CPOTrainer.cpo_loss): TRL subtracts simpo_gamma / beta inside beta(...), so its
#     simpo_gamma is our gamma, the margin itself.
#   - dpop, and ours with label smoothing on sigmoid, have no TRL counterpart.
# =============================================================================================


def _trl():
    return pytest.importorskip("trl", reason="TRL is not installed: the comparisons with TRL's loss code are skipped")


def _trl_pairs(seed: int, B: int = 6, T: int = 24, equal_chosen_lengths: bool = False):
    """Per-token log-probs [2B, T-1] (rows: B chosen then B rejected, zero outside the response) and
    the completion mask [2B, T] (column 0 is always prompt), with our sums and counts."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T - 1, (2 * B,), generator=g)
    if equal_chosen_lengths:
        lens[:B] = 9
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        mask[i, T - n:] = 1
    tok = -3 * torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * mask[:, 1:]
    sums, n = tok.sum(1), mask.sum(1)
    ref = sums + 2 * torch.randn(2 * B, generator=g, dtype=torch.float64)
    x = SimpleNamespace(pc=sums[:B], pr=sums[B:], rc=ref[:B], rr=ref[B:], nc=n[:B], nr=n[B:])
    return x, tok, mask


def _trl_dpo(loss_types, weights, beta, label_smoothing, tok, mask, x):
    """TRL's DPO loss (a scalar: sum_i w_i mean(loss_i)) and its logged mean rewards."""
    _trl()
    from collections import defaultdict

    from trl.trainer.dpo_trainer import DPOTrainer

    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip("this TRL's DPOTrainer has no _compute_loss (the harness is written for TRL 1.16)")

    class Stub(torch.nn.Module):
        def forward(self, **kwargs):
            z = torch.zeros_like(tok)
            return SimpleNamespace(log_probs=tok, entropy=z, mean_logits=z, is_top1=z.bool())

    model = Stub().eval()
    trainer = object.__new__(DPOTrainer)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)
    for k, v in dict(model=model, accelerator=accelerator, ld_alpha=None, precompute_ref_logps=True,
                     f_divergence_type="reverse_kl", use_weighting=False, aux_loss_enabled=False,
                     loss_types=list(loss_types), loss_weights=list(weights), beta=beta,
                     label_smoothing=label_smoothing, _total_train_tokens=0, _tp_size=1,
                     _metrics={"train": defaultdict(list), "eval": defaultdict(list)}).items():
        setattr(trainer, k, v)
    inputs = dict(input_ids=torch.zeros_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask,
                  ref_chosen_logps=x.rc, ref_rejected_logps=x.rr)
    loss = trainer._compute_loss(model, inputs, False)
    m = trainer._metrics["eval"]
    return loss, m["rewards/chosen"][-1], m["rewards/rejected"][-1]


# (our loss, our params, TRL label_smoothing, whether TRL's logged rewards are ours)
TRL_DPO_CASES = [
    ("sigmoid", {}, 0.0, True),
    ("robust", {}, 0.0, True),
    ("robust", {"label_smoothing": 0.2}, 0.2, True),
    ("hinge", {}, 0.0, True),
    ("ipo", {}, 0.0, False),
    ("exo_pair", {}, 1e-3, True),
    ("exo_pair", {"label_smoothing": 0.2}, 0.2, True),
    ("nca_pair", {}, 0.0, True),
    ("bco_pair", {}, 0.0, True),
    ("apo_zero", {}, 0.0, True),
    ("apo_down", {}, 0.0, True),
    ("sigmoid_norm", {}, 0.0, False),
    ("sft", {}, 0.0, False),
]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss_type, params, trl_ls, same_rewards", TRL_DPO_CASES)
def test_against_trl_dpo_trainer(loss_type, params, trl_ls, same_rewards, beta):
    x, tok, mask = _trl_pairs(seed=len(loss_type) + int(10 * beta), equal_chosen_lengths=loss_type == "sft")
    want, want_cr, want_rj = _trl_dpo([loss_type], [1.0], beta, trl_ls, tok, mask, x)
    if loss_type == "ipo":  # TRL's IPO = ours on per-token means
        ours = SimpleNamespace(pc=x.pc / x.nc, pr=x.pr / x.nr, rc=x.rc / x.nc, rr=x.rr / x.nr, nc=x.nc, nr=x.nr)
    else:
        ours = x
    losses, cr, rj = _call(loss_type, ours, beta, **params)
    # TRL's exo_pair takes log(eps) and log1p(-eps) of a float32 tensor: ~1e-8 relative
    rel = 1e-6 if loss_type == "exo_pair" else 1e-9
    assert losses.mean().item() == pytest.approx(want.item(), rel=rel, abs=1e-12)
    if same_rewards:
        assert cr.mean().item() == pytest.approx(want_cr, rel=1e-9, abs=1e-12)
        assert rj.mean().item() == pytest.approx(want_rj, rel=1e-9, abs=1e-12)


def test_sft_differs_from_trl_with_unequal_lengths():
    """The documented difference: TRL's sft averages over all chosen tokens of the batch, ours over pairs."""
    x, tok, mask = _trl_pairs(seed=3)
    want, _, _ = _trl_dpo(["sft"], [1.0], 0.5, 0.0, tok, mask, x)
    assert want.item() == pytest.approx((-x.pc.sum() / x.nc.sum()).item(), rel=1e-9)
    assert _call("sft", x, 0.5)[0].mean().item() != pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_rpo_against_trl(beta):
    """TRL's loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2] (RPO), chosen lengths equal."""
    x, tok, mask = _trl_pairs(seed=30 + int(10 * beta), equal_chosen_lengths=True)
    want, want_cr, want_rj = _trl_dpo(["sigmoid", "sft"], [1.0, 0.2], beta, 0.0, tok, mask, x)
    losses, cr, rj = combined_loss(["sigmoid", "sft"], [1.0, 0.2], x.pc, x.pr, x.rc, x.rr,
                                   chosen_tokens=x.nc, rejected_tokens=x.nr, beta=beta)
    assert losses.mean().item() == pytest.approx(want.item(), rel=1e-9)
    assert cr.mean().item() == pytest.approx(want_cr, rel=1e-9)
    assert rj.mean().item() == pytest.approx(want_rj, rel=1e-9)


def _experimental(module: str, name: str):
    """A trainer class that TRL 1.x keeps in trl.experimental (older TRL: at the top level)."""
    _trl()
    import importlib
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    for where in (module, "trl"):
        try:
            return getattr(importlib.import_module(where), name)
        except (ImportError, AttributeError):
            pass
    pytest.skip(f"this TRL has no {name} (looked in {module} and trl)")


@pytest.mark.parametrize("lam", [0.1, 0.5, 2.0])
def test_orpo_against_trl(lam):
    """ORPOTrainer.odds_ratio_loss on mean log-probs returns lambda * logsig(log odds);
    ours = -m_w - that. Rewards lambda * m in both."""
    ORPOTrainer = _experimental("trl.experimental.orpo", "ORPOTrainer")
    trainer = object.__new__(ORPOTrainer)
    trainer.beta = lam  # TRL's ORPO calls lambda beta
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"))
    x = _batch(40)
    mw, ml = x.pc / x.nc, x.pr / x.nr
    trl_losses, trl_cr, trl_rj, _, _ = trainer.odds_ratio_loss(mw, ml)
    losses, cr, rj = _call("orpo", x, 1.0, lambda_=lam)
    torch.testing.assert_close(losses, -mw - trl_losses.double())
    torch.testing.assert_close(cr, trl_cr.double())
    torch.testing.assert_close(rj, trl_rj.double())


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_simpo_against_trl(beta, gamma):
    """CPOTrainer.cpo_loss with loss_type="simpo" on mean log-probs; its simpo_gamma is our gamma."""
    CPOTrainer = _experimental("trl.experimental.cpo", "CPOTrainer")
    trainer = object.__new__(CPOTrainer)
    for k, v in dict(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                     accelerator=SimpleNamespace(device=torch.device("cpu"))).items():
        setattr(trainer, k, v)
    x = _batch(41)
    trl_losses, trl_cr, trl_rj = trainer.cpo_loss(x.pc / x.nc, x.pr / x.nr)
    losses, cr, rj = _call("simpo", x, beta, gamma=gamma)
    torch.testing.assert_close(losses, trl_losses)
    torch.testing.assert_close(cr, trl_cr)
    torch.testing.assert_close(rj, trl_rj)
