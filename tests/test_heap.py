"""smollm.heap: big CPU tensors reuse freed memory instead of fresh pages, when asked, and only then.

What is checked is what the process's memory does. A 160 MiB tensor is freed, then a 128 MiB one is
made: with the call it takes the freed pages (no page fault, RSS unchanged); without it, or when the
user's environment or allocator decides, glibc has given the pages back, and the new tensor
faults in 32,768 fresh ones. (The second tensor is smaller: PyTorch aligns its blocks to 64 bytes,
and a block of exactly the size just freed does not fit glibc's aligned request in that hole.)
Each case runs in a fresh interpreter: mallopt changes the whole process, and the test process's
own allocator is left as it is.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smollm import heap

REPO = Path(__file__).resolve().parents[1]
PAGES = 32 * 2**20 * 4 // 4096  # 4 KiB pages of the 128 MiB tensor: 32,768


def _on_glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):  # a C library that does not know the name: not glibc
        return False


glibc = pytest.mark.skipif(not _on_glibc(), reason="mallopt is glibc's: the memory checks need Linux with glibc")

PROBE = """
import json, resource, sys
import torch
from smollm.heap import keep_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

state = keep_freed_memory() if sys.argv[1] == "call" else "not called"
x = torch.ones(40 * 2**20)  # 160 MiB, every page touched
with_tensor = rss_mb()
del x
after_free = rss_mb()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(32 * 2**20)  # 128 MiB
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps(dict(state=state, with_tensor=with_tensor, after_free=after_free, again=rss_mb(), faults=faults)))
"""


def clean_env(**env: str) -> dict[str, str]:
    """This environment without glibc's malloc variables or the switch, plus `env`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != heap.SWITCH}, **env}


def probe(call: bool, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, "call" if call else "no"], cwd=REPO, env=clean_env(**env),
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_tensors_stay_with_the_process_and_the_next_one_takes_them():
    r = probe(call=True)
    assert r["state"] == "kept"
    assert r["after_free"] > r["with_tensor"] - 16  # the 160 MiB stayed (a few MB of slack)
    assert r["faults"] < PAGES / 100  # the next tensor took those pages, not fresh ones
    assert r["again"] < r["after_free"] + 16


def assert_glibcs_own_behaviour(r: dict) -> None:
    assert r["after_free"] < r["with_tensor"] - 100  # unmapped when freed
    assert r["faults"] >= PAGES  # so the next tensor faults in every page


@glibc
def test_without_the_call_glibc_gives_a_big_tensor_back():
    assert_glibcs_own_behaviour(probe(call=False))


@glibc
@pytest.mark.parametrize("env, why", [
    ({heap.SWITCH: "0"}, f"{heap.SWITCH}=0"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_ set in the environment"),
])
def test_the_switch_and_the_users_own_settings_leave_malloc_alone(env, why):
    r = probe(call=True, **env)
    assert r["state"] == f"left alone: {why}"
    assert_glibcs_own_behaviour(r)


def test_another_allocator_is_left_alone(monkeypatch):
    # _apply returns before any mallopt here, so this runs in the test process itself
    monkeypatch.delenv(heap.SWITCH, raising=False)
    for name in heap._GLIBC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert heap._apply() == "left alone: jemalloc is preloaded (LD_PRELOAD)"


@glibc
def test_the_training_commands_ask_for_it():
    # dpo.cli.main with a run that does nothing: the heap's state afterwards, in a fresh process
    code = ("from dpo import cli; from dpo.config import TrainConfig; from smollm import heap\n"
            "assert heap._state is None\n"
            "rc = cli.main(lambda config: None, TrainConfig, 'dpo.train', 'test', ['--output-dir', 'unused'])\n"
            "print(rc, heap._state)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "kept"]
