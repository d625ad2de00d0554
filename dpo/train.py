"""`python -m dpo.train`: the whole DPO pipeline in one command.

    load pairs -> NLTK strong-preference filter -> hold out eval pairs -> tokenize
    -> load policy, freeze all but the last N blocks, frozen reference copy
    -> train (metrics.jsonl, checkpoints), evaluating accuracy and health every --eval-every steps
    -> evaluate reference vs policy: accuracy, health, side-by-side samples (eval.json, samples.md)
    -> curves.png, final/ (HF format + tokenizer), best/ (the best healthy evaluation)

Accuracy alone is not success: a policy can win on held-out preferences while its answers decay
into whitespace. Every evaluation also measures the policy's health (dpo.health); a problem is
a warning in the log and on the progress bar, and the final table says the model collapsed.

Everything that can be checked is checked before the expensive work starts, and the output
directory is created only once the data and model are known to be usable.

What a run survives (docs/reliability.md has each guarantee and its test):
* SIGKILL / a crash: resumable checkpoints (--save-every) are written atomically;
  `--resume RUN_DIR` continues from the latest and ends bitwise where an uninterrupted run would.
* Ctrl-C (SIGINT) / SIGTERM: the current step finishes, a checkpoint is saved, its path is
  printed, and the exit code is 130 / 143 without a traceback.
* A non-finite loss or gradient stops with the step and the pairs (--skip-nonfinite skips it).
* Bad data, models or flags: one line `error: ...` and exit code 2.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from smollm import SmolLMConfig, load_pretrained, load_tokenizer
from smollm.checkpoint import CheckpointError, atomic_path, resolve_checkpoint_dir, verify_checkpoint, write_json
from smollm.hub import HubError
from smollm.tokenizer import TokenizerError

from .checkpointing import (CHECKPOINTS_DIR, CheckpointLoadError, list_checkpoints, load_checkpoint,
                            save_checkpoint)
from .config import ConfigError, TrainConfig, build_parser, config_from_args
from .data import DataError, load_preferences_with_report, train_eval_split
from .freeze import count_shared
from .monitor import BEST_DIR, Evaluation, RunMonitor, evaluation_interval, health_table, verdict
from .plots import plot_curves
from .policy import make_reference, make_trainable, save_policy
from .precision import precision_note
from .samples import format_sample, write_samples
from .tokenization import TokenizedPair, tokenize_pairs
from .trainer import DPOTrainer, NonFiniteError

METRICS_NAME, EVAL_NAME, CURVES_NAME, FINAL_DIR, CONFIG_NAME = (
    "metrics.jsonl", "eval.json", "curves.png", "final", "train_config.json")


def log(msg: str = "") -> None:
    """A message on stderr, on its own lines above the progress bar while one is shown."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


# ----------------------------------------------------------------------- data
def prepare_data(config: TrainConfig, tokenizer, model_config: SmolLMConfig
                 ) -> tuple[list[TokenizedPair], list[TokenizedPair], dict]:
    """Load, filter, split and tokenize; the held-out pairs never enter training."""
    pairs, load_report = load_preferences_with_report(
        config.data, split=config.data_split, skip_bad_records=config.skip_bad_records, skip_unusable=True)
    if load_report.fallback:
        log(load_report.fallback)
    source = "the bundled HH-RLHF test splits" if load_report.fallback else ", ".join(config.data)
    log(f"loaded {len(pairs)} preference pairs from {source}")
    if load_report.total_skipped:
        log(str(load_report))
    info: dict = {"loaded": len(pairs)}
    need = config.num_pairs + config.eval_pairs
    import random

    random.Random(config.seed).shuffle(pairs)
    if not config.filter:
        kept = pairs
    else:
        from .filtering import filter_pairs

        # Ask for a few more than needed: tokenization may drop a pair with no response left.
        kept, report = filter_pairs(pairs, limit=math.ceil(need * 1.05) + 8,
                                    num_workers=config.filter_workers, progress=config.progress)
        log(report.format())
        info["filter"] = {"total": report.total, "kept": report.kept, "rejected": report.rejected,
                          "pairs_per_s": report.pairs_per_s}
    if len(kept) < config.eval_pairs + 1:
        need_msg = (f"need at least {config.eval_pairs + 1} (--eval-pairs {config.eval_pairs} "
                    "+ 1 to train)")
        if config.filter:
            raise DataError(f"the strong-preference filter kept only {len(kept)} of {info['filter']['total']} "
                            f"pairs; {need_msg}. Use more data, fewer --eval-pairs, or --no-filter to "
                            "train on the pairs as they are.")
        raise DataError(f"only {len(kept)} usable pairs were loaded; {need_msg}. "
                        "Use more data or fewer --eval-pairs.")
    train_raw, eval_raw = train_eval_split(kept, config.eval_pairs, seed=config.seed)
    train_raw = format_for_model(train_raw[:math.ceil(config.num_pairs * 1.05) + 8], tokenizer,
                                 config.chat_template, "train")
    eval_raw = format_for_model(eval_raw, tokenizer, config.chat_template, "eval")
    eos = tokenizer.eos_token_id
    kwargs = dict(max_length=config.max_length, eos_token_id=eos, max_prompt_length=config.max_prompt_length)
    eval_pairs, eval_stats = tokenize_pairs(tokenizer, eval_raw, **kwargs)
    train_pairs, train_stats = tokenize_pairs(tokenizer, train_raw, **kwargs)
    train_pairs = train_pairs[:config.num_pairs]
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
                fingerprint=_fingerprint(train_pairs + eval_pairs))
    return train_pairs, eval_pairs, info


