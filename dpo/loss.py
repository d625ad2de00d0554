"""Preference losses: DPO and its relatives, as pure functions on sequence log-probs.

DPO (Rafailov et al. 2023, "Direct Preference Optimization") starts from the
KL-regularised RL objective

    max_pi  E[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x)),

whose optimum is pi*(y|x) = pi_ref(y|x) * exp(r(x, y) / beta) / Z(x). Reading that
backwards, every policy defines an implicit reward r(x, y) = beta * log(pi / pi_ref)
(+ a term in x only), and plugging it into the Bradley-Terry preference model gives a
plain classification loss on a preferred (chosen, y_w) and a dispreferred
(rejected, y_l) response:

    L = -log sigmoid(beta * h),
    h = (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x)).

What beta does: it is the weight of the KL penalty. A preference of a given strength
is satisfied by a log-ratio margin h of about logit(p) / beta, so HIGHER beta means a
SMALLER deviation from the reference: higher beta keeps the policy CLOSER to the
reference (several tutorials state it backwards; tests/test_loss.py checks the
direction).

The family. `preference_loss(loss_type, ...)` computes any loss in `LOSSES` (one
`LossSpec` each: formula, paper, default parameters, whether it needs the reference
model and the response token counts); `combined_loss` takes a weighted sum of several
(e.g. "sigmoid" + 0.2 * "sft" = RPO); `dpo_loss` is the original four-variant API, kept
as a thin wrapper. docs/losses.md has the table and how to choose.

Legend, used in every formula below and in `LossSpec.formula`:
    s_w, s_l      log pi(y|x) of the chosen / rejected response, SUMMED over its tokens
    S_w, S_l      the same under the reference model pi_ref
    n_w, n_l      response token counts
    rho_w, rho_l  log-ratios  s_w - S_w,  s_l - S_l
    h             margin      rho_w - rho_l
    m_w, m_l      mean token log-probs  s_w / n_w,  s_l / n_l
    sig, logsig   sigmoid and log-sigmoid;  eps = label_smoothing

Conventions. The reference-based losses that are not length-normalised take the
sequence log-probs AS GIVEN: sums (the DPO paper), or whatever the caller passes (our
trainer's --logp-reduction mean passes per-token means). The length-normalised ones
(sigmoid_norm, simpo, orpo, sft) need sums and the token counts, and divide themselves.
Everything is computed in torch.promote_types(input dtype, float32): bf16/fp16 inputs
are upcast (gradients flow back through the cast), float64 stays float64.

Shapes: B = batch of preference pairs. Every log-prob and token count is [B].
"""
from __future__ import annotations

import math
import numbers
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LossParamError(ValueError):
    """A bad loss setting. `param` is the parameter's name (a key of FLAGS), so the config
    layer can name the command-line flag; the message names it too."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# The command-line flag of each setting checked here (the config layer owns the flags).
FLAGS: dict[str, str] = {
    "loss_type": "--loss-type",
    "loss_types": "--loss-type",
    "weights": "--loss-weights",
    "beta": "--beta",
    "label_smoothing": "--label-smoothing",
    "gamma": "--simpo-gamma",
    "lambda_": "--orpo-lambda",
    "dpop_lambda": "--dpop-lambda",
    "delta": "--bco-delta",
}


class _Pair(NamedTuple):
    """One batch of pairs, already cast to the compute dtype. References and token counts
    are None where the loss does not take them."""

    pc: Tensor  # [B] s_w, policy chosen
    pr: Tensor  # [B] s_l, policy rejected
    rc: Tensor | None  # [B] S_w, reference chosen
    rr: Tensor | None  # [B] S_l, reference rejected
    nc: Tensor | None  # [B] n_w, chosen response tokens
    nr: Tensor | None  # [B] n_l, rejected response tokens


Losses = tuple[Tensor, Tensor, Tensor]  # (losses [B], chosen_rewards [B], rejected_rewards [B])


def _logratio_rewards(p: _Pair, beta: float) -> tuple[Tensor, Tensor]:
    """The implicit DPO rewards beta * rho_w, beta * rho_l."""
    return beta * (p.pc - p.rc), beta * (p.pr - p.rr)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) below -ln 2. Same branches as TRL's ORPO."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# --- the losses: each takes a _Pair and returns (losses, chosen_rewards, rejected_rewards) ---
# Each registers itself in LOSSES (@_loss): its name, whether it reads the reference and the token
# counts, its parameters with their defaults, its paper and its formula in the legend above.


@dataclass(frozen=True)
class LossSpec:
    """One preference loss: what it needs, its parameters' defaults, its formula and paper."""

    needs_reference: bool  # takes the reference model's log-probs S_w, S_l
    length_normalised: bool  # takes the token counts n_w, n_l and divides the sums itself
    params: Mapping[str, float]  # its own hyperparameters and their defaults (read-only)
    paper: str
    formula: str  # in the legend of this module's docstring
    fn: Callable[..., Losses] = field(repr=False, compare=False)

    @property
    def reduction(self) -> str:
        """How the loss reads a response's token log-probs."""
        return "mean per token" if self.length_normalised else "sum (as given)"


