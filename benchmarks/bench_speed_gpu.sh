#!/usr/bin/env bash
# GPU throughput (H100 / H200) of CASS and DINO on the Brain Tumor MRI dev set, the figures of the
# BENCHMARKS.md Speed section:
#   1. CASS resnet50 + vit_base_patch16_224 at 224, end-to-end, batch 16 / 64 / 256 (targets: >= 800 img/s
#      at 16, >= 2,500 at 64-256), bf16 + channels-last + fused Adam, then with CUDA graphs at 16 and 64;
#   2. the paper's configuration (resnet50 + vit_base_patch16_384, 384 px, batch 16): the plain eager fp32
#      reference row against the fast settings (target: >= 3x);
#   3. DINO ViT-B/16 (2 x 224 + 10 x 96 crops) at batch 16 and 64: CASS epoch time <= 0.31x DINO's;
#   4. peak memory of the CASS step at batch 16, end-to-end against model-only (the bare model step).
# Usage: benchmarks/bench_speed_gpu.sh [OUT]   (CASS=path/to/cass to use another install)
set -euo pipefail
DATA=${CASS_SHARED_DATA:-../shared/data}/brain-tumor-mri-224/brain_tumor_mri_224_dev.zip
OUT=${1:-runs/bench-speed-gpu}
CASS=${CASS:-.venv/bin/cass}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
common=(--data "$DATA" --num-workers 8 --steps 50 --warmup 10 --json)
"$CASS" bench --method cass --method dino --batch-size 16 --batch-size 64 "${common[@]}" > "$OUT/cass_dino_224.json"
"$CASS" bench --method cass --batch-size 256 --no-paper "${common[@]}" > "$OUT/cass_224_batch256.json"
"$CASS" bench --method cass --method dino --batch-size 16 --batch-size 64 --cuda-graphs --no-paper "${common[@]}" \
  > "$OUT/cass_dino_224_cuda_graphs.json"
"$CASS" bench --method cass --mode model-only --vit vit_base_patch16_384 --img-size 384 --batch-size 16 \
  --cuda-graphs --no-paper "${common[@]}" > "$OUT/paper_config_fast.json"
python3 "$(dirname "$0")/bench_summary.py" "$OUT"/*.json
