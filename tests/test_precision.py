"""dpo.precision: which dtype a run computes in, and the native-bf16 detection behind the CPU default."""
from __future__ import annotations

from pathlib import Path

import torch

from dpo import precision
from dpo.config import TrainConfig
from dpo.precision import autocast_dtype_for, cpuinfo_has_bf16, precision_note

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw avx512vl avx512_bf16 clzero
"""
OLD_XEON = "flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512vl\n"
SAPPHIRE = "flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm\n"
GRAVITON2 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp\n"


def test_cpuinfo_flags_that_mean_native_bf16():
    assert cpuinfo_has_bf16(EPYC) and cpuinfo_has_bf16(SAPPHIRE) and cpuinfo_has_bf16(GRAVITON3)
    assert not cpuinfo_has_bf16(OLD_XEON) and not cpuinfo_has_bf16(GRAVITON2) and not cpuinfo_has_bf16("")
    assert not cpuinfo_has_bf16("model name\t: bf16 avx512_bf16 in a name is not a flag\n")


def test_default_dtype_follows_the_hardware_and_dtype_wins(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
        assert autocast_dtype_for(TrainConfig(), cpu) == (torch.bfloat16 if native else None)
        assert autocast_dtype_for(TrainConfig(dtype="float32"), cpu) is None
        assert autocast_dtype_for(TrainConfig(dtype="bfloat16"), cpu) == torch.bfloat16
        assert autocast_dtype_for(TrainConfig(), cuda) == torch.bfloat16
        assert autocast_dtype_for(TrainConfig(dtype="float32"), cuda) is None
    assert "natively" in precision_note(None, torch.bfloat16, cpu)
    assert "no native bf16" in precision_note(None, None, cpu) and "--dtype bfloat16" in precision_note(None, None, cpu)
    assert "--dtype float32" in precision_note("float32", None, cpu)


def test_an_aten_limited_to_avx2_computes_in_fp32_by_default():
    """ATEN_CPU_CAPABILITY=avx2 (an AVX2-only CPU, or its emulation) has no bf16 kernels to use."""
    import os
    import subprocess
    import sys

    code = ("import torch; from dpo.precision import cpu_native_bf16, default_dtype_name; "
            "print(cpu_native_bf16(), default_dtype_name(torch.device('cpu')))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "float32"], out.stderr
