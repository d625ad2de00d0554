"""oneDNN's matmul for the model's Linear layers while it generates on an x86 CPU.

A decoding step multiplies one row per sequence (B rows) by every weight matrix of the
model. PyTorch sends an fp32 `F.linear` to MKL, whose kernels are slow for so few rows: at
one row it reads the 540 MB of SmolLM-135M's weights at 17 GB/s where the memory gives 36,
and at 2 to 16 rows it takes longer still (on an AMD EPYC its timings are the same with
AVX-512 allowed or not). oneDNN, which PyTorch ships for its bf16 matmuls, has kernels made for small batches.
It first copies each weight once into its own blocked layout (`_reorder_linear_weight`, for B
rows; for two when B is 1, which reads faster than the plain weight even at one row), which its
kernels multiply 1.5 to 2.5 times as fast as MKL the plain one; the copies live as long as the `with`
block (as much memory again as the weights; about 0.1-0.2 s for SmolLM-135M).
docs/benchmarks.md (section 9, Generation) has the measurements.

`onednn_linears(model, batch_size)` swaps, for the duration of a `with` block, every plain
`nn.Linear` (nothing but x W^T: `smollm.autograd.plain_linear`) whose weight is a dense fp32
CPU tensor for a `OneDNNLinear` around it, and puts the originals back afterwards. A LoRA
adapter keeps its own forward and gets the fast base layer. Modules of any other kind, other
devices, other dtypes, autocast and builds without oneDNN are left as they are. The weights
must not change inside the block (a packed copy would not see it).

Exactness: both libraries add the same products in a different order, so a logit may differ
in its last bits (about 1e-6 relative). Greedy tokens are the same unless the two best
logits tie to that precision; `tests/test_generation.py` checks the tokens against F.linear's,
on the real model too. No gradient flows through it: generation runs under inference mode.

Many rows at once (a training batch's 2,000 tokens, a held-out batch) are a different case:
MKL's kernels are efficient there, but oneDNN's are still faster, 10-20% with AVX2 kernels
and 2x with AVX-512 (MKL does not use AVX-512 on this AMD EPYC), and a copy of the weights would
cost memory for little more. `onednn_linears(model, packed=False)` reads each weight where it
is (`linear`, the function): the frozen trunk and the reference, which run without a gradient
in every training step (`dpo.engine`), and the evaluations use it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .autograd import plain_linear
from .model import MLP, Attention


def available() -> bool:
    """Whether this PyTorch has oneDNN's linear op and runs on an x86 CPU with AVX2 or better."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX"))


class OneDNNLinear(nn.Module):
    """`linear(x)` computed by oneDNN: x [.., in] -> [.., out]. No gradient flows through it.

    batch_size: the rows per call to tune for; the weight is copied once into oneDNN's
    blocked layout for that many rows (at least two; any number of rows still works).
    packed=False: no copy; each call reads the weight where it is (for calls of many rows).
    """

    def __init__(self, linear: nn.Linear, batch_size: int = 1, packed: bool = True):
        super().__init__()
        self.linear = linear
        self.packed = packed_weight(linear.weight.detach(), batch_size) if packed else None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.linear.weight.requires_grad):
            raise RuntimeError("OneDNNLinear has no backward: call it under torch.no_grad() or inference mode")
        return _matmul(x, self.packed if self.packed is not None else self.linear.weight.detach())


class OneDNNFused(nn.Module):
    """Several Linear layers that read the same input, as one oneDNN matmul of their weights
    stacked: x [.., in] -> [.., sum of out_i], whose i-th slice of out_i columns equals `linears[i](x)`.

    A decoding step at one row is bound by reading the weights; one matmul of q, k and v (or of
    gate and up) reads the same bytes as three (two), with one call's overhead instead of
    several, and keeps both cores busy on a larger output. The stacked copy is as much memory
    as the weights it stacks, for as long as the module lives.
    """

    def __init__(self, linears: list[nn.Linear], batch_size: int = 1):
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [sum of out, in]
        self.packed = packed_weight(weight, batch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(x, self.packed)  # [.., sum of out]


def _matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [.., in] @ W^T -> [.., out] by oneDNN, W [out, in] a `packed_weight` copy or a plain weight."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [.., in] @ weight^T -> [.., out], without a gradient: by oneDNN where it applies (the weight
    a dense fp32 CPU tensor, x too, oneDNN available, CPU autocast off), else by F.linear."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and _dense_fp32_cpu(weight)
            and not torch.is_autocast_enabled("cpu") and available()):
        return _matmul(x, weight.detach())
    return torch.nn.functional.linear(x, weight)