LOSSES: dict[str, LossSpec] = {}  # filled by @_loss below, in the order of this file


def _loss(name: str, *, reference: bool, length_normalised: bool, params: dict[str, float], paper: str,
          formula: str) -> Callable[[Callable[..., Losses]], Callable[..., Losses]]:
    """Register the decorated loss function in LOSSES under `name`, with what it needs."""
    def register(fn: Callable[..., Losses]) -> Callable[..., Losses]:
        LOSSES[name] = LossSpec(reference, length_normalised, types.MappingProxyType(dict(params)), paper,
                                formula, fn)
        return fn
    return register


@_loss("sigmoid", reference=True, length_normalised=False, params={"label_smoothing": 0.0},
       paper="Rafailov et al. 2023, Direct Preference Optimization (arXiv 2305.18290); cDPO: Mitchell 2023, "
             "A note on DPO with noisy preferences",
       formula="-(1-eps) logsig(beta h) - eps logsig(-beta h)")
def _sigmoid(p: _Pair, beta: float, label_smoothing: float) -> Losses:
    """DPO / cDPO:  -(1 - eps) logsig(beta h) - eps logsig(-beta h).

    eps = 0 is DPO. eps > 0 is conservative DPO (Mitchell 2023): the label is assumed flipped
    with probability eps, so the optimum is at beta h = logit(1 - eps) instead of infinity;
    at eps = 0.5 the labels carry no information and the loss only pulls h to 0.
    """
    x = beta * ((p.pc - p.pr) - (p.rc - p.rr))  # [B] beta h
    losses = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
    return (losses, *_logratio_rewards(p, beta))


@_loss("robust", reference=True, length_normalised=False, params={"label_smoothing": 0.0},
       paper="Chowdhury, Kini, Natarajan 2024, Provably Robust DPO (arXiv 2403.00409)",
       formula="[-(1-eps) logsig(beta h) + eps logsig(-beta h)] / (1 - 2 eps)")
def _robust(p: _Pair, beta: float, label_smoothing: float) -> Losses:
    """Robust DPO:  [-(1 - eps) logsig(beta h) + eps logsig(-beta h)] / (1 - 2 eps).

    An unbiased estimate of the clean DPO loss when labels are flipped with probability eps
    (Chowdhury et al. 2024). Unlike cDPO it keeps pushing h up; eps < 0.5 strictly.
    """
    x = beta * ((p.pc - p.pr) - (p.rc - p.rr))  # [B]
    losses = (-(1 - label_smoothing) * F.logsigmoid(x) + label_smoothing * F.logsigmoid(-x)) / (
        1 - 2 * label_smoothing)
    return (losses, *_logratio_rewards(p, beta))


@_loss("ipo", reference=True, length_normalised=False, params={},
       paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences "
             "(arXiv 2310.12036)",
       formula="(h - 1/(2 beta))^2")
def _ipo(p: _Pair, beta: float) -> Losses:
    """IPO:  (h - 1/(2 beta))^2, a regression of the margin onto 1/(2 beta) (Azar et al. 2023,
    eq. 17, with tau = beta).

    h is built from the log-probs AS GIVEN. TRL's "ipo" divides each log-ratio by its response
    length first; to get TRL's IPO here, pass per-token means (s / n and S / n) as the inputs.
    """
    h = (p.pc - p.pr) - (p.rc - p.rr)  # [B]
    return ((h - 1 / (2 * beta)) ** 2, *_logratio_rewards(p, beta))


