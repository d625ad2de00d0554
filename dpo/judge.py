"""`python -m dpo.judge`: does a reader prefer the policy's answers to the starting model's?

    python -m dpo.judge --run runs/dpo --judge-url http://127.0.0.1:8080/v1 --judge-model qwen2.5-7b-instruct
    python -m dpo.judge --run runs/dpo --blind            # a blinded file for people to judge
    python -m dpo.judge --run runs/dpo --verdicts alice.jsonl bob.jsonl

Held-out accuracy counts pairs whose chosen answer the policy finds likelier; it says nothing of
what the policy writes. On SmolLM2-135M-Instruct the old default raised it from 62.5% to 88%
while two blind judges preferred the starting model's answers 85% of the time. This command
measures what they measured:

1. **Prompts** (`dpo.judge_prompts`): single-turn prompts of the run's data that the run never
   trained on, from the "test" half (`--prompt-set dev` for choosing settings), or `--prompts`.
2. **Answers**: both models answer every prompt with the same decoding: the chat template,
   greedy by default, batched, the same stop tokens and token limit (`dpo.answers`). Each side's
   answers are saved with their length, whether they ended their turn and whether they loop, and
   reused by a later call with the same settings.
3. **Verdicts**: any OpenAI-compatible chat endpoint judges each pair twice, the policy's answer
   first and then second (`dpo.verdicts.combine`: a win only when both orders agree). The prompt
   is a template file (`--judge-template`, default `dpo/judge_template.md`) with ${question},
   ${answer_a} and ${answer_b}. A timeout, a refusal or a reply without a verdict is reported for
   its item, and the item is left out of the rate, never counted as a tie.
   Without an endpoint, `--blind` writes the pairs in a random order per item with the models'
   names hidden (`blind.md`, `blind.jsonl`, and the key in `blind_key.json`) for people or other
   models to judge; `--verdicts` scores their files ({"id", "verdict": "A"|"B"|"tie"} per line)
   against the key, each judge alone, and their agreement.
4. **Output** in `--output-dir` (default RUN/judge): `judge.jsonl` (per item both answers, both
   verdicts and the judge's reasons), `judge.md` to read, `judge.json` (the win rate with its
   95% interval, and both sides' end-of-turn share, loop share and mean length).

How good the verdicts are depends on the judge model: a 135M model is no judge (it is what the
tests serve); a strong instruction-tuned model, or people, are.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .answers import greedy_answers, loops, text_stats
from .chat_client import ChatClient, Reply, api_key_from
from .config import ConfigError, TrainConfig, _f, add_config_arguments
from .data import DataError
from .judge_prompts import (PROMPT_SETS, load_prompt_file, normalize, select_prompts, trained_user_turns,
                            write_prompt_file)
from .precision import autocast_dtype_for
from .verdicts import WinRate, agreement, combine, parse_verdict, win_rate, winner

DEFAULT_TEMPLATE = Path(__file__).with_name("judge_template.md")
SIDES = ("policy", "reference")


@dataclass
class JudgeConfig:
    """`python -m dpo.judge`'s settings; each field is a flag (--run, --judge-url, ...)."""

    run: str | None = _f(None, "a dpo.train run directory: its final/ is the policy, its starting model the "
                               "reference, its data the source of prompts it never trained on")
    policy: str | None = _f(None, "the policy instead of RUN/final: a checkpoint folder, .gguf or hub id "
                                  "(RUN/best for the best healthy evaluation)")
    reference: str | None = _f(None, "the reference instead of the run's starting model")
    tokenizer: str | None = _f(None, "tokenizer.json or its folder (default: the policy's)")
    prompts: str | None = _f(None, ".jsonl ({\"prompt\": ...} per line) or .txt (one per line) prompts instead "
                                   "of the run's held-out ones; with --run, checked to hold no training prompt")
    exclude_runs: list[str] | None = _f(None, "more run directories (e.g. a dpo.sft stage before the run) whose "
                                              "training prompts are excluded too", nargs="+")
    prompt_set: str = _f("test", "which half of the held-out prompts: test (to report) or dev (to choose "
                                 "settings on)", choices=list(PROMPT_SETS))
    num_prompts: int = _f(60, "how many prompts both models answer")
    max_new_tokens: int = _f(256, "longest answer, in tokens (both models)")
    batch_size: int = _f(64, "prompts answered at once: each answer leaves the batch when it ends, so one large "
                             "batch is fastest (60 prompts, starting model, fp32, 2 CPU cores: 26.5 s in one batch, "
                             "38.5 s in batches of 16, the same answers; bench.answer_speed); the KV "
                             "cache takes about 15 MB a prompt at 256 tokens")
    chat_template: str = _f("auto", "auto: the tokenizer's chat template (the run's setting with --run); none: HH "
                                    "text", choices=["auto", "none"])
    judge_url: str | None = _f(None, "an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 (llama.cpp's "
                                     "server, ollama, vLLM, python -m smollm.serve, a hosted API)")
    judge_model: str = _f("", "the judge's model name at that endpoint")
    judge_api_key_env: str = _f("OPENAI_API_KEY", "environment variable holding the endpoint's API key (if any)")
    judge_template: str | None = _f(None, "the judge prompt: a text file with ${question}, ${answer_a} and "
                                          "${answer_b} (default: dpo/judge_template.md)")
    judge_max_tokens: int = _f(512, "longest verdict reply, in tokens")
    judge_timeout: float = _f(120.0, "seconds one request may take")
    judge_retries: int = _f(2, "retries after a timeout, a lost connection, HTTP 429 or 5xx")
    concurrency: int = _f(1, "requests to the endpoint at once")
    blind: bool = _f(False, "write blind.md / blind.jsonl (random order per item, names hidden) and "
                            "blind_key.json for people to judge, instead of asking an endpoint")
    verdicts: list[str] | None = _f(None, "score blind verdict files (.jsonl: {\"id\", \"verdict\": A|B|tie, "
                                          "\"reason\"}) against blind_key.json", nargs="+")
    output_dir: str | None = _f(None, "where answers, verdicts and reports go (default: RUN/judge)")
    answers_from: str | None = _f(None, "an earlier judge output folder whose answers are reused where the model, "
                                        "prompts and decoding are the same (e.g. the starting model's)")
    seed: int = _f(0, "seed of the blind order")
    device: str | None = _f(None, "cpu, cuda, ... (default: cuda when present)")
    dtype: str | None = _f(None, "float32 or bfloat16 autocast (default: bf16 on CUDA and CPUs with native bf16)",
                           choices=["float32", "bfloat16"])
    progress: bool = _f(True, "show progress bars")

    def check(self) -> "JudgeConfig":
        def bad(flag: str, why: str):
            raise ConfigError(f"--{flag.replace('_', '-')}: {why}")

        if not self.run and not (self.policy and self.reference and self.prompts and self.output_dir):
            bad("run", "give a run directory, or all of --policy, --reference, --prompts and --output-dir")
        for name in ("num_prompts", "max_new_tokens", "batch_size", "judge_max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.judge_retries < 0 or not self.judge_timeout > 0:
            bad("judge_timeout", "must be > 0, and --judge-retries >= 0")
        if self.judge_url and (self.blind or self.verdicts):
            bad("judge_url", "ask an endpoint, or write (--blind) / score (--verdicts) a blind file: one at a time")
        if self.judge_url and not self.judge_url.startswith(("http://", "https://")):
            bad("judge_url", f"expected an http:// or https:// URL, got {self.judge_url!r}")
        if self.judge_url and not self.judge_model:
            bad("judge_model", "name the judge's model at --judge-url")
        return self


# --------------------------------------------------------------------------- the run, its models and prompts


def run_config(run: Path, cls: type = TrainConfig, name: str = "train_config.json"):
    """The settings a run was started with (its train_config.json, or sft_config.json for dpo.sft)."""
    path = run / name
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a run directory of {'dpo.train' if cls is TrainConfig else 'dpo.sft'} "
                          f"({e})") from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {unknown} (written by another version)")
    return cls(**saved)


