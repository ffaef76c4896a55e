"""Frozen features: what the readouts (:mod:`cass.evaluation.readouts`), their models and ``cass embed`` share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from cass.config import (
    ConfigError,
)
from cass.data.dataset import ImageSet
from cass.data.loaders import image_loader
from cass.data.transforms import eval_transform
from cass.models.factory import Network
from cass.utils.rundir import MODEL


@torch.no_grad()
def extract_features(net: Network, images: ImageSet, img_size: int, batch_size: int, device: torch.device,
                     workers: int | None = None) -> np.ndarray:
    """Pooled backbone features of every image, without augmentation (``workers`` None: automatic)."""
    net.eval().to(device)
    loader = image_loader(images, eval_transform(img_size), batch_size, 0, False, workers)
    chunks = [net.features(x.to(device)).float().cpu() for x, _, _ in tqdm(loader, desc="features", leave=False)]
    return torch.cat(chunks).numpy()


def read_model_info(model_dir: str | Path) -> dict[str, Any]:
    """The metadata of a model directory's weights: timm name, classes, multi-label flag, input size."""
    path = Path(model_dir) / MODEL
    if not path.is_file():
        raise ConfigError(f"--model {model_dir}: no {MODEL} there (is it a cass finetune output directory?)")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return {"timm_name": meta["timm_name"], "arch": meta["arch"], "classes": json.loads(meta["classes"]),
            "multilabel": json.loads(meta["multilabel"]), "img_size": int(meta["img_size"]), "mode": meta["mode"],
            "cnn_stem": meta.get("cnn_stem", "timm"), "patch_size": int(meta["patch_size"]) if meta.get("patch_size") else None}
