"""What `python -m dpo.train` and `python -m dpo.sft` share: loading, the training loop, and the CLI.

Both commands are the same run around one `Trainer` (dpo.trainer) with a different objective:

    settings (check) -> model + tokenizer (check) -> data: load, filter, split (-> command's own)
    -> the trainer -> `train_loop`: metrics.jsonl, progress bar, checkpoints, signals, NaN guard
    -> the command's own evaluation and files

so resuming, signals, the non-finite guard, progress and metrics behave the same in both. This
module owns those shared parts; each command's module owns only what is its own.

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
import random
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from smollm import SmolLMConfig, load_tokenizer
from smollm.checkpoint import CheckpointError, atomic_path, write_json
from smollm.heap import keep_freed_memory
from smollm.sources import HubError, resolve_checkpoint_dir
from smollm.tokenizer import TokenizerError

from .checkpointing import (CHECKPOINTS_DIR, CheckpointLoadError, checkpoint_name, list_checkpoints, load_checkpoint,
                            save_checkpoint)
from . import distributed, tracking
from .config import ConfigError, RunConfig, build_parser, config_from_args
from .data import DataError, PreferencePair, load_preferences_with_report, train_eval_split
from .trainer import NonFiniteError, Trainer

METRICS_NAME = "metrics.jsonl"
USER_ERRORS = (ConfigError, DataError, CheckpointError, CheckpointLoadError, HubError,
               TokenizerError, NonFiniteError)


def log(msg: str = "") -> None:
    """A message on stderr, on its own lines above the progress bar while one is shown (in a
    torchrun job, from rank 0 only)."""
    from tqdm import tqdm

    if not distributed.current().is_main:
        return
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


# ----------------------------------------------------------------------- model and data
def load_model_spec(config: RunConfig) -> tuple[Path, SmolLMConfig, Any]:
    """(checkpoint directory, model config, tokenizer) of --model and --tokenizer, checked
    against each other and the settings before any expensive work."""
    model_dir = resolve_checkpoint_dir(config.model)
    model_config = SmolLMConfig.from_json(model_dir / "config.json")
    if config.tokenizer is None and not (model_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{model_dir} has no tokenizer.json; pass --tokenizer")
    tokenizer = load_tokenizer(config.tokenizer or model_dir)
    check_model_and_tokenizer(config, model_config, tokenizer)
    return model_dir, model_config, tokenizer


def check_model_and_tokenizer(config: RunConfig, model_config: SmolLMConfig, tokenizer) -> None:
    n = model_config.num_hidden_layers
    config.lora_config(n)  # a bad --lora-layers fails here, before the data work
    if config.blocks_to_train(n) > n and not config.lora_r:  # with LoRA, the adapters train instead
        raise ConfigError(f"--train-last-n {config.train_last_n}: the model has only {n} blocks")
    if config.max_length > model_config.max_position_embeddings:
        raise ConfigError(f"--max-length {config.max_length} exceeds the model's max_position_embeddings "
                          f"({model_config.max_position_embeddings})")
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size}: they do not belong together (pass the right --tokenizer)")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer defines no EOS token (set eos_token in tokenizer_config.json)")


def load_and_split(config: RunConfig, tokenizer) -> tuple[list, list, dict]:
    """(train pairs, held-out pairs, info): load --data, shuffle by --seed, (NLTK-filter,) hold out
    --eval-pairs that never enter training, and render both with the chat template. Untokenized.
    In a torchrun job rank 0 does this work and sends the pairs to the other ranks."""
    return distributed.current().from_main(lambda: _load_and_split(config, tokenizer),
                                           encode=_pairs_to_json, decode=_pairs_from_json)


def _pairs_to_json(split: tuple[list, list, dict]) -> list:
    train, held_out, info = split
    return [[dataclasses.asdict(p) for p in train], [dataclasses.asdict(p) for p in held_out], info]


def _pairs_from_json(data: list) -> tuple[list, list, dict]:
    def pair(d: dict) -> PreferencePair:
        messages = {k: tuple(d[k]) for k in ("prompt_messages", "chosen_messages", "rejected_messages")
                    if d.get(k) is not None}
        return PreferencePair(**{**d, **messages})

    train, held_out, info = data
    return [pair(d) for d in train], [pair(d) for d in held_out], info


def _load_and_split(config: RunConfig, tokenizer) -> tuple[list, list, dict]:
    train_raw, eval_raw, info = select_pairs(config, load_pairs(config))
    train_raw = format_for_model(train_raw, tokenizer, config.chat_template, "train")
    eval_raw = format_for_model(eval_raw, tokenizer, config.chat_template, "eval")
    return train_raw, eval_raw, info


def load_pairs(config: RunConfig) -> list:
    """Every usable pair of --data, in file order (bad records per --skip-bad-records)."""
    pairs, load_report = load_preferences_with_report(
        config.data, split=config.data_split, subset=config.data_subset, skip_bad_records=config.skip_bad_records,
        skip_unusable=True)
    if load_report.fallback:
        log(load_report.fallback)
    source = "the bundled HH-RLHF test splits" if load_report.fallback else ", ".join(config.data)
    log(f"loaded {len(pairs)} preference pairs from {source}")
    if load_report.total_skipped:
        log(str(load_report))
    return pairs


def select_pairs(config: RunConfig, pairs: list) -> tuple[list, list, dict]:
    """(train candidates, held-out pairs, info) in their plain text: shuffle by --seed, NLTK-filter,
    hold out --eval-pairs. The train candidates are the first --num-pairs x 1.05 + 8 (tokenization may
    drop a few): a superset of the pairs the run trains on, which `dpo.judge` relies on."""
    pairs = list(pairs)
    info: dict = {"loaded": len(pairs)}
    random.Random(config.seed).shuffle(pairs)
    kept = pairs
    if config.filter:
        from .filtering import FilterThresholds, filter_pairs

        # Ask for a few more than needed: tokenization may drop a pair with no response left.
        need = config.num_pairs + config.eval_pairs
        kept, report = filter_pairs(pairs, FilterThresholds.only(config.filter_rules), limit=math.ceil(need * 1.05) + 8,
                                    num_workers=config.filter_workers, progress=config.progress)
        log(report.format())
        info["filter"] = {"total": report.total, "kept": report.kept, "rejected": report.rejected,
                          "pairs_per_s": report.pairs_per_s}
    else:
        log("no strong-preference filter: the pairs as they come (--filter applies it)")
    if len(kept) < config.eval_pairs + 1:
        need_msg = f"need at least {config.eval_pairs + 1} (--eval-pairs {config.eval_pairs} + 1 to train)"
        if config.filter:
            raise DataError(f"the strong-preference filter kept only {len(kept)} of {info['filter']['total']} "
                            f"pairs; {need_msg}. Use more data, fewer --eval-pairs, or --no-filter to "
                            "train on the pairs as they are.")
        raise DataError(f"only {len(kept)} usable pairs were loaded; {need_msg}. "
                        "Use more data or fewer --eval-pairs.")
    train_raw, eval_raw = train_eval_split(kept, config.eval_pairs, seed=config.seed)
    return train_raw[:math.ceil(config.num_pairs * 1.05) + 8], eval_raw, info


def format_for_model(pairs: list, tokenizer, chat_template: str, name: str) -> list:
    """Render the pairs with the model's chat template (--chat-template auto and a tokenizer that
    has one), or leave their text as it is. The filter has already judged the plain text."""
    if chat_template == "none" or getattr(tokenizer, "chat_template", None) is None:
        return pairs
    from .chat import apply_chat_format

    rendered, report = apply_chat_format(pairs, tokenizer)
    log(f"chat template ({name}): {report}")
    return rendered


def fingerprint(items: list) -> str:
    """A hash of the exact token ids of tokenized pairs or sequences, to check that a resumed run
    sees the same data."""
    import hashlib

    h = hashlib.sha256()
    for item in items:
        fields = dataclasses.astuple(item)
        h.update(json.dumps([f for f in fields if isinstance(f, list)]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------- output, device, resume
def prepare_output_dir(config: RunConfig, outputs: tuple[str, ...], command: str) -> Path:
    """Check (never create) the output directory: it must be writable and hold no other run."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a directory")
    previous = [n for n in outputs if (out / n).exists()]
    if previous and not config.overwrite and not config.resume:
        raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(previous)}); "
                          f"pass --resume to continue it, --overwrite to replace it, or another --output-dir")
    parent = out.absolute()
    while not parent.exists():  # the nearest existing folder is where it will be created
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {out}: cannot write in {parent}")
    return out


