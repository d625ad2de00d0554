"""Experiment tracking: `--report-to tensorboard wandb trackio` sends a run's numbers where TRL users look.

What a run writes to metrics.jsonl (one row per step) and eval.json (every evaluation, the
samples, the summary) goes to each chosen backend too, under the names TRL's DPOTrainer logs
(transformers' `rewrite_logs`: "train/..." for a training step, "eval/..." for an evaluation):

    metrics.jsonl key       logged as                 eval record key          logged as
    loss                    train/loss                reward_accuracy          eval/rewards/accuracies
    chosen_reward           train/rewards/chosen      mean_margin              eval/rewards/margins
    rejected_reward         train/rewards/rejected    policy_chosen_logp       eval/logps/chosen
    reward_accuracy         train/rewards/accuracies  policy_rejected_logp     eval/logps/rejected
    margin                  train/rewards/margins     reference_chosen_logp    eval/ref_logps/chosen
    policy_chosen_logp      train/logps/chosen        reference_rejected_logp  eval/ref_logps/rejected
    policy_rejected_logp    train/logps/rejected      policy_accuracy          eval/preference_accuracy/policy
    lr                      train/learning_rate       reference_accuracy       eval/preference_accuracy/reference
    grad_norm, epoch        train/grad_norm, /epoch   nll (dpo.sft)            eval/loss
    tokens (summed)         train/num_tokens          health: {k: v}           eval/health/k
    tokens, pairs,          train/tokens, /pairs,     healthy                  eval/healthy (1 or 0)
    seconds, tokens_per_s   /step_seconds, /tokens_per_second

Any other number keeps its own name under train/ or eval/ (`train_metrics`, `eval_metrics`).
The step is the optimizer step (0: the evaluation before training). Where the backend has
tables (wandb, trackio; TensorBoard gets a Markdown text), the final samples go in as the table
"eval/samples" (prompt, reference, policy answers). eval.json's other numbers (steps, the best
step, timing, memory) become the run's summary.

Each backend is an optional package, imported only when asked for (`pip install tensorboard`,
`wandb`, `trackio`; or `pip install "smollm-dpo[tracking]"` for all three); a missing one stops
the run before any work with one line naming it. Every one works without a network:

* tensorboard: event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`). A resumed
  run writes to the same folder and hides what the interrupted one logged after its checkpoint.
* wandb: RUN_DIR/wandb/offline-run-*. Unless WANDB_MODE is set, it is set to "offline" (said in
  the log): `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later; WANDB_MODE=online logs live.
  WANDB_PROJECT names the project (default "smollm-dpo").
* trackio: its local SQLite store (TRACKIO_DIR, default HF_HOME/trackio; `trackio show`);
  TRACKIO_PROJECT names the project (default "smollm-dpo"). Its Space or server upload happens
  only when you set TRACKIO_SPACE_ID or TRACKIO_SERVER_URL yourself.

In a torchrun job, rank 0 alone logs: the metrics rows it writes are already summed over the
ranks (dpo.trainer), and the other ranks get a tracker that does nothing.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from smollm.config import ConfigError

BACKENDS = ("tensorboard", "wandb", "trackio")
REPORT_TO_CHOICES = ("none",) + BACKENDS
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # backend -> pip package
DEFAULT_PROJECT = "smollm-dpo"
TENSORBOARD_DIR = "tensorboard"  # inside the run directory
WANDB_DIR = "wandb"  # wandb makes it inside the run directory it is given
SAMPLES_KEY = "eval/samples"

# metrics.jsonl keys -> TRL's names (after "train/")
TRAIN_NAMES = {
    "loss": "loss", "grad_norm": "grad_norm", "lr": "learning_rate", "epoch": "epoch",
    "chosen_reward": "rewards/chosen", "rejected_reward": "rewards/rejected",
    "reward_accuracy": "rewards/accuracies", "margin": "rewards/margins",
    "policy_chosen_logp": "logps/chosen", "policy_rejected_logp": "logps/rejected",
    # ours, no TRL equivalent: per-step counts and speed
    "tokens": "tokens", "pairs": "pairs", "response_tokens": "response_tokens",
    "seconds": "step_seconds", "tokens_per_s": "tokens_per_second", "skipped_nonfinite": "skipped_nonfinite",
}
# evaluation record keys (dpo.monitor.Evaluation.record(), dpo.sft's before/after) -> names after "eval/"
EVAL_NAMES = {
    "reward_accuracy": "rewards/accuracies", "mean_margin": "rewards/margins",
    "policy_chosen_logp": "logps/chosen", "policy_rejected_logp": "logps/rejected",
    "reference_chosen_logp": "ref_logps/chosen", "reference_rejected_logp": "ref_logps/rejected",
    "policy_accuracy": "preference_accuracy/policy", "reference_accuracy": "preference_accuracy/reference",
    "num_pairs": "num_pairs", "healthy": "healthy",
    "nll": "loss", "perplexity": "perplexity", "response_tokens": "response_tokens",  # dpo.sft
}
# metrics.jsonl rows of a step with an evaluation carry it as eval_<record key> and health_<health key>
ROW_EVAL_PREFIX, ROW_HEALTH_PREFIX = "eval_", "health_"
SAMPLE_COLUMNS = ("prompt", "reference", "policy", "reference_stopped", "policy_stopped")
SUMMARY_SKIP = ("history", "health", "problems", "thresholds", "evaluation_seconds")  # logged per evaluation


def check_report_to(report_to: Sequence[str]) -> list[str]:
    """The backends of --report-to (an empty list for "none"); a bad combination raises ConfigError."""
    names = list(report_to)
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ConfigError(f"--report-to: unknown {', '.join(map(repr, unknown))} "
                          f"(choose from {', '.join(REPORT_TO_CHOICES)})")
    if not names:
        raise ConfigError("--report-to: give none, or one or more of " + ", ".join(BACKENDS))
    if "none" in names and len(names) > 1:
        raise ConfigError(f"--report-to: 'none' cannot be combined with {', '.join(n for n in names if n != 'none')}")
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_installed(report_to: Sequence[str]) -> None:
    """Refuse, before any work, a backend whose package is missing: one line naming it."""
    for name in check_report_to(report_to):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]} "
                              f"(or pip install \"smollm-dpo[{name}]\")")


# ----------------------------------------------------------------------- names
def _number(value: Any) -> float | None:
    """A loggable scalar (bools as 0/1), or None for anything else (text, lists, None)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def train_metrics(row: dict) -> dict[str, float]:
    """A metrics.jsonl row's training numbers under TRL's names ("train/..."); its evaluation
    columns (eval_*, health_*) are left to `row_evaluation`."""
    out = {}
    for key, value in row.items():
        if key == "step" or key.startswith((ROW_EVAL_PREFIX, ROW_HEALTH_PREFIX)):
            continue
        number = _number(value)
        if number is not None:
            out["train/" + TRAIN_NAMES.get(key, key)] = number
    return out


