"""The experiment ``cass demo`` runs on the shipped sample."""

from __future__ import annotations

from cass.config import (
    DataConfig,
    DinoConfig,
    FinetuneConfig,
    PretrainConfig,
)
from cass.experiment.config import ExperimentConfig
from cass.methods.dino import SHORT_BUDGET, SHORT_BUDGET_BASE_LR


def demo_config(out: str = "runs/demo", accelerator: str = "auto") -> ExperimentConfig:
    """What ``cass demo`` runs: every method, both networks, 1/10/100 % labels, one seed, on the shipped sample.

    It leads with what its data supports: the k-NN and logistic readouts of every pretrained network against
    its starting point and the learning diagnostics; the fine-tuning table follows. Small networks at 48 px and short
    schedules (3 evaluations, at least 20 steps per fine-tuning), sized to finish in under 10 minutes on a
    2-core CPU; DINO with its short-budget settings (:data:`cass.methods.dino.SHORT_BUDGET`), under which it
    learns in a few dozen steps. No robustness sweeps (they are real experiments' work: ``sweep_batch_sizes``,
    ``sweep_epochs``), which keeps the demo under 10 minutes and its run directory under 1 GB.
    """
    return ExperimentConfig(
        data=DataConfig(num_workers=0),
        label_fractions=[0.01, 0.1, 1.0],
        seeds=[0],
        readouts=["knn", "logistic"],
        pretrain=PretrainConfig(
            cnn="resnet18", vit="vit_tiny_patch16_224", img_size=48, batch_size=32, epochs=3,
            accelerator=accelerator, dino=DinoConfig(**SHORT_BUDGET),
        ),
        pretrain_overrides={f"dino-{arch}": {"dino.base_lr": lr} for arch, lr in SHORT_BUDGET_BASE_LR.items()},
        finetune=FinetuneConfig(epochs=3, batch_size=32, patience=3, min_steps=20, accelerator=accelerator),
        out=out,
    )
