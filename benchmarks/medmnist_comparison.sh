#!/usr/bin/env bash
# The comparison on MedMNIST's official splits (issue 19, item 5): CASS, CASS-VICReg, DINO and supervised at 1,
# 10 and 100 % labels, 3 seeds, the published supervised rows beside the 100 % cells
# (configs/experiments/<dataset>_cpu.yaml), then its report and the files kept under results/<dataset>_cpu.
#
#   bash benchmarks/medmnist_comparison.sh                  # BreastMNIST, then PneumoniaMNIST
#   bash benchmarks/medmnist_comparison.sh breastmnist      # one of them; rerun to resume where it stopped
#
# Order, so that an interrupted run leaves the most answer per CPU hour: every dataset's pretraining and
# readouts (`--readouts-only`), then every dataset's fine-tuning; each step skips what is finished. The kept
# results are refreshed after each step (a part-done report says how many cells it holds).
set -euo pipefail
CASS=.venv/bin/cass
DATASETS=(breastmnist pneumoniamnist)
[ $# -gt 0 ] && DATASETS=("$@")

for pass in --readouts-only ""; do
  for ds in "${DATASETS[@]}"; do
    $CASS experiment --config "configs/experiments/${ds}_cpu.yaml" $pass
    if [ "runs/${ds}_cpu/results.json" -nt "runs/${ds}_cpu/report/report.md" ]; then  # new cells since its report
      $CASS report "runs/${ds}_cpu"
    fi
    bash benchmarks/keep_results.sh "runs/${ds}_cpu" "results/${ds}_cpu"
  done
done
