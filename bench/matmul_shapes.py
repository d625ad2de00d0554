"""One decoding step's matmuls, shape by shape: which kernel and weight layout multiplies fastest.

    python -m bench.matmul_shapes                      # batch 1 and 16, native + AVX2-emulated
    python -m bench.matmul_shapes --batch-sizes 1 --isa avx2

A decoding step of SmolLM-135M multiplies B rows (one per sequence) by 4 matrices per block, as
`smollm.onednn` stacks them (q/k/v [960, 576], o [576, 576], gate/up [3072, 576], down
[576, 1536]), and once by the LM head [49152, 576]. For each shape and each way of computing it,
this prints the time per call and the rate (GB/s of weights at one row, where reading them bounds
the step; GFLOP/s otherwise), and the sum over a step (30 blocks + the head):

* `F.linear`: MKL, what transformers' `generate` runs;
* oneDNN with the weight read in place;
* oneDNN with the weight copied into its blocked layout for 1, 2 and B rows
  (`torch.ops.mkldnn._reorder_linear_weight`; `smollm.onednn.packed_weight` uses max(B, 2)).

Thirty different random matrices of each block shape are multiplied in turn (as the 30 blocks
are), so they do not all stay in cache; the head is one matrix of 113 MB. Random weights: the
timings do not depend on the values. Each instruction set runs in its own process (`bench.run_per_isa`).
"""
from __future__ import annotations

import argparse

from bench import cpu_description, cpu_line, emit, per_call_ms, run_per_isa

SHAPES = {"q/k/v": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
BLOCKS = 30


def child(args) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    linear = torch.ops.mkldnn._linear_pointwise
    result = {"isa": args.isa[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(), "batches": {}}
    for B in args.batch_sizes:
        rows = {}
        for name, (N, K) in SHAPES.items():
            copies = 1 if name == "head" else BLOCKS
            weights = [torch.randn(N, K) for _ in range(copies)]
            x = torch.randn(B, K)
            ways = {"F.linear (MKL)": (F.linear, weights), "oneDNN, in place": (None, weights)}
            for layout in sorted({1, 2, B}):
                ways[f"oneDNN, packed for {layout}"] = (
                    None, [torch.ops.mkldnn._reorder_linear_weight(w, batch_size=layout) for w in weights])
            rows[name] = {}
            for way, (fn, ws) in ways.items():
                call = (lambda ws=ws: [F.linear(x, w) for w in ws]) if fn is F.linear else \
                    (lambda ws=ws: [linear(x, w, None, "none", [], "") for w in ws])
                s = per_call_ms(call, args.reps if name != "head" else 3 * args.reps) / 1e3 / copies
                rows[name][way] = {"ms": s * 1e3, "gb_s": N * K * 4 / s / 1e9, "gflop_s": 2 * B * N * K / s / 1e9}
        result["batches"][str(B)] = rows
    emit(result)


def report(cpu: dict, results: list[dict], threads: int) -> str:
    lines = [f"{cpu_line(cpu)}; torch threads {threads}; ms per call (GB/s of weights at batch 1, GFLOP/s above)"]
    for r in results:
        for B, rows in r["batches"].items():
            ways = list(next(iter(rows.values())))
            unit = "gb_s" if B == "1" else "gflop_s"
            lines += ["", f"**{r['isa']} ({r['cpu_capability']}), batch {B}**", "",
                      "| matrix | " + " | ".join(ways) + " |", "|---|" + "---|" * len(ways)]
            for name, by_way in rows.items():
                lines.append(f"| {name} | " + " | ".join(
                    f"{by_way[w]['ms']:.3f} ({by_way[w][unit]:.0f})" for w in ways) + " |")
            step = {w: sum(by_way[w]["ms"] * (1 if name == "head" else BLOCKS) for name, by_way in rows.items())
                    for w in ways}
            lines.append("| **a step (30 blocks + head)** | " + " | ".join(f"**{step[w]:.1f}**" for w in ways) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10, help="passes over the 30 matrices of a shape (the head: 3x)")
    p.add_argument("--isa", nargs="+", default=["native", "avx2"], choices=["native", "avx2"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    flags = ["--batch-sizes", *map(str, args.batch_sizes), "--reps", str(args.reps)]
    results = run_per_isa("bench.matmul_shapes", args.isa, args.threads, flags)
    print(report(cpu_description(), results, args.threads))


if __name__ == "__main__":
    main()
