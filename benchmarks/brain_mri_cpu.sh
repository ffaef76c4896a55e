#!/usr/bin/env bash
# The committed brain-MRI comparison (README "Results", BENCHMARKS.md): the blood-cell stand-in weights,
# then CASS vs DINO vs supervised from scratch and from the stand-in, 1/10/100 % labels, 3 seeds, then the report.
# Rerunning resumes: finished stand-ins and cells are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash benchmarks/standin_blood.sh 32
.venv/bin/cass experiment --config configs/experiments/brain_mri_cpu.yaml
.venv/bin/cass report runs/brain_mri_cpu
