"""Watching a DPO run: held-out accuracy AND the model's health at every evaluation.

Preference accuracy alone lies. On SmolLM2-135M-Instruct the assignment's settings raise it
from 68% to 93.5% while the policy's greedy answers turn into whitespace. So each evaluation
here measures, beside the accuracy (`dpo.evaluate`), the health numbers of `dpo.health`: the
held-out log p(chosen), both models' greedy answers to held-out prompts (the share that ends
its turn, the share that loops, length, empty share, distinct-2), the reference's NLL of them,
and KL(policy || reference). Then:

* `check_bounds` compares them with the run's bounds; a problem is a warning in the log and on
  the progress bar, and the final table says plainly that the policy degraded. A bound that has
  no meaningful baseline in the reference's own figures says so once, and is not judged;
* the best healthy evaluation (highest held-out accuracy among those within the bounds, the
  starting model included; of equal ones the later) is kept as `best/`, a HuggingFace folder like
  `final/`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .evaluate import EvalResult
from .health import HealthProbe, HealthThresholds, check_bounds
from .policy import save_policy
from .samples import Sample

BEST_DIR = "best"
BEST_INFO = "dpo_best.json"  # inside best/: which evaluation it is


@dataclass
class Evaluation:
    """One evaluation of the run: accuracy, health, the problems found, and the samples."""

    step: int
    result: EvalResult
    health: dict
    problems: list[str]
    samples: list[Sample] = field(default_factory=list)
    not_judged: list[str] = field(default_factory=list)  # bounds without a meaningful baseline

    @property
    def healthy(self) -> bool:
        return not self.problems

    def record(self) -> dict:
        """What eval.json's history (and a checkpoint) keeps of it."""
        return {"step": self.step, **self.result.to_dict(), "healthy": self.healthy,
                "problems": self.problems, "not_judged": self.not_judged, "health": self.health}


# Steps between evaluations by default. An evaluation answers the sample prompts with the policy's
# greedy decoding and runs its trained blocks over the held-out pairs: on 2 CPU cores with AVX2
# kernels about as long as 5 training steps; the first one, which also runs the starting model over
# the held-out pairs and answers with it, about 13. Evaluation within a fifth of a run (a quarter of
# the rest of it) then allows before and after for a run of 75 steps, the default's, and one more
# evaluation for each 22 steps beyond that (docs/benchmarks.md, section 17).
DEFAULT_EVAL_EVERY = 100


def evaluation_interval(eval_every: int | None) -> int:
    """Steps between evaluations, besides the one before training and the one at the end:
    --eval-every, or by default every DEFAULT_EVAL_EVERY (100) steps, so a run of 75 steps (the
    default's) evaluates before and after only, and one of 300 also at steps 100 and 200.
    0: before and after only. So by default no run evaluates more often than it trains."""
    return DEFAULT_EVAL_EVERY if eval_every is None else eval_every


