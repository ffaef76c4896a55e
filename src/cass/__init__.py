"""cass: Cross-Architectural Self-Supervision for medical images.

The command-line tool ``cass`` is a thin layer over the functions re-exported here, so everything
it does can be done from a notebook::

    from cass import PretrainConfig, pretrain, FinetuneConfig, finetune
    run_dir = pretrain(PretrainConfig(cnn="resnet18", vit="vit_tiny_patch16_224", img_size=64, epochs=3))

They are imported on first use, so ``import cass`` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import Any

from cass.utils.version import VERSION as __version__

_EXPORTS = {
    "PretrainConfig": "cass.config",
    "FinetuneConfig": "cass.config",
    "DataConfig": "cass.config",
    "ExperimentConfig": "cass.experiment.config",
    "pretrain": "cass.training.pretrain",
    "finetune": "cass.training.finetune",
    "run_experiment": "cass.experiment.run",
    "write_report": "cass.reporting.report",
    "evaluate": "cass.evaluation.inference",
    "predict": "cass.evaluation.inference",
    "embed": "cass.evaluation.inference",
    "load_classifier": "cass.evaluation.inference",
    "METHODS": "cass.methods.registry",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a re-exported name from its module the first time it is used."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cass' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