def packed_weight(weight: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`weight` [out, in] copied into oneDNN's blocked layout for `batch_size` rows a call.

    Even one row is packed as for two: measured on an AMD EPYC (docs/benchmarks.md, section 9),
    the blocked copy is read faster than the plain weight in place (o_proj 0.055 -> 0.036 ms,
    down_proj 0.15 -> 0.10 ms, the LM head 2.85 -> 2.50 ms), which pays back the copy (~0.1 s for
    SmolLM-135M) within a few dozen tokens."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=max(batch_size, 2))


def _dense_fp32_cpu(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.layout == torch.strided and \
        type(w.data) is torch.Tensor  # not a DTensor shard, a quantized or a meta tensor


def _swappable(module: nn.Module) -> bool:
    return plain_linear(module) and _dense_fp32_cpu(module.weight)


# module type -> (the attribute its forward reads a fused matmul from, the Linear layers it fuses)
_FUSIONS = {Attention: ("fused_qkv", ("q_proj", "k_proj", "v_proj")), MLP: ("fused_gate_up", ("gate_proj", "up_proj"))}


def _fusable(module: nn.Module) -> tuple[str, tuple[str, ...]] | None:
    """(attribute, names) of the Linear layers of `module` that one matmul can compute (they read
    the same input), when every one of them is swappable: q, k, v of an Attention, gate and up of
    an MLP. None otherwise (e.g. a LoRA adapter on q or v: it keeps its own forward)."""
    fusion = _FUSIONS.get(type(module))
    return fusion if fusion and all(_swappable(getattr(module, n)) for n in fusion[1]) else None


@contextlib.contextmanager
def onednn_linears(model: nn.Module, batch_size: int = 1, enabled: bool = True, packed: bool = True
                   ) -> Iterator[int]:
    """Run the plain fp32 CPU Linear layers of `model` with oneDNN inside the block, tuned for
    `batch_size` rows per call (the sequences decoded together).

    q, k and v of each attention, and gate and up of each MLP, run as one matmul each
    (`OneDNNFused`, the model's `fused_qkv` and `fused_gate_up`); every other plain Linear (o,
    down, the LM head) as a `OneDNNLinear`. packed=False copies nothing: every plain Linear
    becomes a `OneDNNLinear` that reads its weight in place, and nothing is fused.

    Yields how many Linear layers this block swapped (0 when oneDNN is unavailable, `enabled` is
    False, CPU autocast is on, or the model lives elsewhere). Not for training: the op has no
    backward, so call it where no gradient is wanted (inference mode or no_grad).

    Nested: inside an enclosing block on the same model, the layers it swapped stay as they are
    (their copies made once), and this block swaps only what it left. `python -m smollm.serve`
    holds one block for its whole life, so that no request pays for copying the weights.
    """
    if not enabled or torch.is_autocast_enabled("cpu") or not available():
        yield 0
        return
    fused, swapped = [], []  # (module, attribute, names of its fused layers); (parent, attribute name, original)
    for parent in list(model.modules()):
        if isinstance(parent, OneDNNLinear):  # an enclosing block's: the layer inside it stays as it is
            continue
        fusion = _FUSIONS.get(type(parent))
        if fusion is not None and getattr(parent, fusion[0]) is not None:  # fused by an enclosing block
            names = fusion[1]
        else:
            attribute, names = (_fusable(parent) if packed else None) or (None, ())
            if names:
                fused.append((parent, attribute, names))
        for name, child in parent.named_children():
            if _swappable(child) and name not in names:
                swapped.append((parent, name, child))
    try:
        for parent, attribute, names in fused:
            setattr(parent, attribute, OneDNNFused([getattr(parent, n) for n in names], batch_size))
        for parent, name, child in swapped:
            setattr(parent, name, OneDNNLinear(child, batch_size, packed))
        yield len(swapped) + sum(len(names) for *_, names in fused)
    finally:
        for parent, attribute, _ in fused:
            setattr(parent, attribute, None)
        for parent, name, child in swapped:
            setattr(parent, name, child)