def training_prompts(run: Path) -> set[str]:
    """The normalized user turns of every pair a dpo.train or dpo.sft run may have trained on, by
    replaying its own load -> shuffle -> filter -> split (`dpo.cli.select_pairs`)."""
    from .cli import load_pairs, select_pairs
    from .config import SFTConfig

    config = run_config(run, SFTConfig, "sft_config.json") if (run / "sft_config.json").is_file() \
        else run_config(run)
    return trained_user_turns(select_pairs(config, load_pairs(config))[0])


def run_prompts(config: JudgeConfig, run_cfg: TrainConfig | None) -> tuple[list[str], dict]:
    """The prompts to answer, and where they came from. The training prompts of the run (and of
    --exclude-runs) are excluded from the pool, or checked absent from a --prompts file."""
    from .cli import load_pairs

    trained: set[str] = set()
    for run in ([config.run] if config.run else []) + list(config.exclude_runs or []):
        trained |= training_prompts(Path(run))
    if config.prompts is not None:
        prompts = load_prompt_file(config.prompts)[:config.num_prompts]
        seen = [i + 1 for i, p in enumerate(prompts) if normalize(p) in trained]
        if seen:
            raise DataError(f"prompts {seen[:10]} were training prompts of {config.run} or --exclude-runs: "
                            "a win rate on them means nothing", path=config.prompts)
        return prompts, {"source": config.prompts, "checked_against": [config.run] + list(config.exclude_runs or [])}
    prompts, counts = select_prompts(load_pairs(run_cfg), trained, config.prompt_set, config.num_prompts)
    if len(prompts) < config.num_prompts:
        print(f"note: only {len(prompts)} held-out single-turn prompts in the {config.prompt_set} set "
              f"(asked for {config.num_prompts})", file=sys.stderr)
    return prompts, {"source": f"{', '.join(run_cfg.data)} ({run_cfg.data_split})", "set": config.prompt_set,
                     **counts}


