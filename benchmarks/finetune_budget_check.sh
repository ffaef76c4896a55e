#!/usr/bin/env bash
# Is it the features or the fine-tuning budget? (BENCHMARKS.md, "Fine-tuning budget on blood cells")
# Fine-tunes the blood-cell comparison's CASS-VICReg networks (and a random-init ViT) with 10 % of the
# labels, seed 0, under the comparison's budget (sigmoid focal loss, at least 50 optimiser steps) and with
# cross-entropy and/or at least 200 steps. Needs runs/blood_pbc_cpu (bash benchmarks/blood_pbc_cpu.sh).
#   bash benchmarks/finetune_budget_check.sh OUT
# Keeps each run's config.yaml, history.csv and metrics.json under OUT/<source>_<arch>_<loss>_<steps>/;
# rerunning skips the runs already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?output directory}
DATA=../shared/data/blood-pbc-112/blood_pbc_112_dev.zip
VICREG=runs/blood_pbc_cpu/pretrain/cass-vicreg_scratch_bs32_ep3_seed0
run() {  # name source arch loss min_steps
  local dir="$OUT/$1"
  [ -f "$dir/metrics.json" ] && return
  rm -rf "$dir"
  .venv/bin/cass finetune --data "$DATA" --train-images 2000 --test-fraction 0.05 --from "$2" --arch "$3" \
    --vit vit_tiny_patch16_224 --img-size 64 --label-fraction 0.1 --epochs 3 --batch-size 32 --patience 2 \
    --loss "$4" --min-steps "$5" --seed 0 --accelerator cpu --no-save-model --out "$dir" | tail -1
  rm -f "$dir/held_out.csv" "$dir/subset.csv"
}
for arch in cnn vit; do
  for loss in focal ce; do
    for steps in 50 200; do
      run "cass-vicreg_${arch}_${loss}_${steps}" "$VICREG" "$arch" "$loss" "$steps"
    done
  done
done
run scratch_vit_focal_50 scratch vit focal 50
run scratch_vit_ce_200 scratch vit ce 200
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for d in sorted(Path(sys.argv[1]).iterdir()):
    m = json.loads((d / "metrics.json").read_text())
    print(f"{d.name:28s} selection (val) macro-F1 {m['selection']['macro_f1']:.3f}")  # a search: never test
PY
