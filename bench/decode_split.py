"""Where one greedy decoding step's time goes at batch 1: the matmuls alone against the whole step.

    python -m bench.decode_split                # 2 threads, the real SmolLM2-135M-Instruct in fp32
    python -m bench.decode_split --threads 1

A decoding step at one row reads every weight once (538 MB in fp32 for SmolLM-135M, the tied
LM head included), so it is bound by memory. This prints:

* the memory's read speed (a sum over 1 GiB), the bound;
* the step's matmuls alone, in the order a step makes them: each Linear separately (211 calls),
  and with q, k, v and gate, up stacked as `smollm.onednn.OneDNNFused` makes them (121 calls),
  both packed as `generate` packs them at batch 1 (`smollm.onednn.packed_weight`);
* the whole step inside `smollm.generate` (128 new tokens after a 40-token prompt, best of 3).

The difference between the last two is what the step spends outside the matmuls (norms, rotary,
the KV cache, attention, Python).
"""
from __future__ import annotations

import argparse
import os

from bench import cpu_description, cpu_line, per_call_ms

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30, help="repetitions of the matmul passes")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("SMOLLM_OFFLINE", "1")
    from smollm import generate, load_pretrained
    from smollm.onednn import OneDNNFused, OneDNNLinear, available

    if not available():
        raise SystemExit("oneDNN's linear op or an x86 AVX2 CPU is missing: nothing to split")
    model = load_pretrained(MODEL).eval()
    C, I = model.config.hidden_size, model.config.intermediate_size
    with torch.inference_mode():
        x_c, x_i = torch.randn(1, 1, C), torch.randn(1, 1, I)  # one row, as a decoding step
        big = torch.randn(256 * 1024 * 1024 // 4)  # 1 GiB
        gbps = big.numel() * 4 / per_call_ms(lambda: big.sum(), 5) / 1e6
        separate, stacked = [], []
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            separate += [(OneDNNLinear(a.q_proj), x_c), (OneDNNLinear(a.k_proj), x_c), (OneDNNLinear(a.v_proj), x_c),
                         (OneDNNLinear(a.o_proj), x_c), (OneDNNLinear(m.gate_proj), x_c),
                         (OneDNNLinear(m.up_proj), x_c), (OneDNNLinear(m.down_proj), x_i)]
            stacked += [(OneDNNFused([a.q_proj, a.k_proj, a.v_proj]), x_c), (OneDNNLinear(a.o_proj), x_c),
                        (OneDNNFused([m.gate_proj, m.up_proj]), x_c), (OneDNNLinear(m.down_proj), x_i)]
        head = (OneDNNLinear(model.lm_head), x_c)
        separate.append(head)
        stacked.append(head)
        megabytes = sum(p.numel() for n, p in model.named_parameters() if "norm" not in n) * 4 / 1e6
        ms_separate = per_call_ms(lambda: [f(x) for f, x in separate], args.reps)
        ms_stacked = per_call_ms(lambda: [f(x) for f, x in stacked], args.reps)
        prompt = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
        generate(model, prompt, 8)
        best = min(per_call_ms(lambda: generate(model, prompt, 128), 1) for _ in range(3)) / 128
    print(f"{cpu_line(cpu_description())}; torch threads {args.threads}; batch 1, fp32")
    print(f"memory read (sum over 1 GiB): {gbps:.1f} GB/s; the weights a step reads: {megabytes:.0f} MB "
          f"(bound: {megabytes / gbps:.1f} ms a step)")
    print("| part of one decoding step | ms | weights read at |\n|---|---|---|")
    print(f"| the {len(separate)} matmuls, each Linear separately | {ms_separate:.1f} | {megabytes / ms_separate:.0f} GB/s |")
    print(f"| the {len(stacked)} matmuls, q/k/v and gate/up stacked | {ms_stacked:.1f} | {megabytes / ms_stacked:.0f} GB/s |")
    print(f"| the whole step in smollm.generate ({1e3 / best:.1f} tok/s) | {best:.1f} | |")
    print(f"outside the matmuls: about {best - ms_stacked:.1f} ms a step")


if __name__ == "__main__":
    main()
