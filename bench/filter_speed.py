"""NLTK strong-preference filter speed: pairs/s over all the HH-RLHF pairs at hand.

    python -m bench.filter_speed                    # workers 1 and 2, 3 reps each
    python -m bench.filter_speed --workers 1,2,4 --reps 5

Loads every pair of the HH-RLHF test splits bundled with dpo (helpful-base + harmless-base,
4,642 usable pairs; the train splits are not available offline), then runs
`dpo.filtering.filter_pairs` over all of them (no `limit`) with each `--workers` value,
alternating, `--reps` times. The time is the filter's own (`FilterReport.elapsed_s`: pool
start-up included, the one-time NLTK data load excluded). The kept pairs must be identical
for every worker count. The last column extrapolates to HH-RLHF's train split
(helpful-base + harmless-base, 160,800 pairs) at the measured rate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench import HH_FILES, NLTK_DATA, load_average, machine, median

TRAIN_PAIRS = 160_800


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.filter_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (filter_workers)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("NLTK_DATA", str(NLTK_DATA))

    from dpo.data import load_preferences
    from dpo.filtering import filter_pairs

    pairs = load_preferences([str(f) for f in HH_FILES], skip_bad_records=True)
    workers = [int(w) for w in args.workers.split(",")]
    filter_pairs(pairs[:64])  # load the NLTK data once, outside the timings
    rates: dict[int, list[float]] = {w: [] for w in workers}
    kept_by: dict[int, list] = {}
    load = [load_average()]
    for rep in range(args.reps):
        for w in workers:
            kept, rep_ = filter_pairs(pairs, num_workers=w)
            rates[w].append(rep_.pairs_per_s)
            kept_by[w] = kept
            load.append(load_average())
            print(f"rep {rep + 1}/{args.reps} workers {w}: {rep_.total} pairs in {rep_.elapsed_s:.2f} s = "
                  f"{rep_.pairs_per_s:,.0f} pairs/s, kept {rep_.kept} (load avg {load[-1]:.2f})", flush=True)
    first = kept_by[workers[0]]
    same = all(kept_by[w] == first for w in workers)
    print(f"{len(pairs)} pairs, kept {len(first)} ({100 * len(first) / len(pairs):.1f}%); "
          f"identical results for every worker count: {same}")
    summary = {}
    print(f"{'workers':>8}{'pairs/s':>10}{'s / 4,642':>11}{'s / 160,800 (extrapolated)':>28}")
    for w in workers:
        r = median(rates[w])
        summary[w] = {"pairs_per_s": r, "all": rates[w], "seconds": len(pairs) / r, "train_seconds": TRAIN_PAIRS / r}
        print(f"{w:>8}{r:>10,.0f}{len(pairs) / r:>11.2f}{TRAIN_PAIRS / r:>28.1f}")
    if len(workers) > 1:
        base = summary[workers[0]]["pairs_per_s"]
        print("speed-up vs " + f"{workers[0]} worker(s): "
              + ", ".join(f"{w}: {summary[w]['pairs_per_s'] / base:.2f}x" for w in workers[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "pairs": len(pairs), "kept": len(first),
                                               "identical": same, "load": load, "summary": summary}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
