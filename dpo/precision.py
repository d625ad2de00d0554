"""The precision a run computes in: fp32, or bf16 autocast over fp32 master weights.

bf16 autocast runs the matrix products in bfloat16 while the weights, the optimizer state and
the residual stream stay fp32. It is the default where the hardware computes bf16 natively:
on CUDA, and on CPUs with bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm's BF16
extension). Elsewhere a CPU emulates bf16 through fp32 and gains nothing, so fp32 is the
default there. `--dtype` overrides either way. On the 2-core AVX512-BF16 machine of
docs/results.md a DPO step of the default run takes 5.3 s in bf16 against 6.2 s in fp32, with
the same accuracy and health (section "fp32 against bf16 on the CPU").
"""
from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
from pathlib import Path

import torch

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean native bf16 arithmetic
_X86_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
_ARM_BF16_FEATURES = {"bf16"}


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether a Linux /proc/cpuinfo text lists a native bf16 instruction set."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        words = set(value.split())
        if key.strip() == "flags" and words & _X86_BF16_FLAGS:
            return True
        if key.strip() == "Features" and words & _ARM_BF16_FEATURES:
            return True
    return False


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this machine's CPU computes bf16 natively (Linux: /proc/cpuinfo; macOS: sysctl).

    On x86, PyTorch must also be allowed its AVX-512 kernels: with ATEN_CPU_CAPABILITY=avx2 (how an
    AVX2-only CPU is emulated on a newer one, docs/benchmarks.md) it computes as such a CPU does,
    and bf16 is emulated there.
    """
    if platform.machine().lower() in ("x86_64", "amd64") and \
            not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        try:
            return cpuinfo_has_bf16(cpuinfo.read_text(errors="replace"))
        except OSError:
            return False
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                                 text=True, timeout=5)
            return out.stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def default_dtype_name(device: torch.device) -> str:
    """'bfloat16' on CUDA and on CPUs with native bf16, else 'float32'."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_native_bf16()):
        return "bfloat16"
    return "float32"


def autocast_dtype_for(config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a run: `config.dtype` ('float32' or 'bfloat16'), or the device's
    default when it is None. None means fp32 (no autocast)."""
    name = config.dtype or default_dtype_name(device)
    return torch.bfloat16 if name == "bfloat16" else None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast(device, dtype), or nothing when dtype is None (fp32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def precision_note(asked: str | None, autocast_dtype: torch.dtype | None, device: torch.device) -> str:
    """One line for the log: what the run computes in, and why."""
    what = "bf16 autocast (fp32 master weights)" if autocast_dtype is not None else "fp32"
    if asked:
        why = f"--dtype {asked}"
    elif device.type == "cpu":
        why = ("this CPU computes bf16 natively; --dtype float32 to change" if autocast_dtype is not None else
               "this CPU has no native bf16; --dtype bfloat16 to change")
    else:
        why = f"the default on {device.type}"
    return f"{what} on {device} ({why})"