def load_model(name: str, device: torch.device, base: str | None = None):
    """A model from a folder (HuggingFace, or peft's adapter folder over `base`), .gguf or hub id."""
    from smollm import load_pretrained
    from smollm.lora import load_peft

    folder = Path(name)
    if (folder / "adapter_config.json").is_file():  # a LoRA run's final/: the adapters over their base model
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        model = load_pretrained(base or config.get("base_model_name_or_path"), device=device)
        load_peft(model, folder)
        return model.to(device)
    return load_pretrained(name, device=device)


def render(tokenizer, prompt: str, chat_template: str) -> list[int]:
    """A user message as the model sees it: its chat template with the assistant's turn opened,
    or HH text without one."""
    if chat_template != "none" and tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        text = f"\n\nHuman: {prompt}\n\nAssistant:"
    return tokenizer.encode_ids(text)


# --------------------------------------------------------------------------- answers


def answer_all(config: JudgeConfig, names: dict[str, str], prompts: list[str], tokenizer, base: str | None,
               out: Path, device: torch.device) -> dict[str, list[dict]]:
    """Both sides' answers, generated the same way. A side whose answers an earlier call already
    made with the same model, prompts and decoding (answers_{side}.jsonl and its .json settings,
    in --output-dir or in --answers-from) is read back instead of generated again."""
    ids = [render(tokenizer, p, config.chat_template) for p in prompts]
    stop_ids = list(dict.fromkeys(list(tokenizer.stop_token_ids) + [tokenizer.eos_token_id]))
    autocast = autocast_dtype_for(config, device)
    answers: dict[str, list[dict]] = {}
    for side in SIDES:
        settings = {"model": names[side], "prompts": prompts, "max_new_tokens": config.max_new_tokens,
                    "decoding": "greedy", "chat_template": config.chat_template, "stop_ids": stop_ids,
                    "autocast": str(autocast)}
        rows = _cached_answers(side, settings, [out] + ([Path(config.answers_from)] if config.answers_from else []))
        if rows is None:
            started = time.perf_counter()
            model = load_model(names[side], device, base)
            with _bar(len(prompts), f"{side} answers", config.progress) as bar:
                got = greedy_answers(model, ids, max_new_tokens=config.max_new_tokens, stop_ids=stop_ids,
                                     batch_size=config.batch_size, device=device, autocast_dtype=autocast,
                                     progress=bar.update)
            del model
            rows = []
            for k, (prompt, (answer_ids, ended)) in enumerate(zip(prompts, got), 1):
                text = tokenizer.decode(answer_ids, skip_special_tokens=True)
                rows.append({"id": k, "prompt": prompt, "answer": text, "tokens": len(answer_ids), "ended": ended,
                             "loops": loops(text)})
            print(f"{side}: {len(rows)} answers in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        (out / f"answers_{side}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                   encoding="utf-8")
        (out / f"answers_{side}.json").write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        answers[side] = rows
    return answers


