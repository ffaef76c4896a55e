#!/usr/bin/env bash
# The pretraining budget curve on brain MRI (issue 19, item 4; BENCHMARKS.md "Pretraining budget curve"):
# one 30-epoch run per method (CASS, CASS-VICReg, DINO-CNN, DINO-ViT), read out by k-NN and logistic
# regression after 3, 10 and 30 epochs and at its starting point, then the report, then the files kept
# under results/. Rerunning resumes (a pretraining run from its last epoch, finished cells are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/cass experiment --config configs/experiments/brain_budget_curve_cpu.yaml
.venv/bin/cass report runs/brain_budget_curve_cpu
bash benchmarks/keep_results.sh runs/brain_budget_curve_cpu results/brain_budget_curve_cpu