def device_of(config: RunConfig) -> torch.device:
    """--device (default: CUDA when there is one). In a torchrun job on CUDA, each process takes
    its own GPU: cuda:LOCAL_RANK."""
    try:
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ConfigError(f"--device {config.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {config.device}: CUDA is not available on this machine")
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# Flags that --resume takes from the command line (--skip-nonfinite only to switch it on, e.g. to
# get past a batch that stopped the run; --fsdp, like the number of processes, is how the run is
# laid out, not what it computes; --report-to, when given, where it is reported); every other
# setting comes from the checkpoint.
RESUME_OVERRIDES = ("resume", "progress", "max_steps", "skip_nonfinite", "fsdp", "report_to")


def resumed_config(config: RunConfig, meta: dict, ckpt_dir: Path, command: str):
    """The run's saved settings, with RESUME_OVERRIDES from `config`, writing where the run is."""
    cls = type(config)
    saved_by = meta.get("command", "dpo.train")  # checkpoints from before dpo.sft could resume
    if saved_by != command:
        raise CheckpointLoadError(f"{ckpt_dir}: a checkpoint of python -m {saved_by}; resume it with that command")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(meta["config"]) - known)
    if unknown:
        raise CheckpointLoadError(f"{ckpt_dir}: written by another version (unknown settings {unknown})")
    saved = cls(**meta["config"])
    defaults = cls()
    ignored = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)
               if f.name not in RESUME_OVERRIDES + ("output_dir",)
               and getattr(config, f.name) != getattr(defaults, f.name)
               and getattr(config, f.name) != getattr(saved, f.name)]
    if ignored:
        log(f"note: --resume continues the run with its saved settings; ignoring {', '.join(ignored)}")
    saved.resume, saved.progress, saved.fsdp = config.resume, config.progress, config.fsdp
    if config.report_to != defaults.report_to:
        saved.report_to = config.report_to
    if config.max_steps is not None:
        saved.max_steps = config.max_steps
    saved.skip_nonfinite = saved.skip_nonfinite or config.skip_nonfinite
    if ckpt_dir.parent.name == CHECKPOINTS_DIR:  # the run directory is where the checkpoint is
        saved.output_dir = str(ckpt_dir.parent.parent)
    return saved.check()


