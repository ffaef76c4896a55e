"""Frozen-feature readouts (SPEC §2): a cosine k-NN and an L2 logistic-regression probe on a network's
pooled features, each with its one setting (k, C) chosen on the selection split.

A readout measures what the features already hold, so nothing of the network changes: the labelled
images' features are its training set (the *bank*). Each split's features are extracted once by the
caller and reused for every value of the grid; the value with the best selection macro-F1 is kept (ties:
the first of the sorted grid, i.e. the smallest k, or the smallest C, the strongest regularisation). A
fitted readout is a few tensors saved beside the network's weights as safetensors (never pickle), so
``cass predict`` scores new images exactly as fine-tuning scored the test split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from cass.evaluation.metrics import ClassificationMetrics
from cass.models.weights import load_state_dict_file
from cass.utils.checkpoint import read_info, save_weights
from cass.utils.rundir import KNN_BANK, LOGISTIC_PROBE

READOUT_FILES = {"knn": KNN_BANK, "logistic": LOGISTIC_PROBE}
"""The file beside ``model.safetensors`` that holds each readout (by ``finetune.mode``)."""

NEVER = math.log(1e-8)
"""The log-probability of a class no neighbour has, and the logit of a label no labelled image has: far
below any real score, but finite (metrics and CSVs stay numbers)."""

MAX_ITER = 2000
"""L-BFGS iterations of a logistic fit: enough for the large values of C on a few hundred labelled images
(which are often separable, so the weakest regularisation converges slowly)."""


class Readout(Protocol):
    """A fitted readout: scores from frozen features, and its file."""

    def logits(self, features: np.ndarray) -> torch.Tensor:
        """Scores (N, C) for :class:`~cass.evaluation.metrics.ClassificationMetrics` (softmax or sigmoid)."""
        ...

    def save(self, path: Path) -> None:
        """Write the fit as safetensors (tensors, and the chosen setting in the metadata)."""
        ...


@dataclass
class KnnReadout:
    """Distance-weighted cosine k-NN over the labelled features (single-label classes)."""

    features: np.ndarray
    targets: np.ndarray
    k: int
    num_classes: int

    def logits(self, features: np.ndarray) -> torch.Tensor:
        """Class log-probabilities over all classes (a class no neighbour has gets :data:`NEVER`)."""
        knn = KNeighborsClassifier(n_neighbors=self.k, metric="cosine", weights="distance").fit(
            self.features, self.targets)
        proba = np.zeros((len(features), self.num_classes))
        proba[:, knn.classes_] = knn.predict_proba(features)
        return torch.from_numpy(np.log(np.clip(proba, math.exp(NEVER), 1.0))).float()

    def save(self, path: Path) -> None:
        save_weights(path, {"features": torch.from_numpy(self.features), "targets": torch.from_numpy(self.targets)},
                     {"k": str(self.k)})

    @classmethod
    def load(cls, path: Path, num_classes: int) -> KnnReadout:
        bank = load_state_dict_file(path)
        return cls(bank["features"].numpy(), bank["targets"].numpy(), int(read_info(path)["k"]), num_classes)


@dataclass
class LogisticReadout:
    """L2-regularised logistic regression on standardised features, kept as plain arrays: ``weight`` (C, D)
    and ``bias`` (C,) give softmax logits (single-label, multinomial) or per-label sigmoid logits
    (multi-label, one-vs-rest) of ``(features - mean) / scale``."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    c: float

    def logits(self, features: np.ndarray) -> torch.Tensor:
        standardised = (features - self.mean) / self.scale
        return torch.from_numpy(standardised @ self.weight.T + self.bias).float()

    def save(self, path: Path) -> None:
        arrays = {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}
        save_weights(path, {name: torch.from_numpy(np.asarray(a, dtype=np.float64)) for name, a in arrays.items()},
                     {"c": repr(self.c)})

    @classmethod
    def load(cls, path: Path) -> LogisticReadout:
        arrays = {name: tensor.numpy() for name, tensor in load_state_dict_file(path).items()}
        return cls(arrays["mean"], arrays["scale"], arrays["weight"], arrays["bias"], float(read_info(path)["c"]))


def fit_logistic(features: np.ndarray, targets: np.ndarray, c: float, num_classes: int,
                 multilabel: bool) -> LogisticReadout:
    """Fit the probe with inverse regularisation strength ``c`` on the labelled ``features`` (standardised
    with their own mean and std, so one grid of C suits every network's feature scale)."""
    scaler = StandardScaler().fit(features)
    x = scaler.transform(features)
    if multilabel:
        fits = [_binary_fit(x, targets[:, label], c) for label in range(num_classes)]
        weight, bias = np.stack([w for w, _ in fits]), np.array([b for _, b in fits])
    else:
        weight, bias = _multiclass_fit(x, targets, c, num_classes)
    return LogisticReadout(scaler.mean_, scaler.scale_, weight, bias, c)


