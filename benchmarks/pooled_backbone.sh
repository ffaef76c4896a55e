#!/usr/bin/env bash
# The shared-backbone comparison (issue 20): one cass-vicreg backbone pretrained on the unlabelled train
# splits of brain MRI, blood cells, PneumoniaMNIST and BreastMNIST (configs/pretrain/pooled_cpu.yaml), then,
# on each dataset at 1 % and 10 % labels, readouts and fine-tuning from it against per-dataset pretraining,
# a stand-in for ImageNet weights and supervised training (configs/experiments/pooled_<dataset>_cpu.yaml).
#
#   bash benchmarks/pooled_backbone.sh            # everything; rerun to resume where it stopped
#   bash benchmarks/pooled_backbone.sh brain      # only these datasets' experiments (after the pooled run)
#
# Order, so that an interrupted run leaves the most answer per CPU hour: the pooled pretraining, the two
# stand-ins, every dataset's readouts (`--readouts-only`), then every dataset's fine-tuning; each step skips
# what is finished. A report is written, and the files kept under results/, after each experiment step
# (part-done reports say how many cells).
set -euo pipefail
CASS=.venv/bin/cass
DATASETS=(brain blood pneumonia breast)
[ $# -gt 0 ] && DATASETS=("$@")
POOLED=runs/pooled_cpu

if [ ! -f "${POOLED}_export/MODEL_CARD.md" ]; then  # exported once the pretraining has finished
  if [ -f "$POOLED/checkpoint.safetensors" ]; then
    $CASS pretrain --resume "$POOLED"
  else
    $CASS pretrain --config configs/pretrain/pooled_cpu.yaml
  fi
  $CASS export "$POOLED" --out "${POOLED}_export"
  rm -f "$POOLED/checkpoint.safetensors"  # finished: its networks, config and records stay, the resume state goes
fi
bash benchmarks/standin.sh blood 64
bash benchmarks/standin.sh brain 64

for pass in --readouts-only ""; do
  for ds in "${DATASETS[@]}"; do
    $CASS experiment --config "configs/experiments/pooled_${ds}_cpu.yaml" $pass
    run="runs/pooled_${ds}_cpu"
    if [ "$run/results.json" -nt "$run/report/report.md" ]; then  # new cells since its report
      $CASS report "$run"
    fi
    bash benchmarks/keep_results.sh "$run" "results/pooled_backbone/$ds"  # part-done is kept too
  done
done

# The model card with what the backbone did on each dataset, then the files kept under results/.
EXPERIMENTS=(); for ds in "${DATASETS[@]}"; do EXPERIMENTS+=(--experiment "runs/pooled_${ds}_cpu"); done
$CASS export "$POOLED" --out "${POOLED}_export" "${EXPERIMENTS[@]}"
mkdir -p results/pooled_backbone
cp "${POOLED}_export/MODEL_CARD.md" "$POOLED"/{sources.json,metrics.csv,start.csv,config.yaml} results/pooled_backbone/
for standin in runs/standin/*_64; do  # what each stand-in scored on its own data, and how it was trained
  mkdir -p "results/pooled_backbone/standin/$(basename "$standin")"
  cp "$standin"/{metrics.json,config.yaml} "results/pooled_backbone/standin/$(basename "$standin")/"
done
