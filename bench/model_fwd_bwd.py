"""Model forward + backward: `smollm.SmolLM` vs transformers' LlamaForCausalLM (sdpa).

    python -m bench.model_fwd_bwd                   # CPU, fp32, batch 8 x 512, 5 reps
    python -m bench.model_fwd_bwd --reps 1 --layers 4 --seq 128    # a quick check
    python -m bench.model_fwd_bwd --device cuda     # bf16 autocast, tokens/s and TFLOP/s

Full fine-tuning (every parameter trains, the head tied to the embedding in both), the same
random SmolLM-135M checkpoint (saved once by `smollm.save_pretrained`, loaded by each
library), the same random tokens, no padding. One repetition = logits -> next-token
cross-entropy (the same code on both logits) -> backward, gradients then dropped. Both
models live in one process and run alternately (ours, theirs, ours, ...) after `--warmup`
untimed passes each; times are medians. The losses are compared as a sanity check.
Model FLOPs: 6 * N * tokens (2N forward + 4N backward, N = matmul parameters).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from bench import DEFAULT_WORKDIR, load_average, machine, median, random_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_fwd_bwd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="fewer blocks than 30 (quick checks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on CPU, bf16 autocast on CUDA")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from smollm import load_pretrained

    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    ckpt = random_checkpoint(Path(args.workdir), args.layers)
    ours = load_pretrained(ckpt, device=device).train()
    theirs = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").to(device).train()
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    n_matmul = sum(p.numel() for p in ours.parameters() if p.ndim == 2)  # tied: embedding counted once
    flops = 6 * n_matmul * ids.numel()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def once(model, hf: bool) -> tuple[float, float]:
        sync()
        start = time.perf_counter()
        with autocast:
            logits = model(ids).logits if hf else model(ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        sync()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed, loss.item()

    times = {"ours": [], "transformers": []}
    losses = {}
    for name, model in (("ours", ours), ("transformers", theirs)):
        for _ in range(args.warmup):
            losses[name] = once(model, name == "transformers")[1]
    load = [load_average()]
    for rep in range(args.reps):
        order = [("ours", ours), ("transformers", theirs)]
        if rep % 2:
            order.reverse()  # alternate who goes first
        for name, model in order:
            t, losses[name] = once(model, name == "transformers")
            times[name].append(t)
        load.append(load_average())
        print(f"rep {rep + 1}/{args.reps}: ours {times['ours'][-1]:.2f} s, transformers {times['transformers'][-1]:.2f} s"
              f" (load avg {load[-1]:.2f})", flush=True)
    tokens = ids.numel()
    summary = {name: {"median_s": median(ts), "all_s": ts, "tokens_per_s": tokens / median(ts),
                      "tflops": flops / median(ts) / 1e12, "loss": losses[name]} for name, ts in times.items()}
    summary["ratio"] = summary["ours"]["median_s"] / summary["transformers"]["median_s"]
    print(f"{args.batch} x {args.seq} tokens, {ours.config.num_hidden_layers} blocks, full fine-tuning, "
          f"{device.type} {dtype}; loss ours {losses['ours']:.6f} / transformers {losses['transformers']:.6f}")
    for name in ("ours", "transformers"):
        s = summary[name]
        print(f"{name:<13} fwd+bwd {s['median_s']:.2f} s  {s['tokens_per_s']:.0f} tokens/s  {s['tflops']:.3f} TFLOP/s")
    print(f"ratio ours/transformers: {summary['ratio']:.3f} (target <= 1.0)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine(), "load": load,
                                               "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
