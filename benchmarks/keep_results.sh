#!/usr/bin/env bash
# Copy what a finished experiment shows into a committed results folder, without models or caches:
#   bash benchmarks/keep_results.sh runs/brain_mri_cpu results/brain_mri_cpu
# results.csv/json (every cell), comparisons.csv/json (the stated paired differences), pretraining.csv,
# environment.json, experiment.yaml, held_out.csv (the test and selection images carved from train, with their
# groups), each pretraining run's per-epoch metrics.csv and start.csv (epoch 0), each cell's per-image test
# predictions (finetune/<cell>/test_predictions.csv.gz: what the intervals are computed from), the budget curve
# (budget_curve.csv) when the experiment reads snapshots out, and the report (report.md and its figures).
set -euo pipefail
RUN=${1:?experiment directory}
OUT=${2:?results directory}
rm -rf "$OUT"
mkdir -p "$OUT/pretrain"
for f in results.csv results.json comparisons.csv comparisons.json pretraining.csv environment.json experiment.yaml; do
  cp "$RUN/$f" "$OUT/"
done
[ -f "$RUN/budget_curve.csv" ] && cp "$RUN/budget_curve.csv" "$OUT/"
for cell in "$RUN"/finetune/*/; do  # kept compressed; a cell from before cass compressed them is compressed here
  kept="$OUT/finetune/$(basename "$cell")/test_predictions.csv.gz"
  if [ -f "$cell/test_predictions.csv.gz" ]; then
    mkdir -p "$(dirname "$kept")" && cp "$cell/test_predictions.csv.gz" "$kept"
  elif [ -f "$cell/test_predictions.csv" ]; then
    mkdir -p "$(dirname "$kept")" && gzip -nc "$cell/test_predictions.csv" > "$kept"
  fi
done
for dir in "$RUN"/pretrain/*/; do
  name=$(basename "$dir")
  cp "$dir/metrics.csv" "$OUT/pretrain/${name}_metrics.csv"
  [ -f "$dir/start.csv" ] && cp "$dir/start.csv" "$OUT/pretrain/${name}_start.csv"
  [ -f "$dir/held_out.csv" ] && cp "$dir/held_out.csv" "$OUT/held_out.csv"
done
cp -r "$RUN/report" "$OUT/report"
rm -f "$OUT/report/report.html"  # the same report as report.md with its figures inlined: twice the bytes
du -sh "$OUT"
