"""Using a fine-tuned model directory: ``evaluate`` (metrics on labelled images), ``predict``
(a CSV of classes and probabilities) and ``embed`` (backbone features as ``.npy``, also of an exported backbone)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cass.config import ConfigError
from cass.data.dataset import ImageSet
from cass.data.sources import load_splits, open_images
from cass.evaluation.features import (
    extract_features,
    read_model_info,
)
from cass.evaluation.metrics import ClassificationMetrics
from cass.evaluation.readouts import READOUT_FILES, Readout, load_readout
from cass.models.backbone import load_backbone
from cass.models.factory import Network, create_network, shape_options
from cass.models.weights import load_state_dict_file
from cass.utils.atomic import atomic_write, atomic_write_text
from cass.utils.plots import plot_confusion_matrix
from cass.utils.rundir import MODEL


@dataclass
class Classifier:
    """A fine-tuned network with what it needs to predict: classes, input size, and a readout's fit."""

    net: Network
    classes: list[str]
    multilabel: bool
    img_size: int
    readout: Readout | None
    """The k-NN bank or logistic probe of a readout model (with the k or C chosen when it was made); None:
    the network's own head."""
    device: torch.device

    @torch.no_grad()
    def logits(self, images: ImageSet, batch_size: int = 64) -> torch.Tensor:
        """Scores (N, C) for every image: head logits, or the readout's scores."""
        feats = extract_features(self.net, images, self.img_size, batch_size, self.device)
        if self.readout is not None:
            return self.readout.logits(feats)
        return self.net.model.get_classifier()(torch.from_numpy(feats).to(self.device)).float().cpu()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=1)


def load_classifier(model_dir: str | Path, device: str | torch.device | None = None) -> Classifier:
    """Load a ``cass finetune`` output directory (weights are safetensors; no pickle is read)."""
    model_dir = Path(model_dir)
    info = read_model_info(model_dir)
    readout = info["mode"] in READOUT_FILES  # a readout keeps the network without a head, and its own fit
    num_outputs = 0 if readout else len(info["classes"])
    net = create_network(info["timm_name"], num_outputs=num_outputs, img_size=info["img_size"],
                         **shape_options(info["arch"], info["cnn_stem"], info["patch_size"]))
    net.model.load_state_dict(load_state_dict_file(model_dir / MODEL), strict=not readout)
    fit = load_readout(model_dir, info["mode"], len(info["classes"])) if readout else None
    device = _device(device)
    return Classifier(net.to(device).eval(), info["classes"], info["multilabel"], info["img_size"], fit, device)


def _device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else the GPU when there is one."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _labelled_split(data: str | Path, split: str | None) -> ImageSet:
    """The images to evaluate: ``split`` when given, else test, else val, else the whole source."""
    if split is not None:
        return open_images(data, split=split)
    splits = load_splits(data)
    return splits.test or splits.val or splits.train


def _align_targets(images: ImageSet, classifier: Classifier) -> torch.Tensor:
    """Targets re-indexed to the model's classes; a class the model does not know is an error."""
    if images.targets is None:
        raise ConfigError(f"{images.source}: these images have no labels; use `cass predict` for unlabelled images")
    unknown = sorted(set(images.classes) - set(classifier.classes))
    if unknown or images.multilabel != classifier.multilabel:
        raise ConfigError(
            f"{images.source}: class set does not match the model: data classes {images.classes}, model classes "
            f"{classifier.classes}" + (f" (unknown to the model: {unknown})" if unknown else "")
        )
    position = [classifier.classes.index(c) for c in images.classes]
    if images.multilabel:
        aligned = np.zeros((len(images), len(classifier.classes)), dtype=np.float32)
        aligned[:, position] = images.targets
        return torch.from_numpy(aligned)
    return torch.as_tensor(np.asarray(position)[images.targets])


def evaluate(model_dir: str | Path, data: str | Path, out: str | Path, split: str | None = None) -> dict[str, Any]:
    """Metrics of a fine-tuned model on labelled images: ``metrics.json``, ``per_class.csv``, confusion PNG."""
    classifier = load_classifier(model_dir)
    images = _labelled_split(data, split).check()
    targets = _align_targets(images, classifier)
    metrics = ClassificationMetrics(classifier.classes, classifier.multilabel)
    metrics.update(classifier.logits(images), targets)
    result = metrics.compute()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))
    atomic_write_text(out / "per_class.csv", _per_class_csv(result["per_class"]))
    if not classifier.multilabel:
        plot_confusion_matrix(np.asarray(result["confusion_matrix"]), classifier.classes, out / "confusion_matrix.png")
    return result


def _per_class_csv(per_class: dict[str, dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = list(next(iter(per_class.values())).keys())
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", *columns])
    for name, values in per_class.items():
        writer.writerow([name, *(values[c] for c in columns)])
    return buffer.getvalue()


def predict(model_dir: str | Path, input_path: str | Path, out_csv: str | Path) -> Path:
    """One row per image: ``path``, ``pred`` (class name; ``;``-joined labels when multi-label), probabilities."""
    classifier = load_classifier(model_dir)
    images = open_images(input_path).check()
    probs = classifier.probabilities(classifier.logits(images)).numpy()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "pred", *classifier.classes])
    for key, row in zip(images.keys, probs, strict=True):
        if classifier.multilabel:
            pred = ";".join(c for c, p in zip(classifier.classes, row) if p >= 0.5)
        else:
            pred = classifier.classes[int(row.argmax())]
        writer.writerow([key, pred, *(f"{p:.6f}" for p in row)])
    atomic_write_text(Path(out_csv), buffer.getvalue())
    return Path(out_csv)


def embed(model: str | Path, input_path: str | Path, out: str | Path) -> Path:
    """Backbone features of every image: ``features.npy`` (N, D) and ``files.csv`` (row order).

    ``model``: a fine-tuned model directory, or a backbone file written by ``cass export`` (read at the size
    it was pretrained at).
    """
    if Path(model).is_file():
        net, device = load_backbone(model), _device()
        img_size = net.input_size
    else:
        classifier = load_classifier(model)
        net, img_size, device = classifier.net, classifier.img_size, classifier.device
    images = open_images(input_path).check()
    features = extract_features(net, images, img_size, 64, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "features.npy", lambda tmp: _save_npy(tmp, features))
    atomic_write_text(out / "files.csv", "path\n" + "".join(f"{k}\n" for k in images.keys))
    return out


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` to exactly ``path`` (given a name, it would append ``.npy`` to the temporary one)."""
    with open(path, "wb") as fh:
        np.save(fh, array)
