#!/usr/bin/env bash
# Supervised baseline from scratch on Brain Tumor MRI (train/val of the dev zip, never its test data):
# resnet18 at 64 px, seed 0, at the label fractions given as FRACTION:EPOCHS pairs.
# Usage: benchmarks/finetune_brain_mri.sh [OUT] [FRACTION:EPOCHS ...]   (default: 1.0:5 0.1:20 0.01:40)
set -euo pipefail
DATA=${CASS_SHARED_DATA:-../shared/data}/brain-tumor-mri-224/brain_tumor_mri_224_dev.zip
OUT=${1:-runs/bench-finetune-brain}
shift || true
if [ $# -gt 0 ]; then SPECS=("$@"); else SPECS=(1.0:5 0.1:20 0.01:40); fi
mkdir -p "$OUT"
for spec in "${SPECS[@]}"; do
  fraction=${spec%%:*}; epochs=${spec##*:}
  start=$(date +%s)
  .venv/bin/cass finetune --from scratch --arch cnn --cnn resnet18 --img-size 64 --batch-size 32 \
    --data "$DATA" --label-fraction "$fraction" --epochs "$epochs" --seed 0 --num-workers 2 --accelerator cpu \
    --out "$OUT/fraction-$fraction" > "$OUT/fraction-$fraction.log" 2>&1
  f1=$(.venv/bin/python -c "import json;print(round(json.load(open('$OUT/fraction-$fraction/metrics.json'))['macro_f1'],4))")
  echo "fraction $fraction, $epochs epochs: $(( $(date +%s) - start )) s wall, best validation macro-F1 $f1"
done
