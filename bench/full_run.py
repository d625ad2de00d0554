"""A whole training run from a cold process: `python -m dpo.train` vs an equivalent TRL script.

    python -m bench.full_run                  # 16 train + 16 eval pairs, 2 steps, 3 reps each
    python -m bench.full_run --reps 1 --device cuda

Both runs start a fresh Python process and do the whole job: import, load the data file,
tokenize, load the model (the same random SmolLM-135M checkpoint) and a reference, freeze
all but the last 5 blocks, evaluate on the held-out pairs, train 2 steps of 8 pairs,
evaluate again, save the final model. Wall time is the process's, seen from outside.
They alternate (ours, trl, ours, ...); medians count.

Inputs: 32 real HH-RLHF test pairs that pass our NLTK strong-preference filter (chosen once
here), written as a prompt/chosen/rejected JSONL file. Ours runs its full pipeline on it
(with `--no-filter --loss-type sigmoid`, since the pairs are filtered already and TRL's loss is
DPO's, and today's other defaults, the rejected end-of-turn token masked): a 16/16
train/eval split, evaluations with health samples at the start and the end (a run under 5
steps evaluates nowhere in between), checkpoint + final model + eval.json + curves.png.
Peak memory: ours from its eval.json (getrusage), TRL's from getrusage in its child. The TRL script has no filter; it trains on the first 16 and
evaluates on the last 16 with `DPOTrainer.evaluate()` (policy and reference forward, as
ours), saves the final model, and freezes like bench.dpo_step (embedding + first 25
blocks; its head stays tied and frozen). Both at beta 0.8, lr 1e-4, weight decay 1e-2,
max length 512.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench import DEFAULT_WORKDIR, HH_FILES, NLTK_DATA, emit, machine, median, peak_rss_mb, random_checkpoint, run_child


def prepare(workdir: Path, n: int) -> Path:
    """n real pairs that our filter keeps, as prompt/chosen/rejected JSONL."""
    import os
    import random

    os.environ.setdefault("NLTK_DATA", str(NLTK_DATA))
    from dpo.data import load_preferences
    from dpo.filtering import filter_pairs

    path = workdir / f"full_run_pairs_{n}.jsonl"
    if path.is_file():
        return path
    pairs = load_preferences([str(f) for f in HH_FILES], skip_bad_records=True)
    random.Random(0).shuffle(pairs)
    kept, _ = filter_pairs(pairs, limit=n)
    with open(path, "w") as f:
        for p in kept[:n]:
            f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


def ours_command(ckpt: Path, data: Path, out: Path, args) -> list[str]:
    return ["dpo.train", "--model", str(ckpt), "--data", str(data), "--num-pairs", str(args.train_pairs),
            "--eval-pairs", str(args.eval_pairs), "--max-steps", str(args.steps), "--batch-size", "8",
            "--no-filter", "--loss-type", "sigmoid",  # the pairs are filtered already; DPO's loss, as TRL's
            "--output-dir", str(out), "--overwrite", "--no-progress", "--device", args.device]


def run_trl(a) -> dict:
    """The TRL side, in a child process: everything from the imports on is inside the measured time."""
    start = time.perf_counter()
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cuda = a.device == "cuda"
    data = load_dataset("json", data_files=a.data, split="train")
    train, evals = data.select(range(a.train_pairs)), data.select(range(a.train_pairs, a.train_pairs + a.eval_pairs))
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model.get_input_embeddings().weight.requires_grad_(False)
    for layer in model.model.layers[:model.config.num_hidden_layers - 5]:
        layer.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    config = DPOConfig(output_dir=a.out, beta=0.8, learning_rate=1e-4, weight_decay=1e-2, max_length=512,
                       per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=a.steps,
                       logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none",
                       disable_tqdm=True, bf16=cuda, use_cpu=not cuda, seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, eval_dataset=evals, processing_class=tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(a.out)
    return {"side": "trl", "inside_s": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
            "eval_before": before.get("eval_rewards/accuracies"), "eval_after": after.get("eval_rewards/accuracies")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.full_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train-pairs", type=int, default=16)
    p.add_argument("--eval-pairs", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=None, help="fewer blocks than 30 (quick checks)")
    p.add_argument("--sides", default="ours,trl")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--json", default=None)
    p.add_argument("--child-trl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_trl:
        emit(run_trl(args))
        return 0

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = random_checkpoint(workdir, args.layers)
    data = prepare(workdir, args.train_pairs + args.eval_pairs)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    print(f"machine: {json.dumps(machine())}\ndata: {data} ({args.train_pairs} train + {args.eval_pairs} eval pairs), "
          f"{args.steps} steps of 8 pairs, device {args.device}", flush=True)
    walls: dict[str, list[float]] = {s: [] for s in sides}
    loads: dict[str, list[float]] = {s: [] for s in sides}
    rss: dict[str, list[float]] = {s: [] for s in sides}  # each process's peak resident memory, MB
    for rep in range(args.reps):
        for side in sides:
            out = workdir / f"full_run_{side}"
            shutil.rmtree(out, ignore_errors=True)
            if side == "ours":
                r = run_ours_child(ckpt, data, out, args)
            else:
                r = run_child(["bench.full_run", "--child-trl", "--model", str(ckpt), "--data", str(data),
                               "--out", str(out), "--train-pairs", str(args.train_pairs),
                               "--eval-pairs", str(args.eval_pairs), "--steps", str(args.steps),
                               "--device", args.device])
            walls[side].append(r["process_wall_s"])
            loads[side].append(r["load_before"])
            rss[side].append(r["peak_rss_mb"])
            print(f"rep {rep + 1}/{args.reps} {side:<4}: {r['process_wall_s']:.1f} s wall (cold process), "
                  f"peak RSS {r['peak_rss_mb']:,.0f} MB, load avg {r['load_before']:.2f} -> {r['load_after']:.2f}",
                  flush=True)
    summary = {s: {"wall_s": median(walls[s]), "all": walls[s], "load_avg": loads[s], "peak_rss_mb": median(rss[s])}
               for s in sides}
    for s in sides:
        print(f"{s:<5} median wall {summary[s]['wall_s']:.1f} s  ({', '.join(f'{w:.1f}' for w in walls[s])}), "
              f"median peak RSS {summary[s]['peak_rss_mb']:,.0f} MB")
    if "ours" in summary and "trl" in summary:
        summary["ratio"] = summary["ours"]["wall_s"] / summary["trl"]["wall_s"]
        summary["memory_ratio"] = summary["ours"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]
        print(f"ratio ours/trl: wall {summary['ratio']:.3f}, peak RSS {summary['memory_ratio']:.3f} (target <= 0.30)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine(), "summary": summary}, indent=2))
    return 0


def run_ours_child(ckpt: Path, data: Path, out: Path, args) -> dict:
    """`python -m dpo.train ...`, timed from outside like the TRL child."""
    import subprocess

    from bench import child_env, load_average

    cmd = [sys.executable, "-m", *ours_command(ckpt, data, out, args)]
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=child_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    peak = json.loads((out / "eval.json").read_text())["memory"]["peak_rss_mb"]  # the run's own getrusage figure
    return {"process_wall_s": wall, "load_before": load_before, "load_after": load_average(), "peak_rss_mb": peak}


if __name__ == "__main__":
    sys.exit(main())
