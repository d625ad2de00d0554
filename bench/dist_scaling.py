"""DPO steps on 1 and 2 ranks of a torchrun job on this CPU: steps/s, and what the gradient
all-reduce costs per step against its bytes.

    python -m bench.dist_scaling                    # last-5 blocks and full fine-tuning, 2 ranks at most
    python -m bench.dist_scaling --modes full --steps 3 --max-length 256

The same work in every run: a random SmolLM-135M at the real config, the same real HH-RLHF
pairs ((--steps + 1) x 8: global batch 8, max length 512), the default precision (bf16 autocast where the CPU has
it), 1 warm-up step then --steps timed steps. Each rank takes 1/R of every batch (dpo.distributed),
so every run computes the same updates. Three layouts of the same cores:

* 1 rank, all threads: torch's intra-op parallelism over every core (the single-process default);
* R ranks, threads / R each: data parallelism over the same cores;
* 1 rank, threads / R: one rank's share of the machine, for the scaling efficiency.

Per step, each rank reports the time inside `Distributed.sum_gradients` (the all-reduce of the
trainable gradients, flattened: one buffer per dtype) and its bytes; the table divides one by
the other. The rest of a 2-rank step is each rank's half of the forward and backward.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import DEFAULT_WORKDIR, load_average, machine, median, random_checkpoint, real_pairs  # noqa: E402


# ------------------------------------------------------------------ a rank
def worker(args) -> None:
    import torch

    from dpo import distributed
    from dpo.config import TrainConfig
    from dpo.policy import make_reference, make_trainable
    from dpo.tokenization import TokenizedPair
    from dpo.trainer import DPOTrainer
    from smollm import load_pretrained

    torch.set_num_threads(args.threads)
    spec = json.loads(Path(args.spec).read_text())
    d = distributed.init_from_env("cpu")

    class Timed(distributed.Distributed):
        """The job, with the time and bytes of each gradient all-reduce recorded."""

        def sum_gradients(self, params):
            start = time.perf_counter()
            super().sum_gradients(params)
            ALLREDUCE.append((time.perf_counter() - start,
                              sum(p.numel() * p.element_size() for p in params)))

    ALLREDUCE: list[tuple[float, int]] = []
    timed = Timed(d.rank, d.world_size, d.local_rank, d.backend)
    pairs = [TokenizedPair(**p) for p in spec["pairs"]]
    policy = load_pretrained(spec["checkpoint"])
    n = policy.config.num_hidden_layers
    make_trainable(policy, None, train_last_n=n if args.mode == "full" else 5, train_head=args.mode == "full")
    reference = make_reference(policy, None)
    config = TrainConfig(batch_size=spec["batch_size"], max_steps=args.steps + 1, max_length=spec["max_length"],
                         lr=1e-4, seed=0).check()
    trainer = DPOTrainer(policy, reference, pairs, config, pad_token_id=spec["pad_token_id"], dist=timed)
    trainer.train_step()  # warm-up
    ALLREDUCE.clear()
    timed.barrier()
    start = time.perf_counter()
    rows = [trainer.train_step() for _ in range(args.steps)]
    seconds = time.perf_counter() - start
    if d.is_main:
        print(json.dumps({
            "ranks": d.world_size, "threads": args.threads, "mode": args.mode, "steps": args.steps,
            "seconds_per_step": seconds / args.steps, "loss": [r["loss"] for r in rows],
            "allreduce_seconds": median([s for s, _ in ALLREDUCE]) if ALLREDUCE else 0.0,
            "allreduce_bytes": ALLREDUCE[0][1] if ALLREDUCE else 0,
            "trainable": sum(p.numel() for p in trainer.trainable),
            "tokens_per_step": rows[-1]["tokens"]}), flush=True)
    distributed.shutdown()


# ------------------------------------------------------------------ the parent
def launch(ranks: int, threads: int, mode: str, args, spec: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    own = [str(Path(__file__).resolve()), "--worker", "--spec", str(spec), "--mode", mode,
           "--threads", str(threads), "--steps", str(args.steps)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *own]
           if ranks > 1 else [sys.executable, *own])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["last-5", "full"], choices=["last-5", "full"])
    p.add_argument("--ranks", type=int, default=2, help="the most ranks (default 2)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import dataclasses

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pairs, tok = real_pairs(args.batch_size * (args.steps + 1), args.max_length)  # one epoch: warm-up + steps
    spec = workdir / "dist_scaling_spec.json"
    spec.write_text(json.dumps({"checkpoint": str(random_checkpoint(workdir)), "batch_size": args.batch_size,
                                "max_length": args.max_length, "pad_token_id": tok.pad_token_id,
                                "pairs": [dataclasses.asdict(p) for p in pairs]}))
    cores = os.cpu_count() or 1
    info = machine()
    print(f"# {info}\n# load average before: {load_average():.2f}\n")
    print(f"{'mode':<7} {'ranks x threads':>15} {'s/step':>8} {'steps/s':>8} {'vs 1 x ' + str(cores):>9} "
          f"{'all-reduce':>11} {'MB':>7} {'GB/s':>6} {'share':>6}")
    results = []
    for mode in args.modes:
        layouts = [(1, cores), (args.ranks, max(1, cores // args.ranks)), (1, max(1, cores // args.ranks))]
        base = None
        for ranks, threads in layouts:
            r = launch(ranks, threads, mode, args, spec)
            results.append(r)
            base = base or r["seconds_per_step"]
            ar, mb = r["allreduce_seconds"], r["allreduce_bytes"] / 1e6
            print(f"{mode:<7} {f'{ranks} x {threads}':>15} {r['seconds_per_step']:>8.2f} "
                  f"{1 / r['seconds_per_step']:>8.3f} {base / r['seconds_per_step']:>8.2f}x "
                  f"{ar * 1e3:>9.1f}ms {mb:>7.1f} {mb / 1e3 / ar if ar else 0:>6.2f} "
                  f"{ar / r['seconds_per_step'] if ar else 0:>6.1%}", flush=True)
    same = {m: [r["loss"] for r in results if r["mode"] == m] for m in args.modes}
    for mode, losses in same.items():
        spread = max(abs(a - b) for run in losses[1:] for a, b in zip(run, losses[0]))
        print(f"# {mode}: largest loss difference between the layouts {spread:.2e} (the same updates)")
    print(f"# load average after: {load_average():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
