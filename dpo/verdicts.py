"""Pairwise verdicts: from a judge's reply to a win rate with its interval. Pure functions.

A judge sees a question and two answers, A and B, and names the better one or calls a tie. Two
things make such a verdict worth counting:

* **Both orders.** Judges, LLMs especially, favour a position (often the first answer). So every
  pair is asked twice, the policy's answer as A and then as B. A win counts only when both
  orders name the same model; a loss likewise; anything else (a tie, or each order naming the
  answer in one position) is a tie. `combine` does this.
* **Failures are not ties.** A reply with no readable verdict, a refusal or a timeout says
  nothing about the answers. Such an item is reported as failed, by kind, and left out of the
  rate, never counted silently as a tie or a loss.

The win rate counts a tie as half a win (the usual convention, and the one of the issue that
asked for it): (wins + ties / 2) / judged. Its 95% interval is Wilson's score interval with
wins + ties / 2 as the successes: unlike mean +- 1.96 sd it stays inside [0, 1] and does not
collapse to a point when every item has the same outcome. The same functions score blind
verdicts written by people or other models (`dpo.judge --verdicts`).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

VERDICTS = ("A", "B", "tie")
OUTCOMES = ("win", "tie", "loss")  # the policy's, against the reference

# "Verdict: A", "**Verdict:** tie", "verdict = B"; the last one in the reply counts
_VERDICT_LINE = re.compile(r"verdict\W{0,4}\s*[:=]\s*\W{0,4}\s*(A|B|tie)\b", re.IGNORECASE)
_BRACKETS = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)  # MT-bench's [[A]] / [[C]] (tie)
_ALONE = re.compile(r"^\W*(A|B|tie)\W*$", re.IGNORECASE)  # a reply that is just the verdict


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply, or None when it names none.

    Read, in this order: the last "Verdict: X" line (the template asks for one), the last
    MT-bench style "[[X]]" ("[[C]]" is a tie), or a reply that is nothing but the verdict.
    """
    for pattern in (_VERDICT_LINE, _BRACKETS):
        found = pattern.findall(reply)
        if found:
            value = found[-1].upper()
            return "tie" if value in ("TIE", "C") else value
    alone = _ALONE.match(reply.strip())
    if alone:
        value = alone.group(1).upper()
        return "tie" if value == "TIE" else value
    return None


def winner(verdict: str, policy_is: str) -> str:
    """Which model a verdict names: "policy", "reference" or "tie"; `policy_is` is "A" or "B"."""
    if verdict == "tie":
        return "tie"
    return "policy" if verdict == policy_is else "reference"


def combine(first: str, second: str) -> str:
    """The outcome of one pair from its two orders' winners ("policy", "reference" or "tie"):
    "win" or "loss" only when both orders agree, else "tie"."""
    if first == second == "policy":
        return "win"
    if first == second == "reference":
        return "loss"
    return "tie"


@dataclass
class WinRate:
    """A win rate over judged items, ties as half, with Wilson's 95% interval."""

    wins: int
    ties: int
    losses: int
    failed: int = 0  # items with no usable verdict: left out of the rate

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + self.ties / 2) / self.judged if self.judged else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.wins + self.ties / 2, self.judged)

    def __str__(self) -> str:
        if not self.judged:
            return f"no judged items ({self.failed} failed)"
        lo, hi = self.interval
        failed = f", {self.failed} failed (not counted)" if self.failed else ""
        return (f"{self.rate:.1%} (95% interval {lo:.1%}-{hi:.1%}): {self.wins} wins, {self.ties} ties, "
                f"{self.losses} losses of {self.judged}{failed}")

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"win_rate": self.rate, "interval_95": [lo, hi], "wins": self.wins, "ties": self.ties,
                "losses": self.losses, "judged": self.judged, "failed": self.failed}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes / n (successes may be fractional)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(outcomes: Iterable[str | None]) -> WinRate:
    """Count outcomes ("win", "tie", "loss", or None for a failed item)."""
    counts = Counter(outcomes)
    unknown = set(counts) - set(OUTCOMES) - {None}
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(map(str, unknown))}; expected {OUTCOMES} or None")
    return WinRate(counts["win"], counts["tie"], counts["loss"], counts[None])


def agreement(a: Sequence[str | None], b: Sequence[str | None]) -> tuple[int, int]:
    """(items where two judges gave the same outcome, items both judged)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outcomes against {len(b)}")
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return sum(x == y for x, y in both), len(both)