def _multiclass_fit(x: np.ndarray, targets: np.ndarray, c: float, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial weights over all classes; scikit-learn's binary case (one row: class 1 against class 0)
    becomes two rows whose softmax is the same probability."""
    model = LogisticRegression(C=c, max_iter=MAX_ITER).fit(x, targets)
    coef, intercept = model.coef_, model.intercept_
    if len(model.classes_) == 2:
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight, bias = np.zeros((num_classes, x.shape[1])), np.full(num_classes, NEVER)
    weight[model.classes_], bias[model.classes_] = coef, intercept
    return weight, bias


def _binary_fit(x: np.ndarray, positives: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """One label of a one-vs-rest probe; a label that is always (or never) present among the labelled
    images cannot be fitted and is always (never) predicted."""
    if positives.min() == positives.max():
        return np.zeros(x.shape[1]), -NEVER if positives[0] else NEVER
    model = LogisticRegression(C=c, max_iter=MAX_ITER).fit(x, positives)
    return model.coef_[0], float(model.intercept_[0])


def knn_grid(ks: Sequence[int], bank_size: int) -> list[int]:
    """The k to try, sorted: a k above the number of labelled images becomes that number."""
    return sorted({min(k, bank_size) for k in ks})


def knn_candidates(bank: np.ndarray, targets: np.ndarray, ks: Sequence[int],
                   num_classes: int) -> Iterator[tuple[float, Readout]]:
    """One k-NN per k of the grid (fitting one only stores the bank)."""
    for k in knn_grid(ks, len(bank)):
        yield k, KnnReadout(bank, targets, k, num_classes)


def logistic_candidates(bank: np.ndarray, targets: np.ndarray, cs: Sequence[float], num_classes: int,
                        multilabel: bool) -> Iterator[tuple[float, Readout]]:
    """One probe per C of the grid, fitted lazily: each is scored before the next is fitted."""
    for c in sorted(set(cs)):
        yield c, fit_logistic(bank, targets, c, num_classes, multilabel)


def readout_scores(readout: Readout, features: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                   multilabel: bool) -> dict[str, Any]:
    """The metrics of a readout on one split, through the same :class:`ClassificationMetrics` as fine-tuning."""
    metrics = ClassificationMetrics(classes, multilabel)
    metrics.update(readout.logits(features), torch.as_tensor(targets))
    return metrics.compute()


@dataclass
class Choice:
    """The readout kept: its setting's value, its selection scores, and what every value scored."""

    readout: Readout
    value: float
    scores: dict[str, Any]
    macro_f1_by_value: dict[float, float]

    def record(self, setting: str) -> dict[str, Any]:
        """What ``metrics.json`` keeps under ``readout``: ``{"k": 5, "grid": [1, 5, ...],
        "selection_macro_f1_by_k": {"1": ..., "5": ...}}`` (``c`` for the logistic probe)."""
        return {setting: self.value, "grid": list(self.macro_f1_by_value),
                f"selection_macro_f1_by_{setting}": {f"{v:g}": f1 for v, f1 in self.macro_f1_by_value.items()}}


def choose_on_selection(candidates: Iterable[tuple[float, Readout]], features: np.ndarray, targets: np.ndarray,
                        classes: Sequence[str], multilabel: bool) -> Choice:
    """Score every candidate on the selection split's features; keep the best macro-F1 (the first on ties)."""
    best: tuple[float, Readout, dict[str, Any]] | None = None
    by_value: dict[float, float] = {}
    for value, readout in candidates:
        scores = readout_scores(readout, features, targets, classes, multilabel)
        by_value[value] = scores["macro_f1"]
        if best is None or scores["macro_f1"] > best[2]["macro_f1"]:
            best = value, readout, scores
    if best is None:
        raise ValueError("no readout to choose from: the grid is empty")
    value, readout, scores = best
    return Choice(readout, value, scores, by_value)


def load_readout(model_dir: Path, mode: str, num_classes: int) -> Readout:
    """The readout a ``knn`` or ``logistic`` model directory was saved with."""
    path = Path(model_dir) / READOUT_FILES[mode]
    return KnnReadout.load(path, num_classes) if mode == "knn" else LogisticReadout.load(path)
