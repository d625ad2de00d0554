"""A DPO step at a bigger SmolLM's config (random weights): peak memory per rank and tokens/s, for
one process, data parallelism, or FSDP, with or without activation checkpointing.

    python -m bench.big_step --preset smollm2-360m                          # one process
    torchrun --nproc_per_node 2 -m bench.big_step --preset smollm2-360m     # 2 ranks, model replicated
    torchrun --nproc_per_node 2 -m bench.big_step --preset smollm2-360m --fsdp
    torchrun --nproc_per_node 1 -m bench.big_step --device cuda --fsdp --no-recompute   # a GPU

The model is the preset's network with random weights (`smollm.PRESETS`: the published config,
no download), trained as asked by --mode: `full` (every block, the head and the tied embedding,
against a frozen copy), `last-5`, or `lora` (r 16 on every linear of every block). The data are
real HH-RLHF pairs tokenized to --max-length (global batch --batch-size). After --warmup steps,
--steps steps are timed. Each rank reports its peak RSS (everything the process held, model
building included), its RSS once the models are built and sharded and again after the steps,
and on CUDA torch's peak allocated memory; rank 0 prints one JSON line with all of them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-360m")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (a quick check)")
    p.add_argument("--mode", default="full", choices=["full", "last-5", "lora"])
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--no-recompute", action="store_true", help="keep the trainable blocks' activations")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from bench import peak_rss_mb, real_pairs, rss_mb
    from dpo import distributed
    from dpo.config import TrainConfig
    from dpo.policy import make_reference, make_trainable
    from dpo.trainer import DPOTrainer
    from smollm import PRESETS, SmolLM
    from smollm.lora import TARGETS, LoRAConfig

    d = distributed.init_from_env(torch.device(args.device).type)
    device = torch.device("cuda", d.local_rank) if args.device == "cuda" else torch.device(args.device)
    config = PRESETS[args.preset]
    if args.layers:
        import dataclasses

        config = dataclasses.replace(config, num_hidden_layers=args.layers)
    pairs, tok = real_pairs(args.batch_size * (args.warmup + args.steps), args.max_length)
    torch.manual_seed(0)
    with torch.device(device):
        policy = SmolLM(config)
    lora = LoRAConfig(r=16, alpha=32.0, targets=list(TARGETS[:-1])) if args.mode == "lora" else None
    n = config.num_hidden_layers
    make_trainable(policy, lora, train_last_n=n if args.mode == "full" else min(5, n) if args.mode == "last-5" else 0,
                   train_head=args.mode == "full")
    reference = make_reference(policy, lora)
    if args.fsdp:
        distributed.shard_blocks(policy, reference, device)
    settings = TrainConfig(batch_size=args.batch_size, max_steps=args.warmup + args.steps, max_length=args.max_length,
                           dtype=args.dtype, recompute_tail=not args.no_recompute, seed=0).check()
    trainer = DPOTrainer(policy, reference, pairs, settings, pad_token_id=tok.pad_token_id, device=device)
    setup_rss = rss_mb()  # the models built (and sharded): what every step starts from
    for _ in range(args.warmup):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    d.barrier()
    start = time.perf_counter()
    tokens = sum(trainer.train_step()["tokens"] for _ in range(args.steps))
    seconds = (time.perf_counter() - start) / args.steps
    mine = torch.tensor([peak_rss_mb(), torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0,
                         setup_rss, rss_mb()])
    mine = mine.to(d.comm_device)  # NCCL gathers CUDA tensors, gloo CPU ones
    everyone = [mine.clone() for _ in range(d.world_size)]
    if d.enabled:
        import torch.distributed as dist

        dist.all_gather(everyone, mine)  # [R] of [4]: every rank's figures
    if d.is_main:
        print(json.dumps({
            "preset": args.preset, "layers": config.num_hidden_layers, "mode": args.mode, "ranks": d.world_size, "fsdp": args.fsdp,
            "recompute": not args.no_recompute, "device": str(device), "dtype": str(trainer.autocast_dtype or "float32"),
            "batch_size": args.batch_size, "max_length": args.max_length, "seconds_per_step": round(seconds, 3),
            "tokens_per_s": round(tokens / args.steps / seconds, 1),
            "trainable": sum(p.numel() for p in trainer.trainable), "parameters": policy.num_parameters(),
            "peak_rss_mb_per_rank": [round(float(t[0]), 1) for t in everyone],
            "cuda_peak_mb_per_rank": [round(float(t[1]), 1) for t in everyone],
            "rss_after_setup_mb_per_rank": [round(float(t[2]), 1) for t in everyone],
            "rss_after_steps_mb_per_rank": [round(float(t[3]), 1) for t in everyone]}), flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