@_loss("hinge", reference=True, length_normalised=False, params={},
       paper="Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv 2305.10425)",
       formula="max(0, 1 - beta h)")
def _hinge(p: _Pair, beta: float) -> Losses:
    """SLiC's calibration hinge on the DPO margin:  max(0, 1 - beta h) (Zhao et al. 2023)."""
    h = (p.pc - p.pr) - (p.rc - p.rr)  # [B]
    return (torch.relu(1 - beta * h), *_logratio_rewards(p, beta))


@_loss("sigmoid_norm", reference=True, length_normalised=True, params={},
       paper="Lambert et al. 2024, Tulu 3 (arXiv 2411.15124): length-normalised DPO",
       formula="-logsig(beta (rho_w/n_w - rho_l/n_l))")
def _sigmoid_norm(p: _Pair, beta: float) -> Losses:
    """Length-normalised DPO (Tulu 3):  -logsig(beta (rho_w / n_w - rho_l / n_l)).

    The margin of the per-token mean log-ratios; the rewards are normalised the same way.
    """
    cw = (p.pc - p.rc) / p.nc  # [B] mean log-ratio per chosen token
    cl = (p.pr - p.rr) / p.nr  # [B]
    return (-F.logsigmoid(beta * (cw - cl)), beta * cw, beta * cl)


@_loss("simpo", reference=False, length_normalised=True, params={"gamma": 1.0},
       paper="Meng, Xia, Chen 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward "
             "(arXiv 2405.14734)",
       formula="-logsig(beta (m_w - m_l) - gamma)")
def _simpo(p: _Pair, beta: float, gamma: float) -> Losses:
    """SimPO:  -logsig(beta (m_w - m_l) - gamma) (Meng et al. 2024), no reference.

    gamma is the target margin itself (as TRL's CPOTrainer simpo_gamma, which it divides by
    beta before subtracting inside beta(...)). The SimPO repository's configs give
    gamma_beta_ratio = gamma / beta instead: gamma = ratio * beta. Rewards: beta * m.
    """
    mw, ml = p.pc / p.nc, p.pr / p.nr  # [B] mean token log-probs
    return (-F.logsigmoid(beta * (mw - ml) - gamma), beta * mw, beta * ml)


@_loss("orpo", reference=False, length_normalised=True, params={"lambda_": 0.1},
       paper="Hong, Lee, Thorne 2024, ORPO: Monolithic Preference Optimization without Reference Model "
             "(arXiv 2403.07691)",
       formula="-m_w - lambda logsig(log(P_w/(1-P_w)) - log(P_l/(1-P_l))),  P = exp(m)")
def _orpo(p: _Pair, beta: float, lambda_: float) -> Losses:
    """ORPO:  -m_w - lambda * logsig(log odds(y_w) - log odds(y_l))  (Hong et al. 2024).

    odds(y) = P / (1 - P) with P = exp(m) the geometric-mean token probability, so
    log odds = m - log(1 - exp(m)), with log(1 - exp(m)) from `_log1mexp`. beta is not used
    (lambda plays its role; TRL's ORPOConfig calls lambda `beta`). Rewards: lambda * m, as TRL.

    m is clamped to <= -eps(dtype) inside log(1 - exp(m)): a response whose every token has
    probability 1 in floating point (m = 0) would give log(0) and a NaN gradient.
    Differences from TRL's ORPOTrainer: its NLL term is a token mean over the whole batch and
    over prompt AND response; ours is the per-pair mean over response tokens (`sft`).
    """
    mw, ml = p.pc / p.nc, p.pr / p.nr  # [B]
    top = -torch.finfo(mw.dtype).eps
    log_odds = (mw - ml) - (_log1mexp(mw.clamp(max=top)) - _log1mexp(ml.clamp(max=top)))  # [B]
    return (-mw - lambda_ * F.logsigmoid(log_odds), lambda_ * mw, lambda_ * ml)


