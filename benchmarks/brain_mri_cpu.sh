#!/usr/bin/env bash
# The committed brain-MRI comparison (README "Results", BENCHMARKS.md): CASS, CASS-VICReg, DINO and
# supervised from random init, k-NN and logistic readouts against each network's starting point, 1 and 10 %
# labels, 3 seeds, then the report, then the files kept under results/. Rerunning resumes (finished cells are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/cass experiment --config configs/experiments/brain_mri_cpu.yaml
.venv/bin/cass report runs/brain_mri_cpu
bash benchmarks/keep_results.sh runs/brain_mri_cpu results/brain_mri_cpu
