#!/usr/bin/env bash
# Supervised baseline from scratch on Brain Tumor MRI (train/val of the dev zip, never its test data):
# resnet18 at 64 px, 1%, 10% and 100% of the train labels, seed 0. Usage: benchmarks/finetune_brain_mri.sh [OUT]
set -euo pipefail
DATA=${CASS_SHARED_DATA:-../shared/data}/brain-tumor-mri-224/brain_tumor_mri_224_dev.zip
OUT=${1:-runs/bench-finetune-brain}
for spec in "1.0 5" "0.1 20" "0.01 40"; do
  set -- $spec
  start=$(date +%s)
  .venv/bin/cass finetune --from scratch --arch cnn --cnn resnet18 --img-size 64 --batch-size 32 \
    --data "$DATA" --label-fraction "$1" --epochs "$2" --seed 0 --num-workers 2 --accelerator cpu \
    --out "$OUT/fraction-$1"
  echo "fraction $1: $(( $(date +%s) - start )) s, macro-F1 $(python3 -c "import json;print(round(json.load(open('$OUT/fraction-$1/metrics.json'))['macro_f1'],4))")"
done
