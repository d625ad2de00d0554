#!/usr/bin/env bash
# The losses compared on the real SmolLM2-135M-Instruct (docs/losses.md, "On the real model").
#
#   bash bench/loss_compare.sh [NAME ...]      # all losses, or only the named ones
#   OUT=runs/losses bash bench/loss_compare.sh
#
# The same small budget for each: 200 NLTK-filtered HH pairs (25 steps of 8), 100 held-out pairs
# evaluated before and after, 8 greedy samples, bf16 autocast, the default freezing (last 5 blocks,
# head frozen), lr 1e-4, beta 2 where the loss has a beta; no early stopping, so every loss gets the
# same steps and the health figures say what happened. A finished loss (its eval.json exists) is not
# run again. Then: python bench/grid_table.py $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/losses}
mkdir -p "$OUT"

declare -A LOSSES=(
  [dpo]="--loss-type sigmoid"
  [ipo]="--loss-type ipo"
  [simpo]="--loss-type simpo"                       # gamma 1.0 (gamma/beta 0.5), no reference model
  [orpo]="--loss-type orpo"                         # lambda 0.1, no reference model
  [rpo]="--loss-type sigmoid sft --loss-weights 1.0 0.2"
)
ORDER=(dpo ipo simpo orpo rpo)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")

source bench/run_settings.sh
run_settings LOSSES "python -m dpo.train --dtype bfloat16 --num-pairs 200 --eval-pairs 100 --eval-every 0 --stop-when-unhealthy 0" "${names[@]}"