def start_or_resume(config: RunConfig, command: str):
    """(config, resume_state): the settings to run with, and (tensors, meta, checkpoint_dir) when
    --resume names a checkpoint (None otherwise)."""
    config.check()
    if not config.resume:
        return config, None
    tensors, meta, ckpt_dir = load_checkpoint(config.resume)
    config = resumed_config(config, meta, ckpt_dir, command)
    log(f"resuming from {ckpt_dir} (step {meta['step']}); the run's saved settings are used")
    return config, (tensors, meta, ckpt_dir)


def check_same_data(resume_state, data_fingerprint: str) -> None:
    """A resumed run must see the very tokens it was trained on (checked before the model loads)."""
    if resume_state and resume_state[1].get("data_fingerprint") not in (None, data_fingerprint):
        raise CheckpointLoadError(f"{resume_state[2]}: the data differs from the run being resumed "
                                  "(different files, filter or tokenizer)")


@dataclasses.dataclass
class RunStart:
    """What every training command knows before its data work: checked settings, where it writes,
    the device, the model's checkpoint and config, and the tokenizer."""

    config: RunConfig
    resume_state: tuple | None  # (tensors, meta, checkpoint_dir) with --resume
    out: Path
    device: torch.device
    model_dir: Path
    model_config: SmolLMConfig
    tokenizer: Any


