"""The evaluation's answers: how long the sample prompts of a default run take to answer.

    python -m bench.answer_speed                          # SmolLM2-135M-Instruct, batches of 8 and 32
    python -m bench.answer_speed --model runs/dpo/final   # a run's policy
    python -m bench.answer_speed --isa avx2 --batch-sizes 32 --reps 3
    python -m bench.answer_speed --prompts docs/judge/dev.jsonl --new-tokens 256 --batch-sizes 16 64

bench.generate_speed forces every row to the same number of tokens, to compare with
transformers. A run's evaluation does not: it answers its held-out sample prompts
(`dpo.health.sample_prompts`, 32 by default, half single-turn) greedily, each until it ends its
turn or reaches --sample-tokens, through `dpo.answers.greedy_answers`. This times exactly that
call on the default run's sample prompts, for each batch size, and prints the answer tokens,
how many answers ended, and a digest of the answers (the same digest at every batch size: the
batch does not change an answer). `--prompts` answers a judge prompt file instead (one
{"prompt": ...} per line, chat-formatted as `python -m dpo.judge` does).

Each instruction set runs in its own child process (see bench.generate_speed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

from bench import add_per_isa_arguments, cpu_description, cpu_line, emit, load_average, median, run_per_isa

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def child(args) -> None:
    import torch

    from dpo.answers import greedy_answers
    from dpo.config import TrainConfig
    from dpo.health import sample_prompts
    from dpo.train import prepare_data
    from smollm import load_pretrained, load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MODEL)
    model = load_pretrained(args.model).eval()
    config = TrainConfig()
    if args.prompts:
        from dpo.judge import render

        with open(args.prompts) as f:
            prompts = [render(tokenizer, json.loads(line)["prompt"], "auto") for line in f if line.strip()]
    else:
        _, eval_pairs, _ = prepare_data(config, tokenizer, model.config)
        prompts, _ = sample_prompts(eval_pairs, config.sample_prompts, tokenizer)
    stop = list(dict.fromkeys(list(tokenizer.stop_token_ids) + [tokenizer.eos_token_id]))
    result = {"isa": args.isa[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(), "model": args.model,
              "prompt_set": args.prompts or "the default run's sample prompts", "new_tokens": args.new_tokens,
              "prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)), "batches": {}}
    for B in args.batch_sizes:
        times, loads = [], []
        for _ in range(args.reps):
            loads.append(load_average())
            start = time.perf_counter()
            answers = greedy_answers(model, prompts, max_new_tokens=args.new_tokens, stop_ids=stop, batch_size=B)
            times.append(time.perf_counter() - start)
        result["batches"][str(B)] = {
            "s": times, "load": median(loads), "answer_tokens": sum(len(ids) for ids, _ in answers),
            "ended": sum(ended for _, ended in answers),
            "digest": hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:12]}
    emit(result)


def report(cpu: dict, results: list[dict]) -> str:
    lines = [cpu_line(cpu),
             "", "| kernels | model | batch | seconds (median) | answer tokens | ended | answers' digest | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for B, m in r["batches"].items():
            lines.append(f"| {r['isa']} ({r['cpu_capability']}) | {r['model']} | {B} | {median(m['s']):.2f} | "
                         f"{m['answer_tokens']} | {m['ended']} of {r['prompts']} | {m['digest']} | {m['load']:.1f} |")
    r = results[0]
    lines.append(f"\n{r['prompts']} prompts ({r['prompt_set']}; {r['prompt_tokens']} tokens), greedy, up to "
                 f"{r['new_tokens']} new tokens, stopping at the end of the turn.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help="a model name or folder (default: the starting model)")
    p.add_argument("--prompts", help="a judge prompt file (.jsonl of {\"prompt\": ...}) instead of the default "
                                    "run's sample prompts")
    p.add_argument("--new-tokens", type=int, default=128, help="longest answer (the run's --sample-tokens: 128)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    add_per_isa_arguments(p)
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.reps < 1 or args.threads < 1 or args.new_tokens < 1:
        p.error("--batch-sizes, --new-tokens, --reps and --threads must be positive")
    if args.prompts:
        args.prompts = os.path.abspath(args.prompts)  # the child runs in the repository
        if not os.path.isfile(args.prompts):
            p.error(f"--prompts: no such file: {args.prompts}")
    if args.child:
        child(args)
        return 0
    flags = ["--model", args.model, "--batch-sizes", *map(str, args.batch_sizes), "--reps", str(args.reps),
             "--new-tokens", str(args.new_tokens), *(["--prompts", args.prompts] if args.prompts else [])]
    print(report(cpu_description(), run_per_isa("bench.answer_speed", args.isa, args.threads, flags)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
