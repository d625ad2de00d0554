"""Summarise the runs of bench/real_grid.sh as the markdown tables of docs/results.md.

    python bench/grid_table.py runs/grid            # one row per setting, then one per evaluation

Reads each run's eval.json (accuracy, health and timing of every evaluation), its .cmd file
(the command) and samples.jsonl (the final policy's greedy answers; the first one is shown).
"held-out acc." is the policy's preference accuracy (log p(chosen) > log p(rejected)); "reward acc."
the implicit reward's (the policy's log-ratio margin over the reference's > 0), which alone means
something with --logp-reduction sum, where the longer chosen answers have the lower summed log-prob.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _f(value, fmt: str) -> str:
    return "–" if value is None or value != value else format(value, fmt)


def _one_line(text: str, room: int = 90) -> str:
    line = " ".join(text.split()) or "(empty or whitespace only)"
    return line if len(line) <= room else line[:room - 1] + "…"


def load(run: Path) -> dict | None:
    path = run / "eval.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())
    cmd = run.parent / f"{run.name}.cmd"
    ev["_cmd"] = cmd.read_text().strip() if cmd.is_file() else ""
    samples = run / "samples.jsonl"
    ev["_samples"] = [json.loads(x) for x in samples.read_text().splitlines()] if samples.is_file() else []
    return ev


def summary_row(name: str, ev: dict) -> str:
    history = ev["history"]
    ref = history[0]["reference_accuracy"]
    best = ev.get("best")
    first_bad = next((e["step"] for e in history if not e["healthy"]), None)
    last = history[-1]["health"]
    wall = (ev.get("timing") or {}).get("wall_seconds")
    sample = ev["_samples"][0]["policy"] if ev["_samples"] else ""
    best_text = (f"{best['policy_accuracy']:.1%} (step {best['step']}, "
                 f"{best['policy_accuracy'] - ref:+.1%})" if best else "none")
    reward = history[-1]["reward_accuracy"]
    return (f"| {name} | {ref:.1%} | {best_text} | {reward:.1%} | {first_bad if first_bad is not None else 'never'} | "
            f"{ev['steps']} | {_f(last.get('policy_chosen_logp'), '.2f')} | "
            f"{_f(last.get('policy_sample_distinct_2'), '.3f')} | {_f(last.get('kl_policy_reference'), '.3f')} | "
            f"{_f(wall / 60 if wall else None, '.1f')} | {_one_line(sample)} |")


def history_rows(name: str, ev: dict) -> list[str]:
    rows = []
    for e in ev["history"]:
        h = e["health"]
        rows.append(f"| {name} | {e['step']} | {e['policy_accuracy']:.1%} | {e['reward_accuracy']:.1%} | "
                    f"{_f(h.get('policy_chosen_logp'), '.2f')} | "
                    f"{_f(h.get('policy_rejected_logp'), '.2f')} | {_f(h.get('policy_sample_mean_length'), '.0f')} | "
                    f"{_f(h.get('policy_sample_distinct_2'), '.3f')} | {_f(h.get('policy_sample_reference_nll'), '.2f')} | "
                    f"{_f(h.get('kl_policy_reference'), '.3f')} | {'ok' if e['healthy'] else 'UNHEALTHY'} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="the OUT directory of bench/real_grid.sh")
    args = parser.parse_args(argv)
    runs = {d.name: ev for d in sorted(args.grid.iterdir()) if d.is_dir() and (ev := load(d)) is not None}
    if not runs:
        parser.error(f"{args.grid}: no finished run (no */eval.json)")
    print("| setting | reference acc. | best healthy acc. (step, gain) | final reward acc. | first unhealthy step | "
          "steps run | final log p(chosen)/tok | final distinct-2 | final KL | wall (min) | final policy answer to prompt 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ev in runs.items():
        print(summary_row(name, ev))
    print("\n| setting | step | held-out acc. | reward acc. | log p(chosen)/tok | log p(rejected)/tok | answer tokens | "
          "distinct-2 | ref. NLL of answers | KL | health |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, ev in runs.items():
        print("\n".join(history_rows(name, ev)))
    print("\nCommands:\n")
    for name, ev in runs.items():
        print(f"- {name}: `{ev['_cmd']}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