def eval_metrics(record: dict) -> dict[str, float]:
    """An evaluation record's numbers under TRL's names ("eval/..."), its health figures as
    eval/health/<name>, and how many health problems it had."""
    out = {}
    for key, value in record.items():
        if key == "health" and isinstance(value, dict):
            out.update({f"eval/health/{k}": n for k, v in value.items() if (n := _number(v)) is not None})
        elif key == "problems" and isinstance(value, list):
            out["eval/health/problems"] = float(len(value))
        elif key != "step" and (number := _number(value)) is not None:
            out["eval/" + EVAL_NAMES.get(key, key)] = number
    return out


def row_evaluation(row: dict) -> dict | None:
    """The evaluation a metrics.jsonl row carries (dpo.train adds eval_* and health_* columns to
    the row of a step it evaluated after), as a record for `eval_metrics`; None without one."""
    result = {k[len(ROW_EVAL_PREFIX):]: v for k, v in row.items() if k.startswith(ROW_EVAL_PREFIX)}
    health = {k[len(ROW_HEALTH_PREFIX):]: v for k, v in row.items() if k.startswith(ROW_HEALTH_PREFIX)}
    if not result and not health:
        return None
    return {"step": row.get("step", 0), **result, **({"health": health} if health else {})}


def summary_metrics(result: dict) -> dict[str, float]:
    """eval.json's numbers that no step logged (steps, the best evaluation, timing, memory, ...),
    flattened with "/" ("best/step", "timing/wall_seconds")."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if not prefix and k in SUMMARY_SKIP:
                    continue
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif (number := _number(value)) is not None:
            out[prefix] = number

    walk("", result)
    return out


def sample_rows(samples: Sequence[Any]) -> tuple[list[str], list[list]]:
    """(columns, rows) of the samples table: prompt, reference and policy answers (and whether
    each answer ended by itself), one row per held-out prompt."""
    dicts = [s if isinstance(s, dict) else dataclasses.asdict(s) for s in samples]
    columns = [c for c in SAMPLE_COLUMNS if dicts and c in dicts[0]]
    return columns, [[d.get(c) for c in columns] for d in dicts]


# ----------------------------------------------------------------------- backends
class TensorBoardBackend:
    """Event files in RUN_DIR/tensorboard, through torch's SummaryWriter (needs `tensorboard`)."""

    name = "tensorboard"

    def __init__(self, out: Path, run_name: str, config: dict, start_step: int, log: Callable[[str], None]):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = out / TENSORBOARD_DIR
        # a resumed run hides what the interrupted one logged after the checkpoint it resumes from
        self.writer = SummaryWriter(str(self.dir), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", _code_block(config), start_step)
        log(f"tensorboard: logging to {self.dir} (tensorboard --logdir {out})")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every step logged so far

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        self.writer.add_text(key, markdown_table(columns, rows), step)  # TensorBoard has no tables
        self.writer.flush()

    def summary(self, values: dict[str, float], step: int) -> None:
        self.writer.add_text("summary", _code_block(values), step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbBackend:
    """A wandb run in RUN_DIR/wandb, offline unless WANDB_MODE says otherwise."""

    name = "wandb"

    def __init__(self, out: Path, run_name: str, config: dict, start_step: int, log: Callable[[str], None]):
        if not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
            log("wandb: WANDB_MODE was not set, so this run sets it to offline; upload it later with "
                f"`wandb sync {out / WANDB_DIR}/offline-run-*` (WANDB_MODE=online logs it live)")
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run_name,
                              dir=str(out), config=config, job_type=config.get("command"))
        log(f"wandb: logging to {self.run.dir} (mode {os.environ['WANDB_MODE']})")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class TrackioBackend:
    """A trackio run in its local SQLite store (TRACKIO_DIR, default HF_HOME/trackio)."""

    name = "trackio"

    def __init__(self, out: Path, run_name: str, config: dict, start_step: int, log: Callable[[str], None]):
        import trackio

        self.trackio = trackio
        self.project = os.environ.get("TRACKIO_PROJECT", DEFAULT_PROJECT)
        self.run = trackio.init(project=self.project, name=run_name, config=config, embed=False,
                                auto_log_gpu=False, auto_log_cpu=False)
        log(f"trackio: logging run {run_name} to project {self.project} in {_trackio_dir()} "
            f"(trackio show --project {self.project})")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        self.run.log({key: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values: dict[str, float], step: int) -> None:
        self.run.log({f"summary/{k}": v for k, v in values.items()}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish()


BACKEND_CLASSES = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend, "trackio": TrackioBackend}


def _trackio_dir() -> str:
    from trackio.utils import TRACKIO_DIR

    return str(TRACKIO_DIR)


def _code_block(obj: Any) -> str:
    """JSON as a Markdown code block (indented: TensorBoard's text plugin renders Markdown)."""
    return "\n".join("    " + line for line in json.dumps(obj, indent=2, default=str).splitlines())


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table of `rows`; `|` and line breaks inside a cell are escaped."""
    def cell(value: Any) -> str:
        return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "⏎")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------- the tracker
_OPEN: list["Tracker"] = []  # trackers not closed yet: dpo.cli.main closes them when a run fails


class Tracker:
    """The run's backends, fed in TRL's names. With no backends (--report-to none, or a rank other
    than 0 in a torchrun job) every method does nothing.

        tracker = open_tracker(["tensorboard"], out, config=config.to_dict(), command="dpo.train")
        tracker.log_row(metrics_row)          # each metrics.jsonl row (and the evaluation it carries)
        tracker.log_evaluation(record)        # an evaluation outside the rows (before training, the end)
        tracker.log_samples(samples, step)    # the samples table
        tracker.log_summary(eval_json, step)  # eval.json's other numbers
        tracker.close()
    """

    def __init__(self, backends: list | None = None, tokens_seen: int = 0):
        self.backends = list(backends or [])
        self.num_tokens = tokens_seen  # TRL's train/num_tokens: tokens trained on so far
        self.evaluated_steps: set[int] = set()  # each evaluation is logged once
        if self.backends:
            _OPEN.append(self)

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for backend in self.backends:
            backend.log(metrics, step)

    def log_row(self, row: dict) -> None:
        """One metrics.jsonl row: its training numbers, and the evaluation it carries, if any."""
        if not self.backends:
            return
        step = int(row.get("step", 0))
        metrics = train_metrics(row)
        if isinstance(row.get("tokens"), (int, float)) and not isinstance(row.get("tokens"), bool):
            self.num_tokens += int(row["tokens"])
            metrics["train/num_tokens"] = float(self.num_tokens)
        evaluation = row_evaluation(row)
        if evaluation is not None and step not in self.evaluated_steps:
            self.evaluated_steps.add(step)
            metrics.update(eval_metrics(evaluation))
        self._log(metrics, step)

    def log_evaluation(self, record: dict, step: int | None = None) -> None:
        """An evaluation record (at record["step"], or `step`), unless that step's evaluation was
        logged already (e.g. with its metrics row)."""
        if not self.backends:
            return
        step = int(record.get("step", 0) if step is None else step)
        if step in self.evaluated_steps:
            return
        self.evaluated_steps.add(step)
        self._log(eval_metrics(record), step)

    def log_samples(self, samples: Sequence[Any], step: int) -> None:
        """The samples table (prompt, reference and policy answers) at `step`."""
        if not self.backends or not samples:
            return
        columns, rows = sample_rows(samples)
        for backend in self.backends:
            backend.table(SAMPLES_KEY, columns, rows, step)

    def log_summary(self, result: dict, step: int) -> None:
        """eval.json's numbers that no step logged, as the run's summary."""
        if not self.backends:
            return
        values = summary_metrics(result)
        for backend in self.backends:
            backend.summary(values, step)

    def close(self, failed: bool = False) -> None:
        """Finish every backend (wandb marks a failed run as such); idempotent."""
        backends, self.backends = self.backends, []
        if self in _OPEN:
            _OPEN.remove(self)
        for backend in backends:
            backend.close(failed)


def open_tracker(report_to: Sequence[str], out: str | os.PathLike, *, config: dict, command: str,
                 start_step: int = 0, tokens_seen: int = 0, is_main: bool = True,
                 log: Callable[[str], None] = print) -> Tracker:
    """A Tracker writing to each backend of `report_to` for the run in `out` (which must exist).

    config: the run's settings (logged as the run's config). start_step: the step a resumed run
    continues from (0 for a new run). tokens_seen: tokens trained on before it. is_main: False on
    the ranks of a torchrun job other than 0, which log nothing.
    """
    names = check_report_to(report_to)
    if not names or not is_main:
        return Tracker()
    check_installed(names)
    out = Path(out)
    run_name = f"{out.absolute().name}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {**config, "command": command, "run_dir": str(out.absolute())}
    backends = []
    try:
        for name in names:
            backends.append(BACKEND_CLASSES[name](out, run_name, config, start_step, log))
    except BaseException:
        for backend in backends:
            backend.close(True)
        raise
    return Tracker(backends, tokens_seen)


def close_all(failed: bool = True) -> None:
    """Close every tracker still open (a run that stopped with an error or a signal)."""
    for tracker in list(_OPEN):
        tracker.close(failed)