def format_for_model(pairs: list, tokenizer, chat_template: str, name: str) -> list:
    """Render the pairs with the model's chat template (--chat-template auto and a tokenizer that
    has one), or leave their text as it is. The filter has already judged the plain text."""
    if chat_template == "none" or getattr(tokenizer, "chat_template", None) is None:
        return pairs
    from .chat import apply_chat_format

    rendered, report = apply_chat_format(pairs, tokenizer)
    log(f"chat template ({name}): {report}")
    return rendered


def _fingerprint(pairs: list[TokenizedPair]) -> str:
    """A hash of the exact token ids, to check that a resumed run sees the same data."""
    import hashlib

    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.chosen_ids, p.chosen_mask, p.rejected_ids, p.rejected_mask]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------- checks
def check_model_and_tokenizer(config: TrainConfig, model_config: SmolLMConfig, tokenizer) -> None:
    n = model_config.num_hidden_layers
    config.lora_config(n)  # a bad --lora-layers fails here, before the data work
    if config.train_last_n > n and not config.lora_r:  # with LoRA, the adapters train instead
        raise ConfigError(f"--train-last-n {config.train_last_n}: the model has only {n} blocks")
    if config.max_length > model_config.max_position_embeddings:
        raise ConfigError(f"--max-length {config.max_length} exceeds the model's max_position_embeddings "
                          f"({model_config.max_position_embeddings})")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size}: they do not belong together (pass the right --tokenizer)")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer defines no EOS token (set eos_token in tokenizer_config.json)")


