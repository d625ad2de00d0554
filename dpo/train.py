"""`python -m dpo.train`: the whole DPO pipeline in one command.

    load pairs -> NLTK strong-preference filter -> hold out eval pairs -> tokenize
    -> load policy, freeze all but the last N blocks, frozen reference copy
    -> train (metrics.jsonl, checkpoints), evaluating accuracy and health every --eval-every steps
    -> evaluate reference vs policy: accuracy, health, side-by-side samples (eval.json, samples.md)
    -> curves.png, final/ (HF format + tokenizer), best/ (the best healthy evaluation)

Accuracy alone is not success: a policy can win on held-out preferences while its answers decay
into whitespace. Every evaluation also measures the policy's health (dpo.health); a problem is
a warning in the log and on the progress bar, and the final table says the policy degraded.

Everything that can be checked is checked before the expensive work starts, and the output
directory is created only once the data and model are known to be usable.

Resuming, signals, the non-finite guard and the CLI's exit codes are those of every training
command: see dpo.cli.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from smollm import SmolLMConfig, load_pretrained
from smollm.checkpoint import verify_checkpoint, write_json

from . import cli, distributed
from .checkpointing import CHECKPOINTS_DIR
from .cli import log
from .config import ConfigError, TrainConfig
from .data import DataError
from .freeze import count_shared
from .monitor import BEST_DIR, Evaluation, RunMonitor, evaluation_interval, health_table, verdict
from .plots import plot_curves
from .policy import make_reference, make_trainable, save_policy
from .precision import precision_note
from .samples import format_sample, write_samples
from .tokenization import TokenizedPair, tokenize_pairs, without_end_of_turn
from .trainer import DPOTrainer

COMMAND = "dpo.train"
METRICS_NAME, EVAL_NAME, CURVES_NAME, FINAL_DIR, CONFIG_NAME = (
    cli.METRICS_NAME, "eval.json", "curves.png", "final", "train_config.json")
OUTPUTS = (METRICS_NAME, FINAL_DIR, CHECKPOINTS_DIR, EVAL_NAME)


# ----------------------------------------------------------------------- data
def tokenize_settings(config: TrainConfig, tokenizer) -> dict:
    """How the pairs are tokenized and truncated (dpo.tokenization.tokenize_pairs' settings); python -m
    dpo.inspect shows the pairs with these very settings."""
    return dict(max_length=config.max_length, eos_token_id=tokenizer.eos_token_id,
                max_prompt_length=config.max_prompt_length)


def as_trained(config: TrainConfig, pairs: list[TokenizedPair], eos_token_id: int) -> list[TokenizedPair]:
    """The training pairs as the loss reads them: by default (rejected_end_of_turn False) each rejected
    answer's closing end-of-turn token is masked out (`without_end_of_turn`). Held-out pairs are
    never changed, so held-out accuracy means the same in every run; python -m dpo.inspect shows
    the training split through this too."""
    if config.rejected_end_of_turn:
        return pairs
    return [without_end_of_turn(p, eos_token_id) for p in pairs]


def prepare_data(config: TrainConfig, tokenizer, model_config: SmolLMConfig
                 ) -> tuple[list[TokenizedPair], list[TokenizedPair], dict]:
    """Load, filter, split and tokenize; the held-out pairs never enter training."""
    train_raw, eval_raw, info = cli.load_and_split(config, tokenizer)
    kwargs = tokenize_settings(config, tokenizer)
    eval_pairs, eval_stats = tokenize_pairs(tokenizer, eval_raw, **kwargs)
    train_pairs, train_stats = tokenize_pairs(tokenizer, train_raw, **kwargs)
    train_pairs = as_trained(config, train_pairs[:config.num_pairs], tokenizer.eos_token_id)
    for name, stats in (("train", train_stats), ("eval", eval_stats)):
        log(f"tokenized {name}: {stats}")
    if not train_pairs:
        raise DataError("no training pair survived tokenization (every response was empty or cut away); "
                        f"try a larger --max-length than {config.max_length}")
    if len(train_pairs) < config.num_pairs:
        log(f"note: only {len(train_pairs)} training pairs are available (asked for {config.num_pairs})")
    too_big = max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in train_pairs + eval_pairs)
    if too_big > model_config.max_position_embeddings:
        raise ConfigError(f"--max-length {config.max_length} exceeds the model's max_position_embeddings "
                          f"{model_config.max_position_embeddings}")
    info.update(train_pairs=len(train_pairs), eval_pairs=len(eval_pairs),
                fingerprint=cli.fingerprint(train_pairs + eval_pairs))
    return train_pairs, eval_pairs, info


def stopped_early_note(evals: list[dict], streak: int, step: int, total_steps: int, config: TrainConfig) -> str:
    """What a resumed run says first when the run it continues had stopped early on health ("" if not)."""
    if not (config.stop_when_unhealthy and streak >= config.stop_when_unhealthy and step < total_steps and evals):
        return ""
    problems = "; ".join(evals[-1].get("problems", [])) or "outside the health bounds"
    return (f"note: this run stopped early at step {step} of {total_steps}: {streak} evaluation(s) in a row "
            f"outside the health bounds ({problems}). Resuming trains on from step {step}; it stops again at "
            f"the next evaluation outside the bounds (--stop-when-unhealthy {config.stop_when_unhealthy}; 0 "
            "trains to the end)")


def run(config: TrainConfig) -> dict:
    """The whole pipeline; returns the final eval dict. Raises the project's clear errors."""
    started = time.perf_counter()
    s = cli.start_run(config, COMMAND, OUTPUTS)
    config, resume_state, out, device = s.config, s.resume_state, s.out, s.device
    model_dir, model_config, tokenizer = s.model_dir, s.model_config, s.tokenizer
    verify_checkpoint(model_dir)  # headers only: a bad file fails before the data work
    train_pairs, eval_pairs, data_info = prepare_data(config, tokenizer, model_config)
    cli.check_same_data(resume_state, data_info["fingerprint"])

    policy = load_pretrained(model_dir, device=device)
    torch.manual_seed(config.seed)  # LoRA's initialisation and dropout: the same run for the same seed
    lora = config.lora_config(model_config.num_hidden_layers)
    trainable = make_trainable(policy, lora, train_last_n=config.blocks_to_train(model_config.num_hidden_layers),
                               train_head=not config.freeze_head)
    log(str(trainable))
    reference = make_reference(policy, lora) if config.needs_reference else None
    if reference is None:
        log(f"reference-free loss ({' '.join(config.loss_type)}): no reference model is built and no reference "
            "forward runs; evaluations compare the policy with the starting model, measured once")
    elif lora is not None:
        shared = count_shared(policy, reference)
        log(f"reference: the policy with its adapters off, sharing {shared:,} of its "
            f"{reference.num_parameters():,} parameters with the policy (nothing copied)")
    cli.shard_if_asked(config, policy, reference, device)
    trainer = DPOTrainer(policy, reference, train_pairs, config, pad_token_id=tokenizer.pad_token_id, device=device)
    log(f"compute: {precision_note(config.dtype, trainer.autocast_dtype, device)}")
    is_main = distributed.current().is_main  # in a torchrun job only rank 0 writes files and prints

    def save_to(directory: Path, **kw) -> None:  # final/ and best/: a HF folder, or peft's with LoRA
        save_policy(policy, directory, tokenizer=tokenizer, lora=lora, base_model=config.model,
                    merge=config.merge_lora, **kw)

    if resume_state:
        cli.restore(trainer, resume_state, out)
        evals = [e for e in resume_state[1].get("evals", []) if e["step"] <= trainer.step]
        monitor = RunMonitor(trainer, tokenizer, eval_pairs, config, out, log, history=evals, save=save_to)
        stopped = stopped_early_note(evals, monitor.unhealthy_streak, trainer.step, trainer.total_steps, config)
        if stopped:
            log(stopped)
        if reference is None and trainer.step > 0:  # the starting model's side, measured once more
            start = load_pretrained(model_dir, device=device)
            monitor.measure_start(start)
            del start
    else:
        previous = (METRICS_NAME, EVAL_NAME, CURVES_NAME, "samples.md", "samples.jsonl", FINAL_DIR, BEST_DIR,
                    CHECKPOINTS_DIR)
        cli.new_run_dir(out, config, CONFIG_NAME, previous if config.overwrite else ())
        monitor = RunMonitor(trainer, tokenizer, eval_pairs, config, out, log, save=save_to)
        if eval_pairs:
            before = monitor.evaluate().result
            log(f"before training: reference accuracy {before.reference_accuracy:.1%} on {len(eval_pairs)} held-out pairs")
    evals = monitor.history  # every evaluation's record, saved in each checkpoint
    tracker = cli.open_tracker(config, out, COMMAND, trainer.step)  # --report-to (dpo.tracking)
    if not resume_state:
        for record in evals:  # the evaluation before training
            tracker.log_evaluation(record)
    eval_every = evaluation_interval(config.eval_every)
    checkpoints = cli.Checkpoints(trainer, out, COMMAND, config.keep_checkpoints,
                                  lambda: dict(data_fingerprint=data_info["fingerprint"], evals=evals),
                                  resumed_from=resume_state[2] if resume_state else None)
    state: dict = {"unhealthy": "", "latest": None, "stopped_early": None}

    def after_step(m: dict) -> bool:
        """Evaluate every --eval-every steps; True to stop early on health."""
        if not (eval_every and trainer.step % eval_every == 0 and eval_pairs and not trainer.done):
            return False
        state["latest"] = evaluation = monitor.evaluate()
        m.update({f"eval_{k}": v for k, v in evaluation.result.to_dict().items()})
        m.update({f"health_{k}": v for k, v in evaluation.health.items() if isinstance(v, (int, float))})
        state["unhealthy"] = "DEGRADING: see the log" if evaluation.problems else ""
        if config.stop_when_unhealthy and monitor.unhealthy_streak >= config.stop_when_unhealthy:
            state["stopped_early"] = {"step": trainer.step, "of": trainer.total_steps,
                                      "unhealthy_evaluations": monitor.unhealthy_streak}
            log(f"early stop at step {trainer.step} of {trainer.total_steps}: "
                f"{monitor.unhealthy_streak} evaluation(s) in a row outside the health bounds "
                "(--stop-when-unhealthy 0 trains on)")
            return True
        return False

    def postfix(m: dict) -> dict:
        shown = dict(loss=f"{m['loss']:.4f}", acc=f"{m['reward_accuracy']:.2f}",
                     margin=f"{m['margin']:+.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
        return {**shown, "health": state["unhealthy"]} if state["unhealthy"] else shown

    cli.train_loop(trainer, config, out, checkpoints, desc="DPO", after_step=after_step, postfix=postfix,
                   tracker=tracker)
    checkpoints.save()  # the trained state, before the final evaluation and export
    latest: Evaluation | None = state["latest"]
    stopped_early = state["stopped_early"]

    # ------------------------------------------------------------------ the end
    result: dict = {"steps": trainer.step, "train_pairs": len(train_pairs), "data": data_info,
                    "skipped_nonfinite": trainer.skipped_nonfinite, "trainable": trainable.trainable,
                    "stopped_early": stopped_early}
    final_eval = None
    if eval_pairs:
        # the policy was just evaluated when early stopping ended the run: not twice
        final_eval = latest if latest is not None and latest.step == trainer.step else monitor.evaluate()
        result.update(final_eval.result.to_dict())
        tracker.log_evaluation(final_eval.record())  # (once: not again when its step's row carried it)
        tracker.log_samples(final_eval.samples, trainer.step)
        result.update(monitor.summary())
        if final_eval.samples and is_main:
            write_samples(final_eval.samples, out, header=f"Greedy answers to {len(final_eval.samples)} held-out "
                          f"prompts after {trainer.step} steps: the reference (the starting model) and the policy.")
    else:
        result.update(num_pairs=0, reference_accuracy=None, policy_accuracy=None, mean_margin=None)
    result["history"] = evals
    step_seconds = sum(r.get("seconds", 0.0) for r in cli.read_metrics(out / METRICS_NAME))
    result["timing"] = {  # wall: this session's, loading and evaluations included; steps/s: training steps only
        "wall_seconds": round(time.perf_counter() - started, 1),
        "step_seconds": round(step_seconds, 1),
        "steps_per_second": round(trainer.step / step_seconds, 4) if step_seconds else None,
        "evaluation_seconds": monitor.seconds}  # [step, seconds] of each evaluation
    result["memory"] = {**cli.peak_memory(device), "reference_model": reference is not None}
    d = distributed.current()
    if d.enabled:
        result["distributed"] = {"processes": d.world_size, "backend": d.backend, "fsdp": config.fsdp}
    save_to(out / FINAL_DIR)  # (gathered from every rank under FSDP)
    if not is_main:
        return result
    write_json(out / EVAL_NAME, result)
    tracker.log_summary(result, trainer.step)
    tracker.close()
    try:
        plot_curves(cli.read_metrics(out / METRICS_NAME), out / CURVES_NAME, evals, "+".join(config.loss_type))
    except (ImportError, OSError, ValueError, RuntimeError) as e:  # the curves are a convenience
        log(f"note: could not draw {out / CURVES_NAME}: {e}")
    if final_eval is not None:
        for sample in final_eval.samples[:2]:
            print(format_sample(sample) + "\n")
        print(final_eval.result.table())
        table = health_table(final_eval.health)
        if table:
            print(table)
        print(verdict(monitor.summary(), out))
        if stopped_early:
            print(f"Training stopped early at step {stopped_early['step']} of {stopped_early['of']}: the policy "
                  "left the health bounds (--stop-when-unhealthy 0 trains to the end).")
    timing = result["timing"]
    evals_s = sum(sec for _, sec in monitor.seconds)
    print(f"time: {timing['wall_seconds'] / 60:.1f} min wall: {timing['step_seconds'] / 60:.1f} min for {trainer.step} "
          f"steps ({timing['steps_per_second'] or 0:.3f} steps/s), {evals_s / 60:.1f} min for "
          f"{len(monitor.seconds)} evaluations, the rest loading and writing; peak memory "
          f"{result['memory']['peak_rss_mb']:,.0f} MB" + ("" if reference is not None else " (no reference model)"))
    written = [METRICS_NAME, EVAL_NAME, CURVES_NAME] + (
        ["samples.md", "samples.jsonl"] if final_eval is not None and final_eval.samples else [])
    print(f"wrote {', '.join(str(out / n) for n in written)} and {out / FINAL_DIR}/"
          + (f" ({BEST_DIR}/: the best healthy evaluation)" if (out / BEST_DIR).is_dir() else ""))
    return result


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 with one line `error: ...`, 130/143 when interrupted (dpo.cli.main)."""
    return cli.main(run, TrainConfig, COMMAND, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