def _cached_answers(side: str, settings: dict, folders: list[Path]) -> list[dict] | None:
    """A side's answers from the first folder whose answers were made with exactly `settings`."""
    for folder in folders:
        meta, rows = folder / f"answers_{side}.json", folder / f"answers_{side}.jsonl"
        try:
            same = json.loads(meta.read_text(encoding="utf-8")) == settings
        except (OSError, ValueError):
            continue
        if same and rows.is_file():
            print(f"reusing the {side}'s answers in {rows} (same model, prompts and decoding)", file=sys.stderr)
            return [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines()]
    return None


def answer_stats(rows: Sequence[dict]) -> dict[str, float]:
    """A side's end-of-turn share, loop share and mean length (`dpo.answers.text_stats`)."""
    stats = text_stats([[0] * r["tokens"] for r in rows], [r["answer"] for r in rows], [r["ended"] for r in rows])
    return {k: stats[k] for k in ("ended_share", "loop_share", "mean_length", "empty_share")}


class _bar:
    """A tqdm bar, or a stand-in with .update when bars are off."""

    def __init__(self, total: int, desc: str, show: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not show)

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        self.bar.close()


# --------------------------------------------------------------------------- the endpoint judge


def load_template(path: str | None) -> string.Template:
    """The judge prompt template; it must use ${question}, ${answer_a} and ${answer_b}."""
    file = Path(path) if path else DEFAULT_TEMPLATE
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--judge-template {file}: {e}") from None
    template = string.Template(text)
    found = {m.group("named") or m.group("braced") for m in template.pattern.finditer(text)} - {None}
    missing = [f"${{{k}}}" for k in ("question", "answer_a", "answer_b") if k not in found]
    if missing:
        raise ConfigError(f"--judge-template {file}: the template lacks {', '.join(missing)}")
    unknown = sorted(found - {"question", "answer_a", "answer_b"})
    if unknown:
        raise ConfigError(f"--judge-template {file}: unknown placeholders {unknown} (use $$ for a literal $)")
    return template


def ask(client: ChatClient, template: string.Template, prompt: str, a: str, b: str) -> dict:
    """One order of one pair: the judge's reply, its verdict ("A"/"B"/"tie" or None) and any failure."""
    reply: Reply = client.complete([{"role": "user", "content": template.substitute(
        question=prompt, answer_a=a, answer_b=b)}])
    verdict = parse_verdict(reply.text) if reply.text is not None and reply.error is None else None
    error = reply.error or (None if verdict is not None else "no verdict")
    return {"verdict": verdict, "error": error, "detail": reply.detail if reply.error else
            ("" if verdict else f"no 'Verdict: A|B|tie' in the reply: {(reply.text or '')[-200:]!r}"),
            "reply": reply.text, "finish_reason": reply.finish_reason, "attempts": reply.attempts,
            "seconds": round(reply.seconds, 2)}


