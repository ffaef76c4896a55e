#!/usr/bin/env bash
# Time per pretraining epoch on the shipped sample (240 train images), CPU: CASS (resnet18 + vit_tiny)
# vs DINO with a vit_tiny student and with a resnet18 student, same batch size and image size.
# Prints the epoch-2 time of each run (epoch 1 includes warm-up) and the ratios.
# Usage: benchmarks/pretrain_epoch_time.sh [OUT] [IMG_SIZE] [BATCH]
set -euo pipefail
OUT=${1:-runs/bench-epoch-time}; SIZE=${2:-64}; BATCH=${3:-16}
common=(--cnn resnet18 --vit vit_tiny_patch16_224 --img-size "$SIZE" --batch-size "$BATCH" --epochs 2
        --num-workers 2 --accelerator cpu --seed 0)
rm -rf "$OUT"
.venv/bin/cass pretrain "${common[@]}" --method cass --out "$OUT/cass" > /dev/null
.venv/bin/cass pretrain "${common[@]}" --method dino --arch vit --out "$OUT/dino-vit" > /dev/null
.venv/bin/cass pretrain "${common[@]}" --method dino --arch cnn --out "$OUT/dino-cnn" > /dev/null
.venv/bin/python - "$OUT" <<'PY'
import csv, sys
out = sys.argv[1]
t = {name: float(list(csv.DictReader(open(f"{out}/{name}/metrics.csv")))[-1]["epoch_time_s"])
     for name in ("cass", "dino-vit", "dino-cnn")}
for name, seconds in t.items():
    print(f"{name:9s} epoch time {seconds:7.1f} s")
print(f"CASS / DINO-ViT {t['cass'] / t['dino-vit']:.2f}; CASS / DINO-CNN {t['cass'] / t['dino-cnn']:.2f}; "
      f"CASS / (DINO-ViT + DINO-CNN) {t['cass'] / (t['dino-vit'] + t['dino-cnn']):.2f}")
PY
