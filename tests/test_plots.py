"""Training curves: the smoothing and the figure file."""
from __future__ import annotations

from dpo.plots import _smooth, plot_curves


def test_smooth_is_a_trailing_mean():
    assert _smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert _smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_plot_curves_writes_a_png(tmp_path):
    rows = [{"step": s, "loss": 0.69 - 0.01 * s, "reward_accuracy": min(1.0, 0.1 * s), "chosen_reward": 0.01 * s,
             "rejected_reward": -0.01 * s, "margin": 0.02 * s} for s in range(1, 11)]
    evals = [{"step": 0, "policy_accuracy": 0.5, "reward_accuracy": 0.0, "reference_accuracy": 0.5},
             {"step": 10, "policy_accuracy": 0.9, "reward_accuracy": 0.95, "reference_accuracy": 0.5}]
    path = plot_curves(rows, tmp_path / "curves.png", evals)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def fake_run(directory, *, beta: float, loss_type: str = "sigmoid", steps: int = 10, finished: bool = True):
    """A dpo.train output directory as the trainer writes it: metrics.jsonl, eval.json, train_config.json."""
    import json

    directory.mkdir(parents=True)
    rows = [{"step": s, "loss": 0.69 - 0.01 * s * beta, "reward_accuracy": min(1.0, 0.1 * s), "chosen_reward": 0.01 * s,
             "rejected_reward": -0.01 * s, "margin": 0.02 * s * beta} for s in range(1, steps + 1)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [{"step": s, "policy_accuracy": 0.5 + 0.04 * s * beta / 2, "reward_accuracy": 0.5,
              "reference_accuracy": 0.5, "policy_chosen_logp": -2.6 - 0.1 * s / beta,
              "policy_rejected_logp": -3.0, "reference_chosen_logp": -2.6, "healthy": s < 10 or beta > 1}
             for s in (0, 5, 10)]
    if finished:
        (directory / "eval.json").write_text(json.dumps({"history": evals}))
    (directory / "train_config.json").write_text(json.dumps(
        {"beta": beta, "loss_type": [loss_type], "lr": 1e-4, "output_dir": str(directory), "progress": False}))
    return directory


def test_plot_cli_overlays_runs_labelled_by_what_differs(tmp_path, capsys):
    from dpo import plot
    from dpo.plots import run_labels

    runs = [fake_run(tmp_path / f"beta{b}", beta=b) for b in (0.1, 0.5, 2.0)]
    out = tmp_path / "sweep.png"
    assert plot.main([str(r) for r in runs] + ["-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # the legend names the one setting that differs; output_dir differs too but does not count
    assert run_labels([plot.read_run(r)["config"] for r in runs]) == ["beta=0.1", "beta=0.5", "beta=2.0"]
    assert run_labels([{"beta": 1, "loss_type": ["sigmoid"]}, {"beta": 1, "loss_type": ["sigmoid", "sft"]}]) == [
        "loss_type=sigmoid", "loss_type=sigmoid sft"]


def test_plot_cli_redraws_one_run_even_while_it_trains(tmp_path):
    from dpo import plot

    run = fake_run(tmp_path / "run", beta=0.5, loss_type="simpo", finished=False)
    assert plot.main([str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_cli_names_a_directory_that_holds_no_run(tmp_path, capsys):
    from dpo import plot

    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'empty'}: no metrics.jsonl") and "Traceback" not in err