def judge_pairs(config: JudgeConfig, answers: dict[str, list[dict]]) -> list[dict]:
    """Every pair, in both orders: the policy's answer as A, then as B. Returns one record per item."""
    client = ChatClient(config.judge_url, config.judge_model, api_key=api_key_from(config.judge_api_key_env),
                        timeout=config.judge_timeout, retries=config.judge_retries,
                        max_tokens=config.judge_max_tokens)
    template = load_template(config.judge_template)
    pol, ref = answers["policy"], answers["reference"]
    jobs = [(k, order) for k in range(len(pol)) for order in ("policy first", "reference first")]

    def run(job):
        k, order = job
        a, b = (pol[k], ref[k]) if order == "policy first" else (ref[k], pol[k])
        return job, ask(client, template, pol[k]["prompt"], a["answer"], b["answer"])

    results: dict[tuple[int, str], dict] = {}
    with _bar(len(jobs), "judge requests", config.progress) as bar, \
            ThreadPoolExecutor(max_workers=config.concurrency) as pool:
        for job, result in pool.map(run, jobs):
            results[job] = result
            bar.update(1)
    items = []
    for k in range(len(pol)):
        orders = []
        for order, policy_is in (("policy first", "A"), ("reference first", "B")):
            r = results[(k, order)]
            orders.append({"order": order, "policy_is": policy_is, **r,
                           "winner": None if r["verdict"] is None else winner(r["verdict"], policy_is)})
        failed = [o for o in orders if o["winner"] is None]
        items.append({"id": pol[k]["id"], "prompt": pol[k]["prompt"], "policy": pol[k], "reference": ref[k],
                      "orders": orders, "outcome": None if failed else combine(orders[0]["winner"],
                                                                                orders[1]["winner"]),
                      "failure": "; ".join(f"{o['order']}: {o['error']} ({o['detail']})" for o in failed) or None})
    return items


# --------------------------------------------------------------------------- blind files for people


def write_blind(answers: dict[str, list[dict]], out: Path, seed: int) -> tuple[Path, Path, Path]:
    """blind.md and blind.jsonl (A/B in a random order per item, no names) and blind_key.json."""
    rng = random.Random(seed)
    key, rows, md = {}, [], ["# Which answer is better?", "",
                             "For each message, pick the better answer for the user, or call a tie: helpful, "
                             "correct, coherent and harmless (a polite refusal of a harmful request beats help "
                             "with it; a longer answer is not better for being longer). Write one line per item "
                             'to a .jsonl file: {"id": 1, "verdict": "A" | "B" | "tie", "reason": "..."}.', ""]
    for p, r in zip(answers["policy"], answers["reference"]):
        policy_is = rng.choice("AB")
        a, b = (p, r) if policy_is == "A" else (r, p)
        key[str(p["id"])] = policy_is
        rows.append({"id": p["id"], "prompt": p["prompt"], "A": a["answer"], "B": b["answer"]})
        md += [f"## {p['id']}", "", "**Message**", "", _quote(p["prompt"]), "", "**Answer A**", "",
               _quote(a["answer"]), "", "**Answer B**", "", _quote(b["answer"]), ""]
    files = (out / "blind.md", out / "blind.jsonl", out / "blind_key.json")
    files[0].write_text("\n".join(md), encoding="utf-8")
    files[1].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    files[2].write_text(json.dumps({"policy_is": key, "seed": seed}, indent=1) + "\n", encoding="utf-8")
    return files


def _quote(text: str) -> str:
    return "\n".join(f"> {line}".rstrip() for line in (text.strip() or "(empty)").splitlines())


