#!/usr/bin/env bash
# CPU throughput of CASS and DINO pretraining steps on the Brain Tumor MRI dev set at 64 px:
# model-only (random images) vs end-to-end (the zip through the decoded cache and batched augmentation).
# Target (BENCHMARKS.md, Speed): end-to-end >= 0.9x model-only for both methods.
#
# On a shared machine, two intra-op threads are descheduled by other processes and the step's
# OpenMP barriers then waste most of the time (measured: 43 img/s with one thread, 4.6 with two, at
# load 7 on 2 cores), so by default this runs one thread (THREADS=2 to change) and does the data work
# inline (num_workers 0): the step absorbs the whole cost of the data path, nothing hides it.
# Usage: benchmarks/bench_speed_cpu.sh [OUT]   (CASS=path/to/cass to use another install)
set -euo pipefail
DATA=${CASS_SHARED_DATA:-../shared/data}/brain-tumor-mri-224/brain_tumor_mri_224_dev.zip
OUT=${1:-runs/bench-speed-cpu}
CASS=${CASS:-.venv/bin/cass}
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$OUT"
common=(--accelerator cpu --cnn resnet18 --vit vit_tiny_patch16_224 --img-size 64 --batch-size 32
        --data "$DATA" --num-workers 0 --no-paper --json)
uptime | tee "$OUT/load_before.txt"
"$CASS" bench --method cass --method dino --steps 20 --warmup 3 "${common[@]}" > "$OUT/cpu_64px.json"
uptime | tee "$OUT/load_after.txt"
python3 "$(dirname "$0")/bench_summary.py" "$OUT/cpu_64px.json"
