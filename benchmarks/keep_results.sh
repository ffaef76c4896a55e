#!/usr/bin/env bash
# Copy what a finished experiment shows into a committed results folder, without models or caches:
#   bash benchmarks/keep_results.sh runs/brain_mri_cpu results/brain_mri_cpu
# results.csv/json (every cell), pretraining.csv, environment.json, experiment.yaml, held_out.csv (the test
# and selection images carved from train), each pretraining run's per-epoch metrics.csv, and the report.
set -euo pipefail
RUN=${1:?experiment directory}
OUT=${2:?results directory}
rm -rf "$OUT"
mkdir -p "$OUT/pretrain"
for f in results.csv results.json pretraining.csv environment.json experiment.yaml; do
  cp "$RUN/$f" "$OUT/"
done
for dir in "$RUN"/pretrain/*/; do
  name=$(basename "$dir")
  cp "$dir/metrics.csv" "$OUT/pretrain/${name}_metrics.csv"
  [ -f "$dir/held_out.csv" ] && cp "$dir/held_out.csv" "$OUT/held_out.csv"
done
cp -r "$RUN/report" "$OUT/report"
du -sh "$OUT"