def score_verdicts(paths: Sequence[str], out: Path, ids: Sequence[int]) -> list[dict]:
    """Each blind verdict file scored against blind_key.json: per judge its outcomes by item."""
    try:
        key = json.loads((out / "blind_key.json").read_text(encoding="utf-8"))["policy_is"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{out / 'blind_key.json'}: no blind key here ({e}); write one with --blind") from None
    judges = []
    for path in paths:
        outcomes: dict[int, str | None] = {}
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                item, verdict = int(row["id"]), str(row["verdict"]).strip()
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f'expected {{"id": N, "verdict": "A"|"B"|"tie"}} ({e})', path=path,
                                line=number) from None
            verdict = {"a": "A", "b": "B", "tie": "tie"}.get(verdict.lower())
            if verdict is None or str(item) not in key:
                raise DataError(f"unknown item {item} or verdict {row['verdict']!r}", path=path, line=number)
            outcomes[item] = {"policy": "win", "reference": "loss", "tie": "tie"}[winner(verdict, key[str(item)])]
        missing = [i for i in ids if i not in outcomes]
        judges.append({"file": str(path), "outcomes": [outcomes.get(i) for i in ids], "missing": missing})
    return judges


# --------------------------------------------------------------------------- reports


def summary(answers: dict[str, list[dict]], rate: WinRate | None, extra: dict) -> dict:
    return {**extra, "win_rate": None if rate is None else rate.to_dict(),
            "answers": {side: answer_stats(answers[side]) for side in SIDES}}


def stats_table(answers: dict[str, list[dict]]) -> str:
    rows = {side: answer_stats(answers[side]) for side in SIDES}
    lines = ["| | policy | reference |", "| --- | --- | --- |"]
    for key, label, fmt in (("ended_share", "ended their turn", ".0%"), ("loop_share", "loop (word 4-gram 3+ times)",
                                                                        ".0%"),
                            ("mean_length", "mean length (tokens)", ".1f"), ("empty_share", "empty", ".0%")):
        lines.append(f"| {label} | {format(rows['policy'][key], fmt)} | {format(rows['reference'][key], fmt)} |")
    return "\n".join(lines)


def judge_markdown(items: list[dict], rate: WinRate, answers: dict[str, list[dict]], head: str) -> str:
    parts = [f"# Judged: the policy against the reference\n\n{head}\n\n**Win rate of the policy: {rate}**\n\n"
             "A win counts only when both orders (the policy's answer first, then second) name the policy; "
             "ties count half.\n", stats_table(answers)]
    failed = [i for i in items if i["outcome"] is None]
    if failed:
        parts.append("## Failed items (not counted)\n\n" + "\n".join(f"- {i['id']}: {i['failure']}" for i in failed))
    for i in items:
        reasons = "\n".join(f"- {o['order']}: **{o['winner'] or o['error']}**. "
                            + " ".join((o['reply'] or o['detail'] or '').split())[:600] for o in i["orders"])
        parts.append(f"## {i['id']}: {i['outcome'] or 'failed'}\n\n{_quote(i['prompt'])}\n\n"
                     f"**Policy** ({_note(i['policy'])})\n\n{_quote(i['policy']['answer'])}\n\n"
                     f"**Reference** ({_note(i['reference'])})\n\n{_quote(i['reference']['answer'])}\n\n{reasons}")
    return "\n\n".join(parts) + "\n"


def _note(row: dict) -> str:
    return f"{row['tokens']} tokens, {'ended its turn' if row['ended'] else 'hit the limit'}" + (
        ", loops" if row["loops"] else "")


# --------------------------------------------------------------------------- the command


