#!/usr/bin/env bash
# Reproduce the README's testbed tables (Fashion-MNIST testbed, not ImageNet): CPU, 2 threads, fp32,
# the full 10k test split. Writes docs/results/. About 25 minutes on 2 cores.
# Usage: bash eval/testbed_tables.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TP=${TP:-.venv/bin/tokenprune}
OUT=docs/results
mkdir -p $OUT

# 1. Every method at keep 0.7 / 0.5 / 0.33, plus the baseline.
$TP eval --method tome zero-tprune mctf random --keep 0.7 0.5 0.33 --threads 2 \
  --output $OUT/testbed.jsonl --overwrite --plot $OUT/testbed.png

# The other runs share the baseline: seed their files with it and resume.
for f in zero_tprune_ablation mctf_vs_tome; do head -n 1 $OUT/testbed.jsonl > $OUT/$f.jsonl; done

# 2. Zero-TPrune ablation in the spirit of the paper's Table 1, at keep 0.33 on the schedule of its
#    previous defaults (pruning at blocks 3, 6, 9; the README says why): random drop, + WPR, + EIR, + VHF,
#    + S-stage (half of each removal, the previous default).
for opts in "importance='random' s_stage=False" "eir=False vhf=False s_stage=False" "vhf=False s_stage=False" \
            "s_stage=False" "s_fraction=0.5"; do
  opts="layers=[3,6,9] $opts"
  args=(); for o in $opts; do args+=(-o "$o"); done
  $TP eval --method zero-tprune --keep 0.33 "${args[@]}" --threads 2 --output $OUT/zero_tprune_ablation.jsonl --resume
done

# 3. MCTF against ToMe down to aggressive reduction (keep 0.2 and 0.1; 0.7-0.33 are in run 1).
$TP eval --method tome mctf --keep 0.2 0.1 --threads 2 --output $OUT/mctf_vs_tome.jsonl --resume
.venv/bin/python -m tokenprune.eval.report $OUT/testbed.jsonl $OUT/mctf_vs_tome.jsonl --plot $OUT/mctf_vs_tome.png \
  --title "vit_testbed_fmnist (Fashion-MNIST testbed): all keeps" > $OUT/all_rows.md
