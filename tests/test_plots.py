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