def start_run(config: RunConfig, command: str, outputs: tuple[str, ...]) -> RunStart:
    """Check the settings (or take a resumed run's), the output directory, the device, the model
    and the tokenizer: everything that can fail before the expensive work."""
    d = distributed.init_from_env(device_of(config).type)  # a torchrun job: join it (no-op for one process)
    config, resume_state = start_or_resume(config, command)
    tracking.check_installed(config.report_to)  # a missing tracker package: one line, before any work
    out = prepare_output_dir(config, outputs, command)
    device = device_of(config)
    if config.fsdp and d.backend is None:
        raise ConfigError("--fsdp shards the model over the processes of a torchrun job; launch with "
                          "torchrun --nproc_per_node N, or leave --fsdp out")
    log("settings:\n" + str(config))
    if d.enabled:
        log(f"torchrun job: {d.world_size} processes ({d.backend}), each taking 1/{d.world_size} of every "
            f"batch; {'blocks sharded with FSDP2' if config.fsdp else 'the model replicated, gradients summed'}")
    model_dir, model_config, tokenizer = load_model_spec(config)
    return RunStart(config, resume_state, out, device, model_dir, model_config, tokenizer)


def shard_if_asked(config: RunConfig, policy, reference, device: torch.device) -> None:
    """With --fsdp, shard the blocks over the job's processes (dpo.distributed.shard_blocks), before
    the trainer is built."""
    if config.fsdp:
        sharded = distributed.shard_blocks(policy, reference, device)
        log(f"FSDP: {sharded} blocks sharded over {distributed.current().world_size} processes")


def new_run_dir(out: Path, config: RunConfig, config_name: str, replace: tuple[str, ...] = ()) -> None:
    """Make the output directory of a new run: remove `replace` (a previous run's files and folders,
    with --overwrite), write the settings and an empty metrics.jsonl. In a torchrun job rank 0 does
    it and every rank waits until it is done."""
    if distributed.current().is_main:
        out.mkdir(parents=True, exist_ok=True)
        for name in replace + ((tracking.TENSORBOARD_DIR, tracking.WANDB_DIR) if replace else ()):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        write_json(out / config_name, config.to_dict())
        write_metrics(out / METRICS_NAME, [])
    distributed.current().barrier()


def restore(trainer: Trainer, resume_state, out: Path) -> list[dict]:
    """Load a checkpoint into `trainer` and cut metrics.jsonl back to its step; returns the kept rows."""
    tensors, meta, ckpt_dir = resume_state
    try:
        trainer.load_state_dict(tensors, meta)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointLoadError(f"{ckpt_dir}: cannot be resumed with this model ({e})") from None
    history = read_metrics(out / METRICS_NAME, up_to_step=trainer.step)  # drop steps after the checkpoint
    if distributed.current().is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_metrics(out / METRICS_NAME, history)
    return history


def open_tracker(config: RunConfig, out: Path, command: str, step: int) -> tracking.Tracker:
    """The run's --report-to tracker (dpo.tracking), for rank 0 alone; a resumed run (`step` > 0)
    continues its count of tokens trained on from metrics.jsonl."""
    seen = sum(r.get("tokens", 0) for r in read_metrics(out / METRICS_NAME, up_to_step=step)) if step else 0
    return tracking.open_tracker(config.report_to, out, config=config.to_dict(), command=command, start_step=step,
                                 tokens_seen=seen, is_main=distributed.current().is_main, log=log)


