"""Frozen features: what the readouts (:mod:`cass.evaluation.readouts`), their models and ``cass embed`` share."""

from __future__ import annotations

import hashlib
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
from cass.utils.atomic import atomic_write
from cass.utils.rundir import MODEL


@torch.no_grad()
def extract_features(net: Network, images: ImageSet, img_size: int, batch_size: int, device: torch.device,
                     workers: int | None = None) -> np.ndarray:
    """Pooled backbone features of every image, without augmentation (``workers`` None: automatic)."""
    net.eval().to(device)
    loader = image_loader(images, eval_transform(img_size), batch_size, 0, False, workers)
    chunks = [net.features(x.to(device)).float().cpu() for x, _, _ in tqdm(loader, desc="features", leave=False)]
    return torch.cat(chunks).numpy()


def features_key(net: Network, images: ImageSet, img_size: int) -> str:
    """Digest of the network's weights, the input size and the images' names in order: what the features of
    a frozen network depend on, given one data source (an experiment's, which never changes under it)."""
    digest = hashlib.sha256(f"{net.name}|{img_size}|{len(images)}".encode())
    for name, tensor in net.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update("\n".join(images.keys).encode())
    return digest.hexdigest()[:32]


class FeatureStore:
    """Frozen features kept on disk, one ``.npy`` per (network weights, input size, images).

    An experiment reads each frozen network out with two readouts at several label fractions: without a store
    each of those cells extracts the same selection and test features again (on a CPU, most of a readout's
    time). Files are written whole (temporary file, then rename), so a killed run never leaves half of one.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def features(self, net: Network, images: ImageSet, img_size: int, batch_size: int, device: torch.device,
                 workers: int | None = None) -> np.ndarray:
        """:func:`extract_features`, read from the store when this network has already seen these images."""
        path = self.folder / f"{features_key(net, images, img_size)}.npy"
        if path.is_file():
            return np.load(path)
        features = extract_features(net, images, img_size, batch_size, device, workers)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: given a path, numpy would append ".npy" to it
                np.save(fh, features, allow_pickle=False)

        atomic_write(path, write)
        return features


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
