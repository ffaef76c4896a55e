#!/usr/bin/env bash
# A stand-in for ImageNet weights (SPEC §1): resnet18 and vit_tiny trained WITH LABELS on another real dataset
# than the one a comparison evaluates, at the comparison's input size. Used by the experiments' inits
# (runs/standin/<dataset>_<arch>_<size>/model.safetensors):
#
#   bash benchmarks/standin.sh blood 64     # for brain MRI, PneumoniaMNIST and BreastMNIST comparisons
#   bash benchmarks/standin.sh brain 64     # for the blood-cell comparison
#
# Rerunning skips finished networks and resumes an interrupted one.
set -euo pipefail
SHARED=${CASS_SHARED_DATA:-../shared/data}
DATASET=${1:?usage: bash benchmarks/standin.sh blood|brain [SIZE]}
SIZE=${2:-64}
case "$DATASET" in
  blood) DATA=$SHARED/blood-pbc-112/blood_pbc_112_dev.zip ;;
  brain) DATA=$SHARED/brain-tumor-mri-224/brain_tumor_mri_224_dev.zip ;;
  *) echo "benchmarks/standin.sh: unknown dataset '$DATASET' (blood or brain)" >&2; exit 2 ;;
esac
for arch in cnn vit; do
  OUT=runs/standin/${DATASET}_${arch}_${SIZE}
  [ -f "$OUT/metrics.json" ] && continue
  RESUME=(); [ -f "$OUT/checkpoint.safetensors" ] && RESUME=(--resume)
  .venv/bin/cass finetune --from scratch --arch $arch --cnn resnet18 --vit vit_tiny_patch16_224 --img-size "$SIZE" \
    --batch-size 64 --epochs 3 --data "$DATA" --num-workers 2 --accelerator cpu --seed 0 --out "$OUT" "${RESUME[@]}"
done
