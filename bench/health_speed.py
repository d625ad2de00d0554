"""An evaluation's health checks: what reusing the frozen trunk's work saves, on a trained policy.

    python -m bench.health_speed --policy runs/dpo/final             # a default run's policy
    python -m bench.health_speed --policy runs/dpo/final --isa avx2 --reps 3

A default run's policy shares its first 25 blocks, frozen, with the starting model (its
reference). At each evaluation `dpo.health.HealthProbe` answers the run's sample prompts with the
policy, then scores those answers: the KL between policy and reference, and the reference's NLL
of them. Three ways to avoid running that shared trunk again, each timed here against the way
without it, alternating, in one process per instruction set:

* **answers**: plain greedy answers (`dpo.answers.greedy_answers`), against the same answers
  keeping the stream entering block 25 (`answers_with_streams`: what recording costs), against
  those with the prompts' first 25 blocks kept from the reference's answers
  (`smollm.generation.PromptPrefixes`: what the probe does from its second report on);
* **KL and NLL** of the policy's answers: whole forwards of both models over prompt + answer,
  against both tails continuing from the kept stream (`kl_and_reference_nll(streams=)`);
* **the reference's NLL of its own answers** (once a run): a whole forward, against the norm and
  the head on the final stream its generation kept.

Every variant's answers must be the same tokens, and the printed KL and NLL agree to rounding.
The prompts are the default run's sample prompts (`dpo.health.sample_prompts`, 32, half
single-turn), answered greedily up to 128 tokens, as an evaluation does.
"""
from __future__ import annotations

import argparse
import os
import time

from bench import add_per_isa_arguments, cpu_description, cpu_line, emit, load_average, median, run_per_isa

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def child(args) -> None:
    import torch

    from dpo import health
    from dpo.answers import answers_with_streams, greedy_answers
    from dpo.config import TrainConfig
    from dpo.engine import shared_trunk_depth
    from dpo.train import prepare_data
    from smollm import load_pretrained, load_tokenizer
    from smollm.generation import PromptPrefixes

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(MODEL)
    reference = load_pretrained(MODEL).eval().requires_grad_(False)
    policy = load_pretrained(args.policy).eval().requires_grad_(False)
    config = TrainConfig()
    L = reference.config.num_hidden_layers
    K = L - config.blocks_to_train(L)
    for i in range(K):  # a default run's policy: its frozen trunk is the starting model's, shared as in a run
        if not all(torch.equal(p, q) for p, q in zip(policy.model.layers[i].parameters(),
                                                      reference.model.layers[i].parameters())):
            raise SystemExit(f"--policy {args.policy}: block {i} differs from {MODEL}'s; a default run "
                             f"trains only blocks {K}-{L - 1}")
        policy.model.layers[i] = reference.model.layers[i]
    policy.model.embed_tokens = reference.model.embed_tokens
    policy.tie_weights()
    assert shared_trunk_depth(policy, reference) == K
    _, eval_pairs, _ = prepare_data(config, tokenizer, reference.config)
    prompts, _ = health.sample_prompts(eval_pairs, config.sample_prompts, tokenizer)
    stop = list(dict.fromkeys(list(tokenizer.stop_token_ids) + [tokenizer.eos_token_id]))
    gen = dict(max_new_tokens=config.sample_tokens, stop_ids=stop, batch_size=min(len(prompts), 32))

    def timed(f):
        start = time.perf_counter()
        out = f()
        return time.perf_counter() - start, out

    prefixes = PromptPrefixes(K)
    own, own_streams = answers_with_streams(reference, prompts, [L], prefixes=prefixes, **gen)  # the first report
    own_ids = [a for a, _ in own]
    seconds = {k: [] for k in ("answers", "answers, stream kept", "answers, stream kept, prompts' trunk kept",
                               "KL + NLL, whole forwards", "KL + NLL, from the stream",
                               "reference's own NLL, whole forward", "reference's own NLL, from its stream")}
    loads, figures = [], {}
    for _ in range(args.reps):
        loads.append(load_average())
        t, plain = timed(lambda: greedy_answers(policy, prompts, **gen))
        seconds["answers"].append(t)
        t, (kept, streams) = timed(lambda: answers_with_streams(policy, prompts, [K], **gen))
        seconds["answers, stream kept"].append(t)
        t, (reused, _) = timed(lambda: answers_with_streams(policy, prompts, [K], prefixes=prefixes, **gen))
        seconds["answers, stream kept, prompts' trunk kept"].append(t)
        if not plain == kept == reused:
            raise SystemExit("the answers differ between the variants")
        ids = [a for a, _ in plain]
        t, figures["KL + NLL, whole forwards"] = timed(
            lambda: health.kl_and_reference_nll(policy, reference, prompts, ids))
        seconds["KL + NLL, whole forwards"].append(t)
        t, figures["KL + NLL, from the stream"] = timed(
            lambda: health.kl_and_reference_nll(policy, reference, prompts, ids, streams=streams))
        seconds["KL + NLL, from the stream"].append(t)
        t, figures["reference's own NLL, whole forward"] = timed(
            lambda: health.reference_nll(reference, prompts, own_ids))
        seconds["reference's own NLL, whole forward"].append(t)
        t, figures["reference's own NLL, from its stream"] = timed(
            lambda: health.reference_nll(reference, prompts, own_ids, streams=own_streams))
        seconds["reference's own NLL, from its stream"].append(t)
    emit({"isa": args.isa[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(), "policy": args.policy,
          "prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)),
          "answer_tokens": sum(len(a) for a in ids), "shared": K, "seconds": seconds, "load": median(loads),
          "figures": {k: v if isinstance(v, float) else list(v) for k, v in figures.items()}})


def report(cpu: dict, results: list[dict]) -> str:
    lines = [cpu_line(cpu), "", "| kernels | what | seconds (median) | KL, NLL |", "|---|---|---|---|"]
    for r in results:
        for what, s in r["seconds"].items():
            fig = r["figures"].get(what)
            shown = "" if fig is None else (f"{fig:.6f}" if isinstance(fig, float) else
                                            ", ".join(f"{x:.6f}" for x in fig))
            lines.append(f"| {r['isa']} ({r['cpu_capability']}) | {what} | {median(s):.2f} | {shown} |")
    r = results[0]
    lines.append(f"\n{r['prompts']} prompts ({r['prompt_tokens']} tokens), {r['answer_tokens']} answer tokens from "
                 f"{r['policy']}; blocks 0-{r['shared'] - 1} shared with the reference; load average "
                 f"{r['load']:.1f}.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="a default run's policy folder (its final/ or best/)")
    add_per_isa_arguments(p)
    args = p.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        p.error("--reps and --threads must be positive")
    args.policy = os.path.abspath(args.policy)  # the child runs in the repository
    if not os.path.isdir(args.policy):
        p.error(f"--policy: no such folder: {args.policy}")
    if args.child:
        child(args)
        return 0
    flags = ["--policy", args.policy, "--reps", str(args.reps)]
    print(report(cpu_description(), run_per_isa("bench.health_speed", args.isa, args.threads, flags)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
