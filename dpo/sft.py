"""`python -m dpo.sft`: supervised fine-tuning on the chosen responses, the DPO paper's starting policy.

    load pairs -> (optional NLTK filter) -> hold out eval pairs -> tokenize prompt + chosen
    -> load the base model, freeze all but the last N blocks (default: train everything)
    -> train on the masked NLL (metrics.jsonl) -> held-out NLL/perplexity before and after (eval.json)
    -> curves.png, final/ (HF format + tokenizer: pass it to `python -m dpo.train --model`)

The loss is the token-level mean negative log-likelihood of the response tokens of a step:
(sum of token NLLs over every response token in the step's micro-batches) / (their number).
Prompt and padding tokens never count, and longer responses weigh more, as in a plain LM loss.

It is the same trainer as dpo.train's (dpo.trainer.Trainer with `SFTObjective`) and the same run
around it (dpo.cli): --save-every checkpoints, `--resume RUN_DIR`, Ctrl-C/SIGTERM saving a
checkpoint, the non-finite guard, the progress bar and metrics.jsonl behave as they do there.
"""
from __future__ import annotations

import math
import time

import torch

from smollm import SmolLM, load_pretrained
from smollm.checkpoint import write_json

from . import cli, distributed
from .checkpointing import CHECKPOINTS_DIR
from .cli import log
from .config import SFTConfig
from .data import DataError
from .engine import LogProbEngine
from .objectives import SFTObjective
from .plots import plot_sft_curve
from .policy import make_trainable, save_policy
from .precision import autocast_dtype_for, precision_note
from .tokenization import TokenizedSequence, TokenizeStats, collate_sequences, tokenize_prompt_response
from .trainer import Trainer

COMMAND = "dpo.sft"
OUTPUTS = (cli.METRICS_NAME, "eval.json", "curves.png", "final", "sft_config.json", CHECKPOINTS_DIR)


# ----------------------------------------------------------------------- the loss
def sft_nll(model: SmolLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token NLLs [], number of response tokens []) of one collated batch.

    A token counts when response_mask is 1 at position t >= 1; the LM head runs only there.
    The token-level mean NLL is the first divided by the second.
    """
    nll, _ = SFTObjective(LogProbEngine(model, recompute=False), pad_token_id=0)(batch)  # the one engine
    return nll, batch["response_mask"][:, 1:].sum()


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
    train_raw, eval_raw, _ = cli.load_and_split(config, tokenizer)

    def tokenize(raw, limit):
        stats, out = TokenizeStats(), []
        for p in raw:
            seq = tokenize_prompt_response(tokenizer, p.prompt, p.chosen, max_length=config.max_length,
                                           eos_token_id=tokenizer.eos_token_id,
                                           max_prompt_length=config.max_prompt_length, stats=stats)
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


# ----------------------------------------------------------------------- the run
def run(config: SFTConfig) -> dict:
    started = time.perf_counter()
    s = cli.start_run(config, COMMAND, OUTPUTS)
    config, resume_state, out, device = s.config, s.resume_state, s.out, s.device
    model_dir, model_config, tokenizer = s.model_dir, s.model_config, s.tokenizer
    train, evals = prepare_data(config, tokenizer)
    data_fingerprint = cli.fingerprint(train + evals)
    cli.check_same_data(resume_state, data_fingerprint)

    model = load_pretrained(model_dir, device=device)
    torch.manual_seed(config.seed)  # LoRA's initialisation and dropout: the same run for the same seed
    lora = config.lora_config(model_config.num_hidden_layers)
    log(str(make_trainable(model, lora, train_last_n=config.blocks_to_train(model_config.num_hidden_layers),
                           train_head=not config.freeze_head)))
    cli.shard_if_asked(config, model, None, device)
    engine = LogProbEngine(model, recompute=config.recompute_tail)  # the frozen leading blocks run without grad
    trainer = Trainer(model, train, config, SFTObjective(engine, pad_token_id=tokenizer.pad_token_id), device=device)
    log(f"compute: {precision_note(config.dtype, trainer.autocast_dtype, device)}")
    is_main = distributed.current().is_main  # in a torchrun job only rank 0 writes files and prints
    eval_kw = dict(pad_token_id=tokenizer.pad_token_id, batch_size=config.batch_size, device=device,
                   autocast_dtype=autocast_dtype_for(config, device))

    if resume_state:
        cli.restore(trainer, resume_state, out)
        before = resume_state[1].get("before")
    else:
        cli.new_run_dir(out, config, "sft_config.json", OUTPUTS)  # a previous run's files exist only with --overwrite
        before = evaluate_nll(model, evals, **eval_kw) if evals else None
        if before:
            log(f"before training: held-out NLL {before['nll']:.4f} (perplexity {before['perplexity']:.2f})")

    tracker = cli.open_tracker(config, out, COMMAND, trainer.step)  # --report-to (dpo.tracking)
    if before and not resume_state:
        tracker.log_evaluation({"step": 0, **before})
    checkpoints = cli.Checkpoints(trainer, out, COMMAND, config.keep_checkpoints,
                                  lambda: dict(data_fingerprint=data_fingerprint, before=before),
                                  resumed_from=resume_state[2] if resume_state else None)
    cli.train_loop(trainer, config, out, checkpoints, desc="SFT",
                   postfix=lambda m: dict(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}"),
                   tracker=tracker)
    checkpoints.save()  # the trained state, before the final evaluation and export

    result: dict = {"steps": trainer.step, "train_examples": len(train), "eval_examples": len(evals),
                    "skipped_nonfinite": trainer.skipped_nonfinite}
    if evals:
        result.update(before=before, after=evaluate_nll(model, evals, **eval_kw))
        tracker.log_evaluation({"step": trainer.step, **result["after"]})
        log(f"held-out NLL {before['nll']:.4f} -> {result['after']['nll']:.4f} "
            f"(perplexity {before['perplexity']:.2f} -> {result['after']['perplexity']:.2f})")
    step_seconds = sum(r.get("seconds", 0.0) for r in cli.read_metrics(out / cli.METRICS_NAME))
    result["timing"] = {"wall_seconds": round(time.perf_counter() - started, 1),  # this session's
                        "step_seconds": round(step_seconds, 1),
                        "steps_per_second": round(trainer.step / step_seconds, 4) if step_seconds else None}
    save_policy(model, out / "final", tokenizer=tokenizer, lora=lora, base_model=config.model,
                merge=config.merge_lora)  # (gathered from every rank under FSDP)
    if not is_main:
        return result
    write_json(out / "eval.json", result)
    tracker.log_summary(result, trainer.step)
    tracker.close()
    plot_sft_curve(cli.read_metrics(out / cli.METRICS_NAME), out / "curves.png", result if evals else None)
    follow = (f"continue with: python -m dpo.train --model {out / 'final'}" if lora is None or config.merge_lora
              else "final/ is peft's adapter folder (--merge-lora writes a model that python -m dpo.train takes)")
    print(f"wrote {out}/metrics.jsonl, eval.json, curves.png and final/; {follow}")
    return result


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 with one line `error: ...`, 130/143 when interrupted (dpo.cli.main)."""
    return cli.main(run, SFTConfig, COMMAND, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