def prepare_output_dir(config: TrainConfig) -> Path:
    """Check (never create) the output directory: it must be writable and hold no other run."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a directory")
    previous = [n for n in (METRICS_NAME, FINAL_DIR, CHECKPOINTS_DIR, EVAL_NAME) if (out / n).exists()]
    if previous and not config.overwrite and not config.resume:
        raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(previous)}); "
                          "pass --resume to continue it, --overwrite to replace it, or another --output-dir")
    parent = out.absolute()
    while not parent.exists():  # the nearest existing folder is where it will be created
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out}: cannot write in {parent}")
    return out


# ----------------------------------------------------------------------- main
class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run. `checkpoint`: where its state was saved (None: not
    saved by this interruption). A KeyboardInterrupt, so a notebook treats it like Ctrl-C."""

    def __init__(self, signum: int, checkpoint: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint = signum, checkpoint


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only there can signals be handled


class _StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now, without a new checkpoint
            raise TrainingInterrupted(signum)
        self.signal = signum
        log(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut off by a crash
        if isinstance(row, dict) and (up_to_step is None or row.get("step", 0) <= up_to_step):
            rows.append(row)
    return rows


def _write_metrics(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# Flags that --resume takes from the command line (--skip-nonfinite only to switch it on, e.g. to
# get past a batch that stopped the run); every other setting comes from the checkpoint.
RESUME_OVERRIDES = ("resume", "progress", "max_steps", "skip_nonfinite")


def _resumed_config(config: TrainConfig, meta: dict, ckpt_dir: Path) -> TrainConfig:
    """The run's saved settings, with RESUME_OVERRIDES from `config`, writing where the run is."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(meta["config"]) - known)
    if unknown:
        raise CheckpointLoadError(f"{ckpt_dir}: written by another version (unknown settings {unknown})")
    saved = TrainConfig(**meta["config"])
    defaults = TrainConfig()
    ignored = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
               if f.name not in RESUME_OVERRIDES + ("output_dir",)
               and getattr(config, f.name) != getattr(defaults, f.name)
               and getattr(config, f.name) != getattr(saved, f.name)]
    if ignored:
        log(f"note: --resume continues the run with its saved settings; ignoring {', '.join(ignored)}")
    saved.resume, saved.progress = config.resume, config.progress
    if config.max_steps is not None:
        saved.max_steps = config.max_steps
    saved.skip_nonfinite = saved.skip_nonfinite or config.skip_nonfinite
    if ckpt_dir.parent.name == CHECKPOINTS_DIR:  # the run directory is where the checkpoint is
        saved.output_dir = str(ckpt_dir.parent.parent)
    return saved.check()


def _device(config: TrainConfig) -> torch.device:
    try:
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ConfigError(f"--device {config.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {config.device}: CUDA is not available on this machine")
    return device


def _latest_checkpoint_note(out: Path, flags: str = "") -> str:
    try:
        found = list_checkpoints(out)
    except OSError:
        found = []
    if not found:
        return "no checkpoint was saved"
    return f"the latest checkpoint is {found[-1]}; continue with: python -m dpo.train --resume {out}{flags}"


def run(config: TrainConfig) -> dict:
    """The whole pipeline; returns the final eval dict. Raises the project's clear errors."""
    config.check()
    started = time.perf_counter()
    resume_state = None
    if config.resume:
        tensors, meta, ckpt_dir = load_checkpoint(config.resume)
        config = _resumed_config(config, meta, ckpt_dir)
        resume_state = (tensors, meta, ckpt_dir)
        log(f"resuming from {ckpt_dir} (step {meta['step']}); the run's saved settings are used")
    out = prepare_output_dir(config)
    log("settings:\n" + str(config))

    device = _device(config)
    model_dir = resolve_checkpoint_dir(config.model)
    model_config = SmolLMConfig.from_json(model_dir / "config.json")
    tokenizer_source = config.tokenizer or model_dir
    if config.tokenizer is None and not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json; pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_source)
    check_model_and_tokenizer(config, model_config, tokenizer)
    verify_checkpoint(model_dir)  # headers only: a bad file fails before the data work
    train_pairs, eval_pairs, data_info = prepare_data(config, tokenizer, model_config)
    if resume_state and resume_state[1].get("data_fingerprint") not in (None, data_info["fingerprint"]):
        raise CheckpointLoadError(f"{resume_state[2]}: the data differs from the run being resumed "
                                  "(different files, filter or tokenizer)")

    policy = load_pretrained(model_dir, device=device)
    torch.manual_seed(config.seed)  # LoRA's initialisation and dropout: the same run for the same seed
    lora = config.lora_config(model_config.num_hidden_layers)
    trainable = make_trainable(policy, lora, train_last_n=config.train_last_n, train_head=not config.freeze_head)
    log(str(trainable))
    reference = make_reference(policy, lora)
    if lora is not None:
        shared = count_shared(policy, reference)
        log(f"reference: the policy with its adapters off, sharing {shared:,} of its "
            f"{reference.num_parameters():,} parameters with the policy (nothing copied)")
    trainer = DPOTrainer(policy, reference, train_pairs, config, pad_token_id=tokenizer.pad_token_id, device=device)
    log(f"compute: {precision_note(config.dtype, trainer.autocast_dtype, device)}")

    metrics_path = out / METRICS_NAME

    def save_to(directory: Path, **kw) -> None:  # final/ and best/: a HF folder, or peft's with LoRA
        save_policy(policy, directory, tokenizer=tokenizer, lora=lora, base_model=config.model,
                    merge=config.merge_lora, **kw)

    if resume_state:
        tensors, meta, ckpt_dir = resume_state
        try:
            trainer.load_state_dict(tensors, meta)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointLoadError(f"{ckpt_dir}: cannot be resumed with this model ({e})") from None
        out.mkdir(parents=True, exist_ok=True)
        history = _read_metrics(metrics_path, up_to_step=trainer.step)  # drop steps after the checkpoint
        _write_metrics(metrics_path, history)
        evals = [e for e in meta.get("evals", []) if e["step"] <= trainer.step]
        monitor = RunMonitor(trainer, tokenizer, eval_pairs, config, out, log, history=evals, save=save_to)
    else:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            for name in (METRICS_NAME, EVAL_NAME, CURVES_NAME, "samples.md", "samples.jsonl"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / FINAL_DIR, ignore_errors=True)
            shutil.rmtree(out / BEST_DIR, ignore_errors=True)
            shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
        write_json(out / CONFIG_NAME, config.to_dict())
        _write_metrics(metrics_path, [])
        monitor = RunMonitor(trainer, tokenizer, eval_pairs, config, out, log, save=save_to)
        if eval_pairs:
            before = monitor.evaluate().result
            log(f"before training: reference accuracy {before.reference_accuracy:.1%} on {len(eval_pairs)} held-out pairs")
    evals = monitor.history  # every evaluation's record, saved in each checkpoint
    eval_every = evaluation_interval(config.eval_every, trainer.total_steps)
    unhealthy = ""  # shown on the progress bar once an evaluation finds a problem
    latest: Evaluation | None = None  # the latest evaluation of this session
    stopped_early: dict | None = None  # why and when early stopping on health ended the run

    # This run's latest checkpoint from this session (the one resumed from counts): never written twice.
    last_saved: list[Path] = []
    if resume_state and resume_state[2].parent == out / CHECKPOINTS_DIR:
        last_saved.append(resume_state[2])

    def checkpoint() -> Path:
        if last_saved and last_saved[-1].name == f"step-{trainer.step:06d}" and last_saved[-1].is_dir():
            return last_saved[-1]  # this step is saved already (e.g. a signal right after --save-every)
        tensors, meta = trainer.state_dict()
        meta.update(data_fingerprint=data_info["fingerprint"], evals=evals)
        last_saved.append(save_checkpoint(out, tensors, meta, keep=config.keep_checkpoints))
        return last_saved[-1]

    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc="DPO", unit="step", dynamic_ncols=True)
    with _StopRequested() as stop, open(metrics_path, "a", encoding="utf-8") as metrics_file:
        while not trainer.done:
            try:
                m = trainer.train_step()
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}. Nothing of this step was applied; "
                                     f"{_latest_checkpoint_note(out, ' --skip-nonfinite')} "
                                     "(--skip-nonfinite skips and counts such batches; a lower --lr or "
                                     "--max-grad-norm may avoid them)") from None
            if eval_every and trainer.step % eval_every == 0 and eval_pairs and not trainer.done:
                latest = evaluation = monitor.evaluate()
                m.update({f"eval_{k}": v for k, v in evaluation.result.to_dict().items()})
                m.update({f"health_{k}": v for k, v in evaluation.health.items() if isinstance(v, (int, float))})
                unhealthy = "COLLAPSING: see the log" if evaluation.problems else ""
                if config.stop_when_unhealthy and monitor.unhealthy_streak >= config.stop_when_unhealthy:
                    stopped_early = {"step": trainer.step, "of": trainer.total_steps,
                                     "unhealthy_evaluations": monitor.unhealthy_streak}
                    log(f"early stop at step {trainer.step} of {trainer.total_steps}: "
                        f"{monitor.unhealthy_streak} evaluation(s) in a row outside the health bounds "
                        "(--stop-when-unhealthy 0 trains on)")
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()
            if bar is not None:
                bar.update(1)
                if "loss" in m:
                    postfix = dict(loss=f"{m['loss']:.4f}", acc=f"{m['reward_accuracy']:.2f}",
                                   margin=f"{m['margin']:+.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
                    if unhealthy:
                        postfix["health"] = unhealthy
                    bar.set_postfix(postfix)
            if config.save_every and trainer.step % config.save_every == 0 and not trainer.done:
                checkpoint()
            if stop.signal is not None:
                path = checkpoint()
                if bar is not None:
                    bar.close()
                log(f"checkpoint saved to {path}; continue with: python -m dpo.train --resume {out}")
                raise TrainingInterrupted(stop.signal, path)
            if stopped_early:
                break
    if bar is not None:
        bar.close()
    if trainer.skipped_nonfinite:
        log(f"skipped {trainer.skipped_nonfinite} step(s) with a non-finite loss or gradient")
    checkpoint()  # the trained state, before the final evaluation and export

    # ------------------------------------------------------------------ the end
    result: dict = {"steps": trainer.step, "train_pairs": len(train_pairs), "data": data_info,
                    "skipped_nonfinite": trainer.skipped_nonfinite, "trainable": trainable.trainable,
                    "stopped_early": stopped_early}
    final_eval = None
    if eval_pairs:
        # the policy was just evaluated when early stopping ended the run: not twice
        final_eval = latest if latest is not None and latest.step == trainer.step else monitor.evaluate()
        result.update(final_eval.result.to_dict())
        result.update(monitor.summary())
        if final_eval.samples:
            write_samples(final_eval.samples, out, header=f"Greedy answers to {len(final_eval.samples)} held-out "
                          f"prompts after {trainer.step} steps: the reference (the starting model) and the policy.")
    else:
        result.update(num_pairs=0, reference_accuracy=None, policy_accuracy=None, mean_margin=None)
    result["history"] = evals
    step_seconds = sum(r.get("seconds", 0.0) for r in _read_metrics(metrics_path))
    result["timing"] = {  # wall: this session's, loading and evaluations included; steps/s: training steps only
        "wall_seconds": round(time.perf_counter() - started, 1),
        "step_seconds": round(step_seconds, 1),
        "steps_per_second": round(trainer.step / step_seconds, 4) if step_seconds else None,
        "evaluation_seconds": monitor.seconds}  # [step, seconds] of each evaluation
    save_to(out / FINAL_DIR)
    write_json(out / EVAL_NAME, result)
    try:
        plot_curves(_read_metrics(metrics_path), out / CURVES_NAME, evals)
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
          f"{len(monitor.seconds)} evaluations, the rest loading and writing")
    written = [METRICS_NAME, EVAL_NAME, CURVES_NAME] + (
        ["samples.md", "samples.jsonl"] if final_eval is not None and final_eval.samples else [])
    print(f"wrote {', '.join(str(out / n) for n in written)} and {out / FINAL_DIR}/"
          + (f" ({BEST_DIR}/: the best healthy evaluation)" if (out / BEST_DIR).is_dir() else ""))
    return result