def run(config: JudgeConfig) -> dict:
    from smollm import load_tokenizer

    config.check()
    run_dir = Path(config.run) if config.run else None
    run_cfg = run_config(run_dir) if run_dir else None
    names = {"policy": config.policy or str(run_dir / "final"),
             "reference": config.reference or run_cfg.model}
    if run_cfg is not None and config.chat_template == "auto":
        config.chat_template = run_cfg.chat_template
    out = Path(config.output_dir or run_dir / "judge")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.tokenizer or _tokenizer_source(names["policy"], run_cfg))
    prompts, source = run_prompts(config, run_cfg)
    write_prompt_file(prompts, out / "prompts.jsonl")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    answers = answer_all(config, names, prompts, tokenizer, run_cfg.model if run_cfg else None, out, device)
    extra = {"policy": names["policy"], "reference": names["reference"], "prompts": source,
             "num_prompts": len(prompts), "max_new_tokens": config.max_new_tokens, "decoding": "greedy"}
    print(stats_table(answers))
    if config.blind:
        files = write_blind(answers, out, config.seed)
        print(f"wrote {files[0]} and {files[1]} for the judges (the key is {files[2]}); score them with "
              f"python -m dpo.judge --run {config.run or '...'} --output-dir {out} --verdicts FILE [FILE ...]")
        return summary(answers, None, extra)
    if config.verdicts:
        ids = [r["id"] for r in answers["policy"]]
        judges = score_verdicts(config.verdicts, out, ids)
        result = summary(answers, None, extra)
        result["judges"] = []
        for j in judges:
            rate = win_rate(j["outcomes"])
            result["judges"].append({"file": j["file"], **rate.to_dict(), "missing": j["missing"]})
            print(f"{j['file']}: policy win rate {rate}")
        if len(judges) == 2:
            same, both = agreement(judges[0]["outcomes"], judges[1]["outcomes"])
            result["agreement"] = {"same": same, "of": both}
            print(f"the two judges agree on {same} of {both} items")
        (out / "verdicts.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        return result
    if not config.judge_url:
        raise ConfigError("--judge-url: give an endpoint to judge with, or --blind to write a file for people")
    items = judge_pairs(config, answers)
    rate = win_rate(i["outcome"] for i in items)
    extra.update(judge_url=config.judge_url, judge_model=config.judge_model,
                 judge_template=str(config.judge_template or DEFAULT_TEMPLATE),
                 failures=_failure_counts(items))
    result = summary(answers, rate, extra)
    (out / "judge.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items),
                                     encoding="utf-8")
    (out / "judge.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    head = (f"Policy `{names['policy']}` against reference `{names['reference']}` on {len(prompts)} prompts "
            f"({source.get('set', source['source'])}), greedy, at most {config.max_new_tokens} new tokens; "
            f"judge `{config.judge_model}` at {config.judge_url}.")
    (out / "judge.md").write_text(judge_markdown(items, rate, answers, head), encoding="utf-8")
    print(f"policy win rate: {rate}")
    for kind, n in result["failures"].items():
        print(f"  failed: {n} x {kind}")
    print(f"wrote {out / 'judge.jsonl'}, {out / 'judge.md'} and {out / 'judge.json'}")
    return result


def _failure_counts(items: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in items:
        for o in i["orders"]:
            if o["error"]:
                counts[o["error"]] = counts.get(o["error"], 0) + 1
    return counts


def _tokenizer_source(policy: str, run_cfg: TrainConfig | None) -> str:
    """The policy's folder when it holds a tokenizer, else the run's tokenizer or starting model."""
    if (Path(policy) / "tokenizer.json").is_file():
        return policy
    if run_cfg is not None:
        return run_cfg.tokenizer or run_cfg.model
    return policy


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 with one line `error: ...` for a bad setting, input or model."""
    from smollm.checkpoint import CheckpointError
    from smollm.sources import HubError
    from smollm.tokenizer import TokenizerError

    parser = argparse.ArgumentParser(prog="python -m dpo.judge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, JudgeConfig)
    args = parser.parse_args(argv)
    config = JudgeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(JudgeConfig)
                            if hasattr(args, f.name)})
    try:
        run(config)
    except (ConfigError, DataError, CheckpointError, TokenizerError, HubError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
