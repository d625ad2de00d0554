"""Big CPU tensors from memory the process already has: glibc's malloc asked to keep what is freed.

On Linux, PyTorch allocates a CPU tensor's memory with malloc. glibc serves a request above its
mmap threshold (128 KiB at first, rising as big blocks are freed, to 32 MiB at most) with fresh
pages from the kernel and gives them back when the tensor is freed; it also gives back the free top
of its heap once that passes the trim threshold. A training step makes and frees the same big
tensors every time (the LM head's 50 MB chunks of logits, the blocks' activations), so each step
pays again for fresh pages: a page fault per 4 KiB and the kernel zeroing the page. A new 50 MB
tensor took about 15 ms that way, against 2.7 ms for the subtraction that fills it.

`keep_freed_memory()` raises both thresholds with glibc's `mallopt`: blocks up to 256 MiB come from
the heap, and up to 1 GiB freed at its top stays there. A freed block then serves the next tensor
that fits in it (not one of exactly its size: PyTorch aligns its blocks to 64 bytes, and glibc's
aligned request is a little larger than the hole, so the heap may first grow by such a block).
The default run with AVX2 kernels took 11.2 min instead of 12.1 (training 434 s instead of 465,
evaluations 218 s instead of 245; the kernel's time 24 s instead of 89) with the same peak memory
(4.3 GB); natively in bf16, 6.9 min instead of 7.8, with 13% more peak memory (6.3 GB). The losses
and the answers are the same to the bit (docs/benchmarks.md, section 12). The price: the process
keeps memory it no longer uses until it exits.

It changes the whole process, so importing `smollm` or `dpo` does not do it: the training commands
call it (`python -m dpo.train` and `dpo.sft`, in `dpo.cli.main`), and so do the notebooks and the
benchmarks of training steps. A `generate` call makes few big tensors but one big copy: the weights in
oneDNN's layout (`smollm.onednn`), which took 330 ms a call without this and 150 ms with it, in one process
calling again (docs/benchmarks.md, section 16); `python -m smollm` answers once and does not call it. It leaves
malloc alone where glibc's is not the allocator (macOS, musl, or a preloaded jemalloc, tcmalloc or
mimalloc), where the user set glibc's own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_), and with SMOLLM_KEEP_FREED_MEMORY=0.
"""
from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 256 * 2**20  # blocks up to this size come from the heap, not from fresh mappings
TRIM_THRESHOLD = 2**30  # free memory at the heap's top kept for reuse, up to this much

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
SWITCH = "SMOLLM_KEEP_FREED_MEMORY"  # "0": leave malloc as it is

_state: str | None = None  # why the first call did what it did (the later calls repeat it)


def keep_freed_memory() -> str:
    """Ask glibc's malloc to serve big blocks from its heap and keep freed ones (see the module
    docstring). Returns what happened, one line: "kept" when the thresholds are set (by this call or
    an earlier one), else why malloc was left alone. Idempotent."""
    global _state
    if _state is None:
        _state = _apply()
    return _state


def _apply() -> str:
    if os.environ.get(SWITCH, "1").strip() == "0":
        return f"left alone: {SWITCH}=0"
    chosen = [name for name in _GLIBC_VARIABLES if name in os.environ]
    if chosen:
        return f"left alone: {', '.join(chosen)} set in the environment"
    preloaded = os.environ.get("LD_PRELOAD", "")
    other = [name for name in _OTHER_ALLOCATORS if name in preloaded]
    if other:
        return f"left alone: {other[0]} is preloaded (LD_PRELOAD)"
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except OSError as e:
        return f"left alone: no C library to ask ({e})"
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return "left alone: the C library is not glibc"
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 for a value it refuses (an older glibc caps the mmap threshold)
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "left alone: glibc refused the thresholds"
    return "kept"
