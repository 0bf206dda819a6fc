#!/usr/bin/env bash
# Reproduce the README's testbed tables (Fashion-MNIST testbed, not ImageNet). CPU, 2 threads.
# Usage: bash eval/testbed_tables.sh [main|ablation|sweep|all]   (writes docs/results/)
set -euo pipefail
cd "$(dirname "$0")/.."
TP=${TP:-.venv/bin/tokenprune}
OUT=docs/results
what=${1:-all}

if [[ $what == main || $what == all ]]; then
  # Every method at keep 0.7 / 0.5 / 0.33 plus the baseline, the full 10k test split.
  $TP eval --method tome zero-tprune mctf random --keep 0.7 0.5 0.33 --threads 2 \
    --output $OUT/testbed.jsonl --overwrite --plot $OUT/testbed.png
fi

if [[ $what == ablation || $what == all ]]; then
  # Zero-TPrune ablation in the spirit of the paper's Table 1, at keep 0.33 on Zero-TPrune's schedule.
  f=$OUT/zero_tprune_ablation.jsonl; rm -f $f
  for opts in "importance='random' s_stage=False" "eir=False vhf=False s_stage=False" "vhf=False s_stage=False" \
              "s_stage=False" "s_fraction=0.5" "s_fraction=0.25" "uniform_start=True"; do
    args=(); for o in $opts; do args+=(-o "$o"); done
    $TP eval --method zero-tprune --keep 0.33 "${args[@]}" --threads 2 --output $f --resume
  done
fi

if [[ $what == sweep || $what == all ]]; then
  # MCTF against ToMe down to aggressive reduction.
  $TP eval --method tome mctf --keep 0.2 0.1 --threads 2 --output $OUT/mctf_vs_tome.jsonl --overwrite \
    --plot $OUT/mctf_vs_tome.png
fi
