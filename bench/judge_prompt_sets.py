"""The fixed dev and test prompt sets of docs/results.md's judged grid (docs/judge/{dev,test}.jsonl).

Every setting of the grid must be judged on the same prompts, and none of them may have trained
on one. `python -m dpo.judge --run RUN` picks prompts per run (excluding that run's own training
prompts), so settings that train on different pairs would be judged on slightly different sets.
These files fix one set for all of them: single-turn prompts of the bundled HH-RLHF test splits
that no setting of the grid (seed 0, 200 held-out pairs, up to 1,000 training pairs) can train on:
* a filtered run reads the seed-0 shuffle only until the filter has kept what it needs (3,609
  pairs for 1,000 + 200), so the pairs from --tail-from on are never read;
* an unfiltered run (dpo.train --no-filter, dpo.sft) trains on the first num_pairs x 1.05 + 8
  candidates of its split (`dpo.cli.select_pairs`), a prefix of the 1,000-pair run's: excluded too;
and any prompt whose text is a user turn of an excluded pair goes with it.
`dpo.judge --prompts FILE --run RUN` checks again, per run, that none is a training prompt.

The dev set is for choosing settings; the test set is judged once, for the settings reported.

    python -m bench.judge_prompt_sets --out docs/judge --tail-from 3700 --num 60
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from dpo.cli import select_pairs
from dpo.config import TrainConfig
from dpo.data import bundled_hh_files, load_preferences
from dpo.judge_prompts import select_prompts, trained_user_turns, write_prompt_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/judge")
    p.add_argument("--tail-from", type=int, default=3700, help="first shuffled position of the never-read tail")
    p.add_argument("--num", type=int, default=60)
    p.add_argument("--seed", type=int, default=0, help="the runs' --seed (their shuffle)")
    args = p.parse_args()
    loaded = load_preferences(bundled_hh_files(), skip_bad_records=True)
    pairs = list(loaded)
    random.Random(args.seed).shuffle(pairs)  # as dpo.cli.select_pairs does
    read, tail = pairs[:args.tail_from], pairs[args.tail_from:]
    unfiltered = select_pairs(TrainConfig(filter=False, num_pairs=1000, eval_pairs=200, seed=args.seed), loaded)[0]
    exclude = trained_user_turns(read + unfiltered)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("dev", "test"):
        prompts, counts = select_prompts(tail, exclude, name, args.num)
        write_prompt_file(prompts, out / f"{name}.jsonl")
        print(f"{name}: {len(prompts)} prompts of {counts['in_set']} in the set "
              f"({counts['single_turn']} single-turn in the tail, {counts['excluded']} excluded)")


if __name__ == "__main__":
    main()
