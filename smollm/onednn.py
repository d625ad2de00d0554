"""oneDNN's matmul for the model's Linear layers while it generates on an x86 CPU.

A decoding step multiplies one row per sequence (B rows) by every weight matrix of the
model. PyTorch sends an fp32 `F.linear` to MKL, whose kernels for so few rows are slow: at
one row they use one core, so the step reads the 540 MB of SmolLM-135M's weights at a
single core's bandwidth; at 16 rows they reach a third of what the cores can do. oneDNN,
which PyTorch ships for its bf16 matmuls, has kernels made for small batches and uses every
thread, reading the same [out, in] weight tensor where it is (no copy, no repacking).
docs/benchmarks.md ("Generation") has the measurements.

`onednn_linears(model)` swaps, for the duration of a `with` block, every plain `nn.Linear`
(nothing but x W^T: `smollm.autograd.plain_linear`) whose weight is a dense fp32 CPU tensor
for a `OneDNNLinear` around it, and puts the originals back afterwards. A LoRA adapter keeps
its own forward and gets the fast base layer. Modules of any other kind, other devices,
other dtypes, autocast and builds without oneDNN are left as they are.

Exactness: both libraries add the same products in a different order, so a logit may differ
in its last bits (about 1e-6 relative). Greedy tokens are the same unless the two best
logits tie to that precision; `tests/test_generation.py` checks the tokens against F.linear's
on the real model. No gradient flows through it: generation runs under inference mode.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .autograd import plain_linear


def available() -> bool:
    """Whether this PyTorch has oneDNN's linear op and runs on an x86 CPU with AVX2 or better."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX"))


class OneDNNLinear(nn.Module):
    """`linear(x)` computed by oneDNN: x [.., in] -> [.., out], reading `linear.weight` in place."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.linear.weight, None, "none", [], "")


def _swappable(module: nn.Module) -> bool:
    if not plain_linear(module):
        return False
    w = module.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.layout == torch.strided and \
        type(w.data) is torch.Tensor  # not a DTensor shard, a quantized or a meta tensor


@contextlib.contextmanager
def onednn_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Run the plain fp32 CPU Linear layers of `model` with oneDNN inside the block.

    Yields how many layers were swapped (0 when oneDNN is unavailable, `enabled` is False,
    CPU autocast is on, or the model lives elsewhere). Not for training: the op has no backward.
    """
    if not enabled or torch.is_autocast_enabled("cpu") or not available():
        yield 0
        return
    swapped = []  # (parent, attribute name, original module)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if _swappable(child):
                swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            setattr(parent, name, OneDNNLinear(child))
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
