"""`python -m dpo.plot RUN_DIR [RUN_DIR ...]`: draw training runs as PNG.

    python -m dpo.plot runs/dpo                       # the run's own figure, as the trainer draws it
    python -m dpo.plot runs/beta0.1 runs/beta0.5 runs/beta2 -o beta_sweep.png   # runs overlaid

One run: the figure `python -m dpo.train` writes (loss, accuracy, rewards, health), drawn again
from its metrics.jsonl and eval.json (default output: RUN_DIR/curves.png). Several runs: one
figure with one colour per run (train loss, held-out accuracy, held-out log p(chosen), reward
margin), each labelled by the settings that differ between the runs' train_config.json (e.g.
"beta=0.5"), so a sweep or a comparison of losses reads at a glance (default output:
runs_compared.png in the current directory).

A run that is still training can be drawn: the steps written so far are used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .plots import plot_curves, plot_runs, run_labels


class RunDirError(ValueError):
    """A directory that does not hold a training run; the message names it."""


def read_run(directory: Path) -> dict:
    """metrics.jsonl rows, the evaluations (eval.json's history, or the latest checkpoint's while the
    run is still training) and train_config.json of a run directory."""
    from .checkpointing import list_checkpoints
    from .cli import read_metrics

    if not directory.is_dir():
        raise RunDirError(f"{directory}: not a directory")
    metrics = read_metrics(directory / "metrics.jsonl")
    if not metrics:
        raise RunDirError(f"{directory}: no metrics.jsonl with any step (is it a python -m dpo.train output "
                          "directory?)")
    evals: list[dict] = []
    if (directory / "eval.json").is_file():
        evals = json.loads((directory / "eval.json").read_text(encoding="utf-8")).get("history", [])
    else:  # still training: the evaluations saved with the latest checkpoint
        found = list_checkpoints(directory)
        if found:
            evals = json.loads((found[-1] / "state.json").read_text(encoding="utf-8")).get("evals", [])
    config_path = directory / "train_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return {"dir": directory, "metrics": metrics, "evals": evals, "config": config}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="output directories of dpo.train")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="PNG to write (default: RUN_DIR/curves.png for one run, runs_compared.png for several)")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.runs]
    except (RunDirError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(runs) == 1:
        run = runs[0]
        loss = run["config"].get("loss_type", ["sigmoid"])
        out = plot_curves(run["metrics"], args.output or run["dir"] / "curves.png", run["evals"],
                          "+".join(loss) if isinstance(loss, list) else loss)
    else:
        labels = run_labels([r["config"] for r in runs])
        for run, label in zip(runs, labels):
            run["label"] = label or run["dir"].name
        if len({r["label"] for r in runs}) < len(runs):  # the same settings twice: tell them apart by folder
            for run in runs:
                run["label"] = f"{run['dir'].name}: {run['label']}" if run["label"] != run["dir"].name else run["label"]
        out = plot_runs(runs, args.output or Path("runs_compared.png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