@_loss("apo_zero", reference=True, length_normalised=False, params={},
       paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions (arXiv "
             "2408.06266), eq. 7",
       formula='1 - sig(beta rho_w) + sig(beta rho_l)')
def _apo_zero(p: _Pair, beta: float) -> Losses:
    """APO-zero:  (1 - sig(beta rho_w)) + sig(beta rho_l)  (D'Oosterlinck et al. 2024, eq. 7).

    Anchored at zero: pushes the chosen likelihood up and the rejected one down, each on its
    own, for when the chosen answers are better than the model's own.
    """
    rw, rl = _logratio_rewards(p, beta)
    return (1 - torch.sigmoid(rw) + torch.sigmoid(rl), rw, rl)


@_loss("apo_down", reference=True, length_normalised=False, params={},
       paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions (arXiv "
             "2408.06266), eq. 8",
       formula='sig(beta rho_w) + 1 - sig(beta h)')
def _apo_down(p: _Pair, beta: float) -> Losses:
    """APO-down:  sig(beta rho_w) + (1 - sig(beta h))  (D'Oosterlinck et al. 2024, eq. 8).

    For when the chosen answers are worse than the model's own: lowers the chosen likelihood,
    and the rejected one more. Raising s_w therefore need not lower this loss.
    """
    rw, rl = _logratio_rewards(p, beta)
    return (torch.sigmoid(rw) + 1 - torch.sigmoid(rw - rl), rw, rl)


@_loss("bco_pair", reference=True, length_normalised=False, params={"delta": 0.0},
       paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (arXiv "
             "2404.04656)",
       formula="-logsig(beta rho_w - delta) - logsig(-(beta rho_l - delta))")
def _bco_pair(p: _Pair, beta: float, delta: float) -> Losses:
    """BCO on pairs:  -logsig(beta rho_w - delta) - logsig(-(beta rho_l - delta))  (Jung et al. 2024).

    Each response is classified on its own (chosen = 1, rejected = 0) around the shift delta.
    The paper's delta is a running mean of the rewards; older TRL kept one inside the trainer,
    TRL 1.x uses delta = 0. Here it is a parameter (a number, detached from the graph): our
    trainer passes --bco-delta as given (default 0, as TRL 1.x); a caller that wants the paper's
    running mean supplies it.
    """
    rw, rl = _logratio_rewards(p, beta)
    return (-F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta)), rw, rl)


@_loss("nca_pair", reference=True, length_normalised=False, params={},
       paper="Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards (arXiv "
             "2402.05369)",
       formula="-logsig(beta rho_w) - 1/2 logsig(-beta rho_w) - 1/2 logsig(-beta rho_l)")
def _nca_pair(p: _Pair, beta: float) -> Losses:
    """NCA on pairs:  -logsig(beta rho_w) - 1/2 logsig(-beta rho_w) - 1/2 logsig(-beta rho_l)
    (Chen et al. 2024). Absolute rather than relative: the chosen likelihood is held up
    (its term is minimised at beta rho_w = log 2, not pushed without bound)."""
    rw, rl = _logratio_rewards(p, beta)
    return (-F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl), rw, rl)


