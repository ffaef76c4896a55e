#!/usr/bin/env bash
# The stand-in for ImageNet weights (SPEC §1) used by configs/experiments/brain_mri_cpu.yaml: resnet18 and
# vit_tiny trained WITH LABELS on a different real dataset (PBC blood-cell microscopy), at the experiment's size.
# Rerunning skips finished networks and resumes an interrupted one.
set -euo pipefail
DATA=${CASS_SHARED_DATA:-../shared/data}/blood-pbc-112/blood_pbc_112_dev.zip
SIZE=${1:-32}
for arch in cnn vit; do
  OUT=runs/standin/blood_${arch}_${SIZE}
  [ -f "$OUT/metrics.json" ] && continue
  RESUME=(); [ -f "$OUT/checkpoint.safetensors" ] && RESUME=(--resume)
  .venv/bin/cass finetune --from scratch --arch $arch --cnn resnet18 --vit vit_tiny_patch16_224 --img-size "$SIZE" \
    --batch-size 64 --epochs 3 --data "$DATA" --num-workers 2 --accelerator cpu --seed 0 --out "$OUT" "${RESUME[@]}"
done
