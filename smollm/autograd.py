"""Hand-written backward passes for RMSNorm and the SwiGLU MLP: the same numbers as autograd,
fewer activations kept for backward (tests/test_model.py checks both).

Autograd keeps every intermediate an op needs for its gradient. For the two elementwise-heavy
parts of a block, most of those are cheap to recompute, so these functions keep only their
inputs (and a per-row scalar) and recompute the rest in backward with the same kernels.

The model uses them only where they are exact stand-ins for the module they replace:
`plain_linear` says whether a Linear module is nothing but `F.linear(x, weight)`, so that
reading its weight directly computes what calling it would. Any other module (a LoRA adapter,
a Linear with hooks or a bias) is called as itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module


def plain_linear(m: nn.Module) -> bool:
    """Whether `m(x)` is exactly `F.linear(x, m.weight)`: a bias-free nn.Linear (not a
    subclass) with no forward hooks of its own and none registered globally."""
    return (type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks
            and not _module._global_forward_hooks and not _module._global_forward_pre_hooks)


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / rms of each row of x [.., C] -> [.., 1], in fp32.

    The mean is written as what `mean` computes on a CPU or GPU, a sum divided by C (the same
    bits), without `mean`'s extra dispatch: this runs twice per block per decoding step."""
    x32 = x if x.dtype == torch.float32 else x.float()
    return torch.rsqrt(x32.pow(2).sum(-1, keepdim=True).div_(x.shape[-1]) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in fp32 and cast back: HF's LlamaRMSNorm arithmetic.
    The forward of `RMSNormFunction`, for when no gradient is needed. (In fp32 the casts are
    skipped, not dispatched: they would copy nothing, at a microsecond each per decoding step.)"""
    if x.dtype == torch.float32:
        return weight * (x * _rstd(x, eps))
    return weight * (x.float() * _rstd(x, eps)).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """x / sqrt(mean(x^2) + eps) * weight with a hand-written backward, to keep less for it.

    Autograd would keep x and the normalised x (two [.., C] tensors); this keeps x and the
    per-row 1/rms [.., 1], and recomputes the normalised x in backward. Forward is the same
    arithmetic as HF's LlamaRMSNorm, so outputs are bit-identical.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = _rstd(x, eps)  # [.., 1] fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd  # [.., C] fp32
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad * weight).float()  # d loss / d normed
            # d normed / d x = rstd * (I - normed normed^T / C)
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) with a hand-written backward, to keep less for it.

    Autograd would keep gate, silu(gate), up and their product: four [.., I] tensors, the
    largest activations of a block. This keeps gate and up and recomputes the other two
    (elementwise, cheap) in backward, with the same kernels, so gradients are bit-identical.
    Under autocast it computes in the autocast dtype, as F.linear would. `weight` is the
    down projection's [C, I]; use it only for a `plain_linear` module.
    """

    @staticmethod
    def forward(ctx, gate, up, weight):
        device = gate.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        ctx.save_for_backward(gate, up, weight)
        ctx.dtype = dtype
        with torch.autocast(device, enabled=False):
            return F.linear((F.silu(gate) * up).to(dtype), weight.to(dtype))  # [.., C]

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        with torch.autocast(gate.device.type, enabled=False):
            silu = F.silu(gate)
            grad = grad.to(ctx.dtype)
            grad_weight = None
            if ctx.needs_input_grad[2]:
                hidden = (silu * up).to(ctx.dtype)  # [.., I], as in forward
                grad_weight = (grad.reshape(-1, grad.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1]))
                grad_weight = grad_weight.to(weight.dtype)  # [C, I]
            grad_hidden = (grad @ weight.to(ctx.dtype)).to(silu.dtype)  # [.., I]
            grad_up = grad_hidden * silu
            grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
        return grad_gate, grad_up, grad_weight