@_loss("exo_pair", reference=True, length_normalised=False, params={"label_smoothing": 1e-3},
       paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (arXiv "
             "2402.00856), eq. 16",
       formula="sig(beta h)(logsig(beta h) - log(1-eps)) + sig(-beta h)(logsig(-beta h) - log eps)")
def _exo_pair(p: _Pair, beta: float, label_smoothing: float) -> Losses:
    """EXO-pref for two responses:  KL(q || [1 - eps, eps]),  q = [sig(beta h), sig(-beta h)]
    = sig(beta h)(logsig(beta h) - log(1 - eps)) + sig(-beta h)(logsig(-beta h) - log eps)
    (Ji et al. 2024, eq. 16). The reverse KL to a smoothed target: minimised at
    beta h = log((1 - eps) / eps); eps in (0, 0.5), 1e-3 as the paper and TRL."""
    x = beta * ((p.pc - p.pr) - (p.rc - p.rr))  # [B]
    eps = label_smoothing
    losses = (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
              + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
    return (losses, *_logratio_rewards(p, beta))


@_loss("dpop", reference=True, length_normalised=False, params={"dpop_lambda": 50.0},
       paper="Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive "
             "(arXiv 2402.13228)",
       formula="-logsig(beta (h - lambda max(0, S_w - s_w)))")
def _dpop(p: _Pair, beta: float, dpop_lambda: float) -> Losses:
    """DPO-Positive (Smaug):  -logsig(beta (h - lambda max(0, S_w - s_w)))  (Pal et al. 2024).

    The penalty lambda * max(0, log pi_ref(y_w) - log pi(y_w)) is INSIDE the sigmoid and beta
    multiplies the whole bracket: the reading of the corrected paper (v3, July 2024), which the
    authors confirmed fixed the bracketing of the first version (github.com/abacusai/smaug
    issue 2). The other reading, -logsig(beta h) + lambda max(0, ...) outside the sigmoid,
    is unbounded and, at the paper's lambda = 50, dominates the loss. TRL 1.16 has no DPOP
    (its PR #3864 was closed), so there is no TRL convention to follow. Rewards: beta * rho.
    """
    penalty = torch.relu(p.rc - p.pc)  # [B] how far the chosen log-prob fell below the reference
    h = (p.pc - p.pr) - (p.rc - p.rr)
    return (-F.logsigmoid(beta * (h - dpop_lambda * penalty)), *_logratio_rewards(p, beta))


@_loss("sft", reference=False, length_normalised=True, params={},
       paper="the chosen responses' NLL; with sigmoid: RPO, Pang et al. 2024, Iterative Reasoning Preference "
             "Optimization (arXiv 2404.19733)",
       formula='-m_w = -s_w / n_w')
def _sft(p: _Pair, beta: float) -> Losses:
    """The chosen responses' mean NLL:  -m_w = -s_w / n_w, per pair. No reference; meant for
    combinations (sigmoid + a * sft = RPO). TRL's "sft" is a token mean over the whole batch:
    the same when all chosen responses have the same length. Rewards: beta * m (for logging)."""
    mw, ml = p.pc / p.nc, p.pr / p.nr  # [B]
    return (-mw, beta * mw, beta * ml)


# --- the table -------------------------------------------------------------------------------



LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)


# --- validation ------------------------------------------------------------------------------


def _check_loss_type(loss_type: str, param: str = "loss_type") -> LossSpec:
    if loss_type not in LOSSES:
        raise LossParamError(param, f"unknown loss_type {loss_type!r}; valid loss types: {', '.join(LOSS_TYPES)}")
    return LOSSES[loss_type]


def _check_beta(beta: float) -> float:
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise LossParamError("beta", f"beta must be a finite number > 0, got {beta!r}") from None
    if not (math.isfinite(beta) and beta > 0):
        raise LossParamError("beta", f"beta must be a finite number > 0, got {beta}")
    return beta


def _param_range(loss_type: str, name: str, v: float) -> str | None:
    """None if v is a valid value of param `name` for `loss_type`, else the valid range in words."""
    if name == "label_smoothing":
        ok, rng = {"sigmoid": (0 <= v <= 0.5, "[0, 0.5]"),
                   "robust": (0 <= v < 0.5, "[0, 0.5) (it divides by 1 - 2*label_smoothing)"),
                   "exo_pair": (0 < v < 0.5, "(0, 0.5) (it takes log(label_smoothing); the paper uses 1e-3)"),
                   }[loss_type]
    elif name == "delta":
        ok, rng = True, "any finite number"
    else:  # gamma, lambda_, dpop_lambda: weights and margins
        ok, rng = v >= 0, ">= 0"
    return None if ok else rng


def check_loss_params(loss_type: str, beta: float, params: Mapping[str, object]) -> dict[str, float]:
    """Validate one loss's settings; return its full params (defaults filled in, floats).

    A param whose value is None counts as not given (the config layer's "use the default").
    A param the loss does not take is refused, whatever its value: a setting that silently
    does nothing is a mistake.

    Raises:
        LossParamError (a ValueError) whose `param` and message name the setting: unknown
        loss_type (the message lists the valid ones), beta not finite > 0, a param the loss
        does not take (the message lists the ones it does), a value not a finite number or
        out of its range.
    """
    spec = _check_loss_type(loss_type)
    _check_beta(beta)
    full = dict(spec.params)
    for name, value in params.items():
        if value is None:
            continue
        if name not in spec.params:
            valid = ", ".join(spec.params) or "none"
            raise LossParamError(name, f"{name} is not a parameter of loss_type {loss_type!r} "
                                       f"(its parameters: {valid}); it must not be set")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise LossParamError(name, f"{name} for loss_type {loss_type!r} must be a finite number, got {value!r}")
        rng = _param_range(loss_type, name, float(value))
        if rng is not None:
            raise LossParamError(name, f"{name} for loss_type {loss_type!r} must be in {rng}, got {value}")
        full[name] = float(value)
    return full


def _names(loss_types: str | Sequence[str]) -> tuple[str, ...]:
    return (loss_types,) if isinstance(loss_types, str) else tuple(loss_types)


def needs_reference(loss_types: str | Sequence[str]) -> bool:
    """Whether a loss, or a combination of losses, needs the reference model's log-probs."""
    return any([_check_loss_type(t, "loss_types").needs_reference for t in _names(loss_types)])


def needs_token_counts(loss_types: str | Sequence[str]) -> bool:
    """Whether a loss, or a combination of losses, needs the response token counts."""
    return any([_check_loss_type(t, "loss_types").length_normalised for t in _names(loss_types)])


def check_combination(loss_types: Sequence[str], weights: Sequence[float] | None, beta: float,
                      params: Mapping[str, object]) -> list[tuple[str, float, dict[str, float]]]:
    """Validate a weighted combination; return (name, weight, full params) per member.

    Each member receives the params it takes (a shared name such as label_smoothing goes to
    every member that takes it); a param that no member takes is refused. weights None means
    1.0 each.

    Raises:
        LossParamError: no loss, an unknown or repeated name (param "loss_types"), a weights
        list of another length, a weight not finite >= 0, or all weights 0 (param "weights"),
        or any error of `check_loss_params`.
    """
    names = _names(loss_types)
    if not names:
        raise LossParamError("loss_types", "loss_types must name at least one loss")
    for t in names:
        _check_loss_type(t, "loss_types")
    repeated = sorted({t for t in names if names.count(t) > 1})
    if repeated:
        raise LossParamError("loss_types", f"loss_types names {', '.join(repeated)} more than once; "
                                           "give each loss once, with its weight")
    ws = [1.0] * len(names) if weights is None else list(weights)
    if len(ws) != len(names):
        raise LossParamError("weights", f"weights has {len(ws)} entries for {len(names)} loss types "
                                        f"({', '.join(names)}); give one weight per loss")
    for t, w in zip(names, ws):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (math.isfinite(w) and w >= 0):
            raise LossParamError("weights", f"weights: the weight of {t!r} must be a finite number >= 0, got {w!r}")
    if not any(w > 0 for w in ws):
        raise LossParamError("weights", "weights are all 0: the loss would be 0")
    given = {k: v for k, v in params.items() if v is not None}
    taken = {k for t in names for k in LOSSES[t].params}
    for k in given:
        if k not in taken:
            valid = ", ".join(sorted(taken)) or "none"
            raise LossParamError(k, f"{k} is not a parameter of any of loss_types {', '.join(names)} "
                                    f"(their parameters: {valid}); it must not be set")
    return [(t, float(w), check_loss_params(t, beta, {k: v for k, v in given.items() if k in LOSSES[t].params}))
            for t, w in zip(names, ws)]


def _check_tensors(named: Mapping[str, Tensor], counts: Sequence[str] = ()) -> None:
    """Each tensor must be 1-D [B], all of the same shape, and (but the token `counts`)
    floating point. The first one sets the shape; messages use the given names."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if name not in counts and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of log-probs, got {t.dtype}")
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D [B] (one value per sequence), got shape {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape "
                             f"{tuple(first.shape)}; all inputs must be [B]")


def _prepare(loss_type: str, spec: LossSpec, given: dict[str, Tensor | None]) -> _Pair:
    """Check presence (what the loss needs, and nothing it would ignore), types and shapes, and
    cast to the compute dtype promote_types(inputs..., float32)."""
    refs, counts = ("reference_chosen", "reference_rejected"), ("chosen_tokens", "rejected_tokens")
    for name in refs + counts:
        wanted = spec.needs_reference if name in refs else spec.length_normalised
        why = ("it compares the policy with the reference model" if name in refs
               else "it divides the summed log-probs by the response token counts")
        if wanted and given[name] is None:
            raise ValueError(f"{name} is required by loss_type {loss_type!r} ({why}); got None")
        if not wanted and given[name] is not None:
            kind = "reference-free" if name in refs else "not length-normalised"
            raise ValueError(f"{name} is not used by loss_type {loss_type!r} (it is {kind}); pass None")
    present = {k: t for k, t in given.items() if t is not None}
    _check_tensors(present, counts)
    dtype = torch.float32
    for name, t in present.items():
        if name not in counts:
            dtype = torch.promote_types(dtype, t.dtype)
    for name in counts:
        if given[name] is not None and not bool((given[name] > 0).all()):
            raise ValueError(f"{name} must be > 0 for every pair (a response needs at least one token)")
    cast = {k: (None if t is None else t.to(dtype)) for k, t in given.items()}
    return _Pair(cast["policy_chosen"], cast["policy_rejected"], cast["reference_chosen"],
                 cast["reference_rejected"], cast["chosen_tokens"], cast["rejected_tokens"])


# --- the public functions --------------------------------------------------------------------


def preference_loss(
    loss_type: str,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor | None = None,
    reference_rejected: Tensor | None = None,
    *,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    beta: float,
    **params: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss and rewards of one loss in `LOSSES`.

    Args:
        loss_type: a key of `LOSSES`.
        policy_chosen, policy_rejected: [B] s_w, s_l: the policy's log-probs of the chosen and
            rejected responses, summed over response tokens.
        reference_chosen, reference_rejected: [B] S_w, S_l under the reference model (no
            gradient needed). Required by the losses with `needs_reference`; must be None for
            the reference-free ones (simpo, orpo, sft).
        chosen_tokens, rejected_tokens: [B] response token counts n_w, n_l (int or float, > 0).
            Required by the losses with `length_normalised` (sigmoid_norm, simpo, orpo, sft),
            which divide the sums themselves; must be None for the others.
        beta: > 0. For the DPO family the KL weight: higher keeps the policy closer to the
            reference. For simpo the reward scale; orpo does not use it; sft only in its rewards.
        **params: the loss's own hyperparameters (`LOSSES[loss_type].params` has them and their
            defaults): label_smoothing (sigmoid, robust, exo_pair), gamma (simpo), lambda_
            (orpo), dpop_lambda (dpop), delta (bco_pair).

    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]) in promote_types(dtype, float32).
        Rewards are detached: beta * rho for the reference-based losses, beta * rho / n for
        sigmoid_norm, beta * m for simpo and sft, lambda_ * m for orpo. Take losses.mean()
        for the batch loss.

    Raises:
        LossParamError (ValueError): a bad loss_type, beta or param (see `check_loss_params`).
        ValueError: a reference or token count missing where needed or given where not used,
            a token count <= 0, or inputs that are not all 1-D of one shape (each message
            names the argument).
        TypeError: an input that is not a tensor, or log-probs that are not floating point.
    """
    full = check_loss_params(loss_type, beta, params)
    spec = LOSSES[loss_type]
    pair = _prepare(loss_type, spec, {
        "policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
        "reference_chosen": reference_chosen, "reference_rejected": reference_rejected,
        "chosen_tokens": chosen_tokens, "rejected_tokens": rejected_tokens,
    })
    losses, chosen_rewards, rejected_rewards = spec.fn(pair, float(beta), **full)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def combined_loss(loss_types: Sequence[str], weights: Sequence[float] | None, *logps: Tensor | None,
                  chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None, beta: float,
                  **params: float) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted sum of several losses, per pair:  sum_i weights[i] * losses_i  [B].

    ["sigmoid", "sft"] with weights [1.0, a] is RPO (Pang et al. 2024): DPO plus a times the
    chosen responses' mean NLL, as TRL's loss_type=["sigmoid", "sft"], loss_weights=[1.0, a].

    logps: policy_chosen, policy_rejected and, for a combination that reads a reference,
    reference_chosen, reference_rejected, all [B]; the other arguments are those of
    `preference_loss`. Each member gets the references and token counts it takes, and the
    params it takes (see `check_combination`). The references are
    required iff some member needs them (`needs_reference`), and refused otherwise; the same
    for the token counts (`needs_token_counts`).

    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]): the rewards of the first member
        that is not "sft" (for "sft" alone, its own: beta * mean log-prob, detached).
    """
    if len(logps) not in (2, 4):
        raise TypeError(f"combined_loss takes 2 log-prob tensors (policy chosen, rejected) or 4 (and the "
                        f"reference's), got {len(logps)}")
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = (*logps, None, None)[:4]
    members = check_combination(loss_types, weights, beta, params)
    names = [t for t, _, _ in members]
    for name, t, wanted in (("reference_chosen", reference_chosen, needs_reference(names)),
                            ("reference_rejected", reference_rejected, needs_reference(names)),
                            ("chosen_tokens", chosen_tokens, needs_token_counts(names)),
                            ("rejected_tokens", rejected_tokens, needs_token_counts(names))):
        if wanted and t is None:
            raise ValueError(f"{name} is required by loss_types {', '.join(names)}; got None")
        if not wanted and t is not None:
            raise ValueError(f"{name} is not used by any of loss_types {', '.join(names)}; pass None")

    total, rewards = None, None
    for t, w, p in members:
        spec = LOSSES[t]
        ref = (reference_chosen, reference_rejected) if spec.needs_reference else (None, None)
        tok = (chosen_tokens, rejected_tokens) if spec.length_normalised else (None, None)
        losses, cr, rr = preference_loss(t, policy_chosen, policy_rejected, *ref,
                                         chosen_tokens=tok[0], rejected_tokens=tok[1], beta=beta, **p)
        total = w * losses if total is None else total + w * losses
        if rewards is None and t != "sft":
            rewards = (cr, rr)
    if rewards is None:  # sft alone
        rewards = (cr, rr)
    return total, *rewards


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The original API: `preference_loss` for the reference-based losses that need no token
    counts (sigmoid, robust, ipo, hinge, apo_zero, apo_down, bco_pair, nca_pair, exo_pair,
    dpop), with label_smoothing as its only parameter.

    Args:
        policy_chosen_logps:      [B] log pi(y_w | x), summed (or averaged) over response tokens.
        policy_rejected_logps:    [B] log pi(y_l | x).
        reference_chosen_logps:   [B] log pi_ref(y_w | x) (no gradient needed).
        reference_rejected_logps: [B] log pi_ref(y_l | x).
        beta: KL weight, > 0. Higher beta keeps the policy closer to the reference.
        loss_type: with h the log-ratio margin and ls = label_smoothing:

            - "sigmoid": ``-logsigmoid(beta*h)*(1-ls) - logsigmoid(-beta*h)*ls``, ls in [0, 0.5]
              (0: DPO; > 0: conservative DPO).
            - "robust": ``(-logsigmoid(beta*h)*(1-ls) + logsigmoid(-beta*h)*ls) / (1-2*ls)``,
              ls in [0, 0.5) strictly.
            - "ipo": ``(h - 1/(2*beta))**2``.
            - "hinge": ``relu(1 - beta*h)``.
            - the others as in `LOSSES`.

            label_smoothing must be 0 for a loss without it (it is not silently ignored).
        label_smoothing: assumed label-noise rate, see above.

    Returns:
        (losses [B], chosen_rewards [B], rejected_rewards [B]) in promote_types(dtype, float32);
        the rewards are ``beta * (policy - reference)``, detached.

    Raises:
        ValueError: unknown loss_type (the message lists the valid ones), beta not a finite
            positive number, label_smoothing out of range or set for a loss without it, or
            inputs that are not all 1-D with the same shape (the message names the argument).
    """
    named = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
             "reference_chosen_logps": reference_chosen_logps, "reference_rejected_logps": reference_rejected_logps}
    _check_tensors(named)  # here, so that the messages use this function's names
    spec = _check_loss_type(loss_type)
    params = {"label_smoothing": label_smoothing}
    if "label_smoothing" not in spec.params and label_smoothing == 0:
        params = {}  # the old API always passes it; 0 means "not used"
    return preference_loss(loss_type, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                           reference_rejected_logps, beta=beta, **params)
