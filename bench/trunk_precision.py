"""What a lower-precision frozen trunk would do: its speed, and the held-out figures.

    python -m bench.trunk_precision                  # native and AVX2-emulated: fp32, bf16, int8
    python -m bench.trunk_precision --isa avx2 --pairs 64 --reps 1

The default run freezes the first 25 of SmolLM2-135M-Instruct's 30 blocks. Policy and
reference share them, and they are most of the compute: every training step and every
held-out evaluation runs them forward, without a gradient. On a CPU without native bf16 they
run in fp32. This measures, on the real model and the default run's held-out pairs, what the
trunk's forward would cost in three precisions, and what each would do to the numbers the run
reports:

* fp32: what an AVX2 CPU runs today;
* bf16: the trunk under bf16 autocast (bf16 weights and matmuls, fp32 residual stream);
* int8: PyTorch's dynamic quantization of the trunk's Linear layers
  (`torch.ao.quantization.quantize_dynamic`, weights int8 per output channel, activations
  quantized per tensor at each call, int32 accumulation), on oneDNN's kernels so that
  `ONEDNN_MAX_CPU_ISA=AVX2` holds them to AVX2 (fbgemm, PyTorch's other int8 backend, picks
  its instruction set itself, and on this AVX-512 machine would not show an AVX2 CPU's speed).

In each precision the 5-block tail and the head stay fp32, as the run's trainable part. The
figures: the trunk's forward time over the held-out pairs (packed, batches of 8 pairs as the
run evaluates them; the median of --reps), and against fp32, the reference's per-token mean
log-probs of the chosen and rejected answers (the largest and the mean difference), its
held-out preference accuracy, and the pairs whose preference flips.

Each instruction set runs in its own child process (see bench.generate_speed).
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

from bench import add_per_isa_arguments, cpu_description, cpu_line, emit, load_average, median, run_per_isa

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PRECISIONS = ("fp32", "bf16", "int8")


def int8_trunk(model, k: int):
    """A copy of `model` whose blocks [0, k) have dynamically quantized int8 Linear layers."""
    import torch
    from torch import nn

    torch.backends.quantized.engine = "onednn"
    q = copy.deepcopy(model)
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
        warnings.simplefilter("ignore")
        for i in range(k):
            q.model.layers[i] = torch.ao.quantization.quantize_dynamic(
                q.model.layers[i], {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                dtype=torch.qint8)
    return q


def child(args) -> None:
    import torch

    from dpo.config import TrainConfig
    from dpo.engine import head_logps
    from dpo.tokenization import collate_pairs
    from dpo.train import prepare_data
    from smollm import load_pretrained, load_tokenizer

    torch.set_num_threads(args.threads)
    model = load_pretrained(MODEL).eval()
    tokenizer = load_tokenizer(MODEL)
    config = TrainConfig()
    _, eval_pairs, _ = prepare_data(config, tokenizer, model.config)
    eval_pairs = eval_pairs[:args.pairs]
    k = model.config.num_hidden_layers - config.train_last_n
    batches = [collate_pairs(eval_pairs[s:s + 8], tokenizer.pad_token_id) for s in range(0, len(eval_pairs), 8)]
    trunks = {"fp32": model, "bf16": model, "int8": int8_trunk(model, k)}

    def trunk(name, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            return trunks[name].hidden_states(b["input_ids"], b["attention_mask"], end=k).float()  # [2B, T, C]

    result = {"isa": args.isa[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "pairs": len(eval_pairs), "trunk_blocks": k, "precisions": {}}
    with torch.no_grad():
        for name in PRECISIONS:
            for b in batches[:1]:
                trunk(name, b)  # warm-up: first-call allocations, kernel generation
            times, loads = [], []
            for _ in range(args.reps):
                loads.append(load_average())
                start = time.perf_counter()
                states = [trunk(name, b) for b in batches]
                times.append(time.perf_counter() - start)
            logps = []
            for b, h in zip(batches, states):
                hidden = model.hidden_states(b["input_ids"], b["attention_mask"], start=k, x=h)  # [2B, T, C]
                lp = head_logps(model.lm_head, hidden, b["input_ids"], b["response_mask"], "mean")  # [2B]
                B = lp.shape[0] // 2
                logps.append(torch.stack([lp[:B], lp[B:]]))  # [2, B]: chosen, rejected
            result["precisions"][name] = {"trunk_s": times, "load": median(loads),
                                          "logps": torch.cat(logps, dim=1).tolist()}
    emit(result)


def report(cpu: dict, results: list[dict]) -> str:
    import torch

    lines = [cpu_line(cpu),
             "", "| kernels | trunk | trunk forward (s) | speed-up | accuracy | flips | max abs diff | mean abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = torch.tensor(r["precisions"]["fp32"]["logps"])
        t0 = median(r["precisions"]["fp32"]["trunk_s"])
        for name, m in r["precisions"].items():
            lp = torch.tensor(m["logps"])  # [2, N]
            diff = (lp - base).abs()
            flips = int(((lp[0] > lp[1]) != (base[0] > base[1])).sum())
            t = median(m["trunk_s"])
            lines.append(f"| {r['isa']} ({r['cpu_capability']}) | {name} | {t:.1f} | {t0 / t:.2f}x | "
                         f"{(lp[0] > lp[1]).float().mean():.1%} | {flips} of {lp.shape[1]} | {diff.max():.4f} | "
                         f"{diff.mean():.4f} |")
    r = results[0]
    lines.append(f"\n{r['pairs']} held-out pairs of the default run, the first {r['trunk_blocks']} blocks; "
                 "log-probs are per-token means (nats) of the reference model, whose tail and head stay fp32.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=200, help="held-out pairs (the default run has 200)")
    add_per_isa_arguments(p)
    args = p.parse_args(argv)
    if args.pairs < 1 or args.reps < 1 or args.threads < 1:
        p.error("--pairs, --reps and --threads must be positive")
    if args.child:
        child(args)
        return 0
    flags = ["--pairs", str(args.pairs), "--reps", str(args.reps)]
    print(report(cpu_description(), run_per_isa("bench.trunk_precision", args.isa, args.threads, flags)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