def latest_checkpoint_note(out: Path, command: str, flags: str = "") -> str:
    try:
        found = list_checkpoints(out)
    except OSError:
        found = []
    if not found:
        return "no checkpoint was saved"
    return f"the latest checkpoint is {found[-1]}; continue with: python -m {command} --resume {out}{flags}"


def run_dir(config: RunConfig) -> Path:
    """Where a run writes: the resumed run's directory, or --output-dir."""
    if config.resume:
        path = Path(config.resume)
        return path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path
    return Path(config.output_dir)


def peak_memory(device: torch.device) -> dict:
    """The process's peak resident memory (MB; everything it ever held: models, optimizer, data)
    and, on CUDA, torch's peak allocated device memory (MB)."""
    import resource

    unit = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit, 1)}
    if device.type == "cuda":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


# ----------------------------------------------------------------------- metrics.jsonl
def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
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


def write_metrics(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ----------------------------------------------------------------------- signals
class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run. `checkpoint`: where its state was saved (None: not
    saved by this interruption). A KeyboardInterrupt, so a notebook treats it like Ctrl-C."""

    def __init__(self, signum: int, checkpoint: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint = signum, checkpoint


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only there can signals be handled


class StopRequested:
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


class TerminateRaises:
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


# ----------------------------------------------------------------------- the loop
class Checkpoints:
    """The run's resumable checkpoints: `save()` writes the trainer's state (once per step) with
    `meta()`'s extra fields, keeping the newest --keep-checkpoints."""

    def __init__(self, trainer: Trainer, out: Path, command: str, keep: int, meta: Callable[[], dict],
                 resumed_from: Path | None = None):
        self.trainer, self.out, self.command, self.keep, self.meta = trainer, out, command, keep, meta
        # This run's latest checkpoint from this session (the one resumed from counts): never written twice.
        self.saved: list[Path] = []
        if resumed_from is not None and resumed_from.parent == out / CHECKPOINTS_DIR:
            self.saved.append(resumed_from)

    def save(self) -> Path:
        """Write the trainer's state now (in a torchrun job: every rank gathers, rank 0 writes)."""
        step = self.trainer.step
        if self.saved and self.saved[-1].name == checkpoint_name(step):
            return self.saved[-1]  # this step is saved already (e.g. a signal right after --save-every)
        tensors, meta = self.trainer.state_dict()
        d = distributed.current()
        if d.is_main:
            meta.update(command=self.command, **self.meta())
            self.saved.append(save_checkpoint(self.out, tensors, meta, keep=self.keep))
        else:
            self.saved.append(self.out / CHECKPOINTS_DIR / checkpoint_name(step))
        d.barrier()  # rank 0 has written it: every rank can name it
        return self.saved[-1]


def train_loop(trainer: Trainer, config: RunConfig, out: Path, checkpoints: Checkpoints, *, desc: str,
               after_step: Callable[[dict], bool] | None = None,
               postfix: Callable[[dict], dict] | None = None,
               tracker: tracking.Tracker | None = None) -> None:
    """Train to the end: one metrics.jsonl row per step, the progress bar, --save-every checkpoints,
    SIGINT/SIGTERM (save, then raise TrainingInterrupted) and the non-finite guard.

    after_step(metrics) may add to the step's metrics row (e.g. an evaluation) and returns True to
    stop early. postfix(metrics) gives the progress bar's fields. tracker (--report-to) gets each
    row as it is written.

    In a torchrun job every rank runs this loop (the steps, evaluations and checkpoints are
    collective), rank 0 alone writes metrics.jsonl and shows the bar, and a signal received by
    any rank stops all of them after the same step.
    """
    command = checkpoints.command
    d = distributed.current()
    bar = None
    if config.progress and d.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc=desc, unit="step", dynamic_ncols=True)
    metrics_path = out / METRICS_NAME if d.is_main else Path(os.devnull)
    with StopRequested() as stop, open(metrics_path, "a", encoding="utf-8") as metrics_file:
        while not trainer.done:
            try:
                m = trainer.train_step()
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}. Nothing of this step was applied; "
                                     f"{latest_checkpoint_note(out, command, ' --skip-nonfinite')} "
                                     "(--skip-nonfinite skips and counts such batches; a lower --lr or "
                                     "--max-grad-norm may avoid them)") from None
            stop_early = bool(after_step(m)) if after_step is not None else False
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()
            if tracker is not None:
                tracker.log_row(m)
            if bar is not None:
                bar.update(1)
                if "loss" in m:
                    bar.set_postfix(postfix(m) if postfix else dict(loss=f"{m['loss']:.4f}"))
            if config.save_every and trainer.step % config.save_every == 0 and not trainer.done:
                checkpoints.save()
            if d.any(stop.signal is not None):
                path = checkpoints.save()
                if bar is not None:
                    bar.close()
                log(f"checkpoint saved to {path}; continue with: python -m {command} --resume {out}")
                raise TrainingInterrupted(stop.signal or signal.SIGTERM, path)
            if stop_early:
                break
    if bar is not None:
        bar.close()
    if trainer.skipped_nonfinite:
        log(f"skipped {trainer.skipped_nonfinite} step(s) with a non-finite loss or gradient")


