"""Training curves as PNG files: a DPO run (loss, accuracy, rewards, health), several runs
overlaid (`plot_runs`, for a beta sweep or losses compared), and SFT (loss).

Drawn on a bare matplotlib Figure, never pyplot, so they work without a display and leave a
notebook's plotting backend as it was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1 leaves the values as they are)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _integer_steps(axes) -> None:
    """Steps are whole numbers: no 2.5 on a step axis."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(metrics: list[dict], path: str | os.PathLike, evals: list[dict] | None = None,
                loss_name: str = "sigmoid") -> Path:
    """Write a 4-panel figure: the loss, reward accuracy (train and held-out), rewards and margin,
    and health. loss_name: the run's --loss-type (the ln 2 line is DPO's loss at the start)."""
    from matplotlib.figure import Figure  # no pyplot: works headless, leaves a notebook's backend alone

    rows = [m for m in metrics if "loss" in m]
    steps = [m["step"] for m in rows]
    window = max(1, len(rows) // 20)
    fig = Figure(figsize=(20, 4.2), layout="constrained")
    axes = fig.subplots(1, 4)

    ax = axes[0]
    ax.plot(steps, [m["loss"] for m in rows], alpha=0.3, color="C0")
    ax.plot(steps, _smooth([m["loss"] for m in rows], window), color="C0", label="loss")
    if loss_name == "sigmoid":
        ax.axhline(0.6931, ls=":", color="grey", label="ln 2 (no preference)")
    ax.set(title="DPO loss" if loss_name == "sigmoid" else f"loss ({loss_name})", xlabel="step")
    ax.legend()

    ax = axes[1]
    ax.plot(steps, _smooth([m["reward_accuracy"] for m in rows], window), label="train reward accuracy")
    for e in evals or []:
        ax.scatter([e["step"]], [e["policy_accuracy"]], color="C1", zorder=3)
        if e["step"] > 0:  # at step 0 policy == reference: every margin is exactly 0
            ax.scatter([e["step"]], [e["reward_accuracy"]], color="C2", marker="x", zorder=3)
    if evals:
        ax.scatter([], [], color="C1", label="held-out policy accuracy")
        ax.scatter([], [], color="C2", marker="x", label="held-out reward accuracy")
        ax.axhline(evals[0]["reference_accuracy"], ls="--", color="grey", label="held-out reference accuracy")
    ax.set(title="accuracy", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend(loc="lower center", fontsize="small")

    ax = axes[2]
    for key, label in (("chosen_reward", "chosen reward"), ("rejected_reward", "rejected reward"),
                       ("margin", "margin")):
        ax.plot(steps, _smooth([m[key] for m in rows], window), label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(title="implicit rewards  beta * (log pi - log pi_ref)" if loss_name not in ("simpo", "orpo", "sft")
           else "rewards (beta * mean log-prob; no reference)", xlabel="step")
    ax.legend()

    _health_panel(axes[3], evals or [])
    path = Path(path)
    _integer_steps(axes)
    fig.savefig(path, dpi=100)
    return path


def _health_panel(ax, evals: list[dict]) -> None:
    """Held-out log p(chosen) of policy and reference, and the policy's empty answers, per evaluation.

    Accuracy can rise while these fall apart: this panel is where a collapse shows.
    """
    ax.set(title="health (held-out evaluations)", xlabel="step", ylabel="log p(chosen) per token")
    evals = [e for e in evals if "policy_chosen_logp" in e]
    if not evals:
        ax.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=ax.transAxes)
        return
    steps = [e["step"] for e in evals]
    ax.plot(steps, [e["policy_chosen_logp"] for e in evals], marker="o", color="C0", label="policy log p(chosen)")
    ax.plot(steps, [e["policy_rejected_logp"] for e in evals], marker="o", color="C3", alpha=0.6,
            label="policy log p(rejected)")
    ax.axhline(evals[0]["reference_chosen_logp"], ls="--", color="grey", label="reference log p(chosen)")
    bad = [e for e in evals if not e.get("healthy", True)]
    if bad:
        ax.scatter([e["step"] for e in bad], [e["policy_chosen_logp"] for e in bad], s=120, marker="x",
                   color="red", zorder=4, label="unhealthy evaluation")
    empty = [(e["step"], e["health"]["policy_sample_empty_share"]) for e in evals
             if "policy_sample_empty_share" in e.get("health", {})]
    handles, labels = ax.get_legend_handles_labels()
    if empty:
        twin = ax.twinx()
        twin.plot([s for s, _ in empty], [v for _, v in empty], ls=":", marker="s", color="C2",
                  label="policy empty answers")
        twin.set(ylim=(-0.02, 1.02), ylabel="share of empty answers")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="best", fontsize="small")


def run_labels(configs: list[dict]) -> list[str]:
    """A legend label per run: the settings that differ between the runs ("beta=0.5, lr=0.0001"),
    or the run's directory name when none does. Settings that say where and how a run wrote
    (output_dir, resume, overwrite, progress) do not count."""
    ignore = {"output_dir", "resume", "overwrite", "progress"}
    keys = sorted({k for c in configs for k in c} - ignore)
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    labels = []
    for c in configs:
        parts = []
        for k in differ:
            v = c.get(k)
            parts.append(f"{k}={' '.join(map(str, v)) if isinstance(v, list) else v}")
        labels.append(", ".join(parts))
    return labels


def plot_runs(runs: list[dict], path: str | os.PathLike) -> Path:
    """Several DPO runs overlaid, one colour each: the train loss, held-out policy accuracy, held-out
    log p(chosen) per token (the health signal) and the train reward margin, against steps.

    runs: dicts with "label", "metrics" (metrics.jsonl rows) and "evals" (eval.json's history).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(20, 4.6), layout="constrained")
    axes = fig.subplots(1, 4)
    for i, run in enumerate(runs):
        color, label = f"C{i % 10}", run["label"]
        rows = [m for m in run["metrics"] if "loss" in m]
        steps = [m["step"] for m in rows]
        window = max(1, len(rows) // 20)
        axes[0].plot(steps, _smooth([m["loss"] for m in rows], window), color=color, label=label)
        axes[3].plot(steps, _smooth([m.get("margin", float("nan")) for m in rows], window), color=color, label=label)
        evals = [e for e in run["evals"] if "policy_accuracy" in e]
        if evals:
            es = [e["step"] for e in evals]
            axes[1].plot(es, [e["policy_accuracy"] for e in evals], marker="o", color=color, label=label)
            axes[1].axhline(evals[0]["reference_accuracy"], ls=":", color=color, alpha=0.6)
            axes[2].plot(es, [e["policy_chosen_logp"] for e in evals], marker="o", color=color, label=label)
            bad = [e for e in evals if not e.get("healthy", True)]
            axes[2].scatter([e["step"] for e in bad], [e["policy_chosen_logp"] for e in bad], s=120,
                            marker="x", color="red", zorder=4)
    axes[0].set(title="train loss (smoothed)", xlabel="step")
    axes[1].set(title="held-out preference accuracy\n(dotted: the starting model's)", xlabel="step",
                ylabel="accuracy", ylim=(-0.02, 1.02))
    axes[2].set(title="held-out log p(chosen) per token\n(red x: outside the health bounds)", xlabel="step",
                ylabel="nats per token")
    axes[3].set(title="train reward margin (smoothed)", xlabel="step")
    axes[3].axhline(0, color="grey", lw=0.5)
    for ax in axes:
        ax.legend(fontsize="small", loc="best")
    path = Path(path)
    _integer_steps(axes)
    fig.savefig(path, dpi=100)
    return path


def plot_sft_curve(metrics: list[dict], path: str | os.PathLike, evals: dict | None = None) -> Path:
    """SFT train loss per step (raw and smoothed), with the held-out NLL before and after."""
    from matplotlib.figure import Figure

    steps, loss = [m["step"] for m in metrics], [m["loss"] for m in metrics]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, loss, alpha=0.3, color="C0")
    ax.plot(steps, _smooth(loss, max(1, len(loss) // 20)), color="C0", label="train NLL")
    if evals:
        ax.scatter([0, steps[-1]], [evals["before"]["nll"], evals["after"]["nll"]], color="C1", zorder=3,
                   label="held-out NLL (before, after)")
    ax.set(title="SFT loss (mean NLL per response token)", xlabel="step")
    ax.legend()
    path = Path(path)
    _integer_steps([ax])
    fig.savefig(path, dpi=100)
    return path
