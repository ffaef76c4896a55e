"""The experiment ``cass demo`` runs on the shipped sample."""

from __future__ import annotations

from cass.config import (
    DataConfig,
    DinoConfig,
    FinetuneConfig,
    PretrainConfig,
)
from cass.experiment.config import ExperimentConfig


def demo_config(out: str = "runs/demo", accelerator: str = "auto") -> ExperimentConfig:
    """What ``cass demo`` runs: every method, both networks, 1/10/100 % labels, one seed, on the shipped sample.

    It leads with what its data supports: a k-NN readout of every pretrained network against its starting
    point and the learning diagnostics; the fine-tuning table follows. Small networks at 48 px and short
    schedules (at least 50 steps per fine-tuning), sized to finish in minutes on a 2-core CPU; DINO keeps
    its recipe but with a 4,096-prototype head and 2 local crops, so its cost stays comparable. A two-point
    sweep (batch 16 vs 32, 1 vs 3 epochs, fine-tuned on all labels) fills the report's robustness plots.
    """
    return ExperimentConfig(
        data=DataConfig(num_workers=0),
        label_fractions=[0.01, 0.1, 1.0],
        seeds=[0],
        readouts=["knn"],
        sweep_batch_sizes=[16],
        sweep_epochs=[1],
        pretrain=PretrainConfig(
            cnn="resnet18", vit="vit_tiny_patch16_224", img_size=48, batch_size=32, epochs=3,
            accelerator=accelerator, dino=DinoConfig(out_dim=4096, n_local_crops=2),
        ),
        finetune=FinetuneConfig(epochs=4, batch_size=32, patience=4, min_steps=50, accelerator=accelerator),
        out=out,
    )