USER_ERRORS = (ConfigError, DataError, CheckpointError, CheckpointLoadError, HubError,
               TokenizerError, NonFiniteError)


def _run_dir(config: TrainConfig) -> Path:
    """Where `run(config)` writes: the resumed run's directory, or --output-dir."""
    if config.resume:
        path = Path(config.resume)
        return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path
    return Path(config.output_dir)


class _TerminateRaises:
    """Outside the training loop, SIGTERM stops the run like Ctrl-C (cleanups run, no traceback)."""

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle) if _in_main_thread() else None
        return self

    @staticmethod
    def _handle(signum, frame):
        raise TrainingInterrupted(signum)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 with one line `error: ...` for a problem the user can fix,
    128 + the signal's number (130 SIGINT, 143 SIGTERM) when interrupted."""
    from .filtering import MissingNLTKDataError

    parser = build_parser("python -m dpo.train", __doc__)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        with _TerminateRaises():
            run(config)
    except USER_ERRORS + (MissingNLTKDataError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError in newer versions
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        print(f"error: {first}. Lower --batch-size or --max-length (raise --grad-accum to keep the "
              f"effective batch); {_latest_checkpoint_note(_run_dir(config))}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ...: the checkpoints written so far are whole
        print(f"error: {e}; {_latest_checkpoint_note(_run_dir(config))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if getattr(e, "checkpoint", None) is None:  # else run() has said where it saved
            print(f"\ninterrupted ({signal.Signals(signum).name}); "
                  f"{_latest_checkpoint_note(_run_dir(config))}", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