class RunMonitor:
    """Evaluates a trainer's policy on held-out pairs and keeps the best healthy one as best/."""

    def __init__(self, trainer, tokenizer, eval_pairs: list, config, out_dir: Path,
                 log: Callable[[str], None] = print, history: list[dict] | None = None,
                 save: Callable[..., None] | None = None):
        self.trainer, self.tokenizer, self.eval_pairs, self.config = trainer, tokenizer, eval_pairs, config
        self.out, self.log = Path(out_dir), log
        # how best/ is written: save(directory, extra_files={name: text}); by default the policy as a
        # HuggingFace folder with the tokenizer (`dpo.policy.save_policy`)
        self.save = save or (lambda directory, **kw: save_policy(trainer.policy, directory, tokenizer=tokenizer, **kw))
        self.thresholds = HealthThresholds(max_chosen_logp_drop=config.max_chosen_logp_drop,
                                           max_empty_share=config.max_empty_share)
        self.probe = None
        if config.sample_prompts and eval_pairs:
            try:
                self.probe = HealthProbe(  # keeps the reference's answers between evaluations
                    trainer.reference, tokenizer, eval_pairs, n_prompts=config.sample_prompts,
                    max_new_tokens=config.sample_tokens, device=trainer.device,
                    autocast_dtype=trainer.autocast_dtype, batch_size=config.batch_size,
                    logp_reduction=config.logp_reduction)
            except ValueError as e:  # every held-out prompt was cut away: judge the log-probs alone
                log(f"note: no sample answers at the evaluations: {e}")
            else:
                if self.probe.selection["empty_skipped"]:
                    log(f"note: {self.probe.selection['empty_skipped']} held-out prompts were cut away entirely by "
                        f"--max-length {config.max_length} and are not answered at the evaluations")
        self.history: list[dict] = list(history or [])  # records of the evaluations so far
        self.seconds: list[list] = []  # [step, seconds] of each evaluation of this session
        self._said_not_judged: set[str] = set()
        healthy = [e for e in self.history if e.get("healthy", True)]
        self.best: dict | None = max(healthy, key=lambda e: (e["policy_accuracy"], e["step"]), default=None)

    def measure_start(self, start_model) -> None:
        """A reference-free run resumed after its first step: measure the starting model's side of
        the evaluation (held-out log-probs, sample answers) with the starting weights, loaded
        again by the caller and dropped afterwards. (Before the first step the policy is them.)"""
        if self.eval_pairs:
            self.trainer.evaluate(self.eval_pairs, start_model=start_model)
        if self.probe is not None:
            self.probe.prime(start_model)

    def evaluate(self) -> Evaluation:
        """Accuracy and health of the policy now; warns about each problem and updates best/."""
        t, c = self.trainer, self.config
        started = time.perf_counter()
        result = t.evaluate(self.eval_pairs)
        if self.probe is not None:
            health, samples = self.probe.report(t.policy, result)
        else:  # no samples: judge the held-out log-probs alone
            health, samples = {"logp_reduction": c.logp_reduction, **{
                k: getattr(result, k) for k in ("policy_chosen_logp", "policy_rejected_logp",
                                                "reference_chosen_logp", "reference_rejected_logp")}}, []
        checks = check_bounds(health, self.thresholds)
        evaluation = Evaluation(t.step, result, health, [c.message for c in checks if c.status == "degraded"],
                                samples, [c.message for c in checks if c.status == "not judged"])
        self.seconds.append([t.step, round(time.perf_counter() - started, 1)])  # not in the record: not exact
        self.history.append(evaluation.record())
        for check in checks:  # said once per run: the reference's side does not change
            if check.status == "not judged" and check.name not in self._said_not_judged:
                self._said_not_judged.add(check.name)
                self.log(f"note: {check.message}; the run trains on")
        for problem in evaluation.problems:
            self.log(f"warning: step {t.step}: the policy looks unhealthy: {problem}")
        # ties go to the later evaluation: an equally accurate policy that has trained further is what the run made
        if evaluation.healthy and (self.best is None or result.policy_accuracy >= self.best["policy_accuracy"]):
            self._save_best(evaluation)
        return evaluation

    @property
    def unhealthy_streak(self) -> int:
        """How many of the latest evaluations in a row were outside the health bounds."""
        streak = 0
        for record in reversed(self.history):
            if record.get("healthy", True):
                break
            streak += 1
        return streak

    def _save_best(self, evaluation: Evaluation) -> None:
        info = json.dumps({"step": evaluation.step, "policy_accuracy": evaluation.result.policy_accuracy}) + "\n"
        self.save(self.out / BEST_DIR, extra_files={BEST_INFO: info})  # complete or absent
        self.best = evaluation.record()

    def summary(self) -> dict:
        """For eval.json: the best healthy evaluation, and whether the final one degraded."""
        last = self.history[-1] if self.history else None
        return {
            "degraded": bool(last and not last["healthy"]),
            "problems": last["problems"] if last else [],
            "not_judged": last.get("not_judged", []) if last else [],
            "health": last["health"] if last else {},
            "best": None if self.best is None else {
                "step": self.best["step"], "policy_accuracy": self.best["policy_accuracy"],
                "dir": BEST_DIR},  # relative to the run directory, so a moved run still says the truth
            "thresholds": self.thresholds.to_dict(),
        }


def health_table(health: dict) -> str:
    """Reference vs policy health rows, to print under the accuracy table."""
    def num(key: str, fmt: str) -> str:
        value = health.get(key)
        return "-" if value is None or value != value else format(value, fmt)

    if "policy_sample_mean_length" not in health:
        return ""
    rows = [
        (f"answer tokens ({health.get('n_samples', 0)})", num("reference_sample_mean_length", ".1f"),
         num("policy_sample_mean_length", ".1f")),
        ("ended their turn", num("reference_sample_ended_share", ".0%"), num("policy_sample_ended_share", ".0%")),
        ("loop (4-gram 3+ x)", num("reference_sample_loop_share", ".0%"), num("policy_sample_loop_share", ".0%")),
        ("empty answers", num("reference_sample_empty_share", ".0%"), num("policy_sample_empty_share", ".0%")),
        ("distinct-2", num("reference_sample_distinct_2", ".3f"), num("policy_sample_distinct_2", ".3f")),
        ("ref. NLL of answers", num("reference_sample_reference_nll", ".3f"),
         num("policy_sample_reference_nll", ".3f")),
        ("KL(policy || ref.)", "0", num("kl_policy_reference", ".4f")),
    ]
    return "\n".join(f"{a:<22}{b:>12}{c:>12}" for a, b, c in rows)  # the widths of EvalResult.table()


def verdict(summary: dict, run_dir: str | os.PathLike = ".") -> str:
    """One paragraph: degraded or within the bounds, and where the best healthy model is."""
    best = summary["best"]
    where = (f"The best healthy evaluation is step {best['step']} (held-out accuracy "
             f"{best['policy_accuracy']:.1%}), saved in {Path(run_dir) / best['dir']}/." if best else
             "No evaluation was within the health bounds, so there is no best/.")
    if summary["degraded"]:
        return ("THE POLICY DEGRADED: its accuracy is not a success.\n  - "
                + "\n  - ".join(summary["problems"]) + f"\n{where} Read samples.md.")
    return f"health: within the bounds. {where}"