# ----------------------------------------------------------------------- main
def main(run: Callable, config_cls: type, command: str, description: str, argv: list[str] | None = None) -> int:
    """A training command's CLI: 0 on success, 2 with one line `error: ...` for a problem the user
    can fix, 128 + the signal's number (130 SIGINT, 143 SIGTERM) when interrupted.

    In a torchrun job the user's errors (settings, model, data, a non-finite step) are the same on
    every rank, so rank 0 alone reports them; other failures say which rank they come from. After
    a run that ended well, the ranks leave together: the others wait at a barrier while rank 0
    writes the run's last files, so that nothing a follower does on its way out (its exit, or a
    crash in it, which makes torchrun stop every rank) can cut those files short."""
    from .filtering import MissingNLTKDataError

    args = build_parser(f"python -m {command}", description, cls=config_cls).parse_args(argv)
    config = config_from_args(args, config_cls)
    keep_freed_memory()  # big CPU tensors reuse freed memory, not fresh pages (smollm.heap: the default run 8-12% faster)

    def say(msg: str, everywhere: bool = False) -> None:
        d = distributed.current()
        if d.is_main:
            print(msg, file=sys.stderr)
        elif everywhere:
            print(f"[rank {d.rank}] {msg.lstrip()}", file=sys.stderr)

    try:
        with TerminateRaises():
            run(config)
            distributed.current().barrier()  # (only after a run that ended well: a failed rank never comes)
    except USER_ERRORS + (MissingNLTKDataError,) as e:
        say(f"error: {e}")
        return 2
    except distributed.FollowerStop:
        return 2  # rank 0 reports why
    except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError in newer versions
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        say(f"error: {first}. Lower --batch-size or --max-length (raise --grad-accum to keep the "
            f"effective batch); {latest_checkpoint_note(run_dir(config), command)}", everywhere=True)
        return 2
    except OSError as e:  # disk full, permission denied, ...: the checkpoints written so far are whole
        say(f"error: {e}; {latest_checkpoint_note(run_dir(config), command)}", everywhere=True)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if getattr(e, "checkpoint", None) is None:  # else run() has said where it saved
            say(f"\ninterrupted ({signal.Signals(signum).name}); "
                f"{latest_checkpoint_note(run_dir(config), command)}")
        return 128 + signum
    finally:
        tracking.close_all()  # a tracker the run did not close: the run failed or was interrupted
        distributed.shutdown()
    return 0
